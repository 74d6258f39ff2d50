"""Interop with other model formats (transformers Llava)."""
