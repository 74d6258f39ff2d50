"""These tests need torchvision, which does not import beside the torch 2.13.0 CPU wheel: `scripts/test.sh`
runs them in their own virtual environment (torch 2.14.1 + torchvision 0.29.1), where they are collected."""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("torchvision") else ["test_*.py"]
