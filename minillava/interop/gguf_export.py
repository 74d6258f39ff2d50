"""Export a MiniLlava's language model to GGUF, the file llama.cpp (and llama-server, Ollama, LM Studio) runs.

    DIR/llm-<type>.gguf     the causal LM (LoRA merged) with its tokenizer and chat template: llama.cpp reads
                            the image tokens as input embeddings, exactly as its own multimodal library feeds them
    DIR/config.json, vision/, projector.safetensors
                            minillava's image encoder (tower + projector: pixels -> image tokens), run in torch
    DIR/processor_config.json, llm/ (tokenizer)
                            minillava's prompt rendering, so prompts are tokenized as in training
    DIR/mmproj-<f32|f16>.gguf
                            the same image encoder in llama.cpp's mmproj layout (`minillava.interop.gguf_mmproj`), so
                            llama-mtmd-cli / llama-server --mmproj run the model with images; written for CLIP and
                            SigLIP towers with a linear or mlp2x_gelu projector, else the manifest says why not
    DIR/minillava_gguf.json the manifest: which file is which, how many tokens an image becomes

`minillava generate / eval / chat --model DIR` run such a directory with llama.cpp as the decode engine
(`minillava.interop.llamacpp_runtime`): minillava splices the image tokens, llama.cpp decodes.

Weights: f32, f16 (matrices; norms stay f32), q8_0 (matrices in llama.cpp's 8-bit blocks of 32 with one f16
scale; norms f32) or q4_0 (4-bit blocks of 32; the vocabulary rows, which a tied LM head reads too, in q8_0).
Supported LLMs: Llama-architecture models (Llama, SmolLM, TinyLlama, Vicuna ...) and Qwen2 (GGUF arch "qwen2":
biased q/k/v, RoPE over halves as transformers computes it) with plain RoPE and a tokenizer llama.cpp implements:
byte-level BPE (GGUF "gpt2": SmolLM, Qwen, Llama 3) or SentencePiece BPE with byte fallback (GGUF "llama": Llama 2,
Vicuna, TinyLlama, Mistral); anything else is refused in one line.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedModel

from minillava.fileio import atomic_dir
from minillava.generate import stop_token_ids
from minillava.interop.exported import GGUF_MANIFEST
from minillava.interop.gguf_mmproj import CLIP_CLS_NOTE, mmproj_refusal, mmproj_type, write_mmproj
from minillava.interop.hf import ExportError, _export_chat_template, _merged_llm
from minillava.model import MiniLlava
from minillava.processor import PROCESSOR_CONFIG, Processor

log = logging.getLogger("minillava.gguf")

FORMAT_VERSION = 1
MANIFEST = GGUF_MANIFEST
TYPES = ("f32", "f16", "q8_0", "q4_0")
SUPPORTED = (
    "fusion splice without AnyRes; Llama or Qwen2 LLMs with plain RoPE and a byte-level BPE or SentencePiece BPE "
    "(byte fallback) tokenizer"
)
ARCHITECTURES = ("llama", "qwen2")
QUANT_BLOCK = 32  # inputs per scale in a q8_0 / q4_0 block
_METASPACE = "\u2581"  # SentencePiece's space


def export_gguf(model: MiniLlava, processor: Processor, out_dir: str | Path, weight_type: str = "f16") -> Path:
    """Write the LLM as GGUF beside minillava's image encoder and processor, plus the manifest."""
    if weight_type not in TYPES:
        raise ExportError(f"unknown GGUF type {weight_type!r}; use one of {', '.join(TYPES)}")
    check_exportable(model, processor)
    llm = _merged_llm(model.llm)
    llm_file = f"llm-{weight_type}.gguf"
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_llm_gguf(llm, processor, tmp / llm_file, weight_type)
        mmproj = _write_mmproj_if_supported(model, processor, tmp, weight_type)
        model.save_image_encoder(tmp, processor)
        processor.save_pretrained(tmp)
        manifest = build_manifest(model, processor, llm, llm_file, weight_type, mmproj)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def _write_mmproj_if_supported(model: MiniLlava, processor: Processor, tmp: Path, weight_type: str) -> dict[str, Any]:
    """The manifest's `mmproj` entry: the file written, or no file and the one-line reason."""
    reason = mmproj_refusal(model)
    if reason is not None:
        log.info("GGUF: %s", reason)
        return {"file": None, "reason": reason}
    name = f"mmproj-{mmproj_type(weight_type)}.gguf"
    write_mmproj(model, processor, tmp / name, weight_type)
    entry: dict[str, Any] = {"file": name, "type": mmproj_type(weight_type)}
    if model.vision.prefix_tokens:  # a CLS token: llama.cpp builds with the ordering bug compute it wrongly
        entry["note"] = CLIP_CLS_NOTE
    return entry


def check_exportable(model: MiniLlava, processor: Processor) -> None:
    """Refuse, in one line naming what is supported, what a GGUF language model cannot express."""
    if model.config.fusion != "splice":
        raise ExportError(f"fusion {model.config.fusion!r} cannot be exported to GGUF; supported: {SUPPORTED}")
    if model.anyres is not None:
        raise ExportError(f"AnyRes (image_grid_pinpoints) is not exported to GGUF yet; supported: {SUPPORTED}")
    cfg = model.llm.config
    if cfg.model_type not in ARCHITECTURES:
        raise ExportError(f"LLM architecture {cfg.model_type!r} is not exported to GGUF yet; supported: {SUPPORTED}")
    if getattr(cfg, "use_sliding_window", False):
        raise ExportError(f"the LLM uses sliding-window attention, which this export does not write; {SUPPORTED}")
    rope_type = _rope(cfg).get("rope_type", "default")
    if rope_type != "default":
        raise ExportError(f"the LLM's RoPE scaling {rope_type!r} is not exported to GGUF; supported: {SUPPORTED}")
    if cfg.model_type == "llama" and (getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False)):
        raise ExportError(f"the LLM has attention or MLP biases, which llama.cpp's llama has not; {SUPPORTED}")
    tokenizer_spec(processor.tokenizer)


def _rope(cfg: Any) -> dict[str, Any]:
    """RoPE settings: transformers 5 keeps them in `rope_parameters`, 4 in `rope_theta` / `rope_scaling`."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(cfg, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return params


def tokenizer_spec(tokenizer: Any) -> tuple[str, dict[str, Any]]:
    """The tokenizer's kind in GGUF's words and its tokenizer.json: "gpt2" (byte-level BPE) or "llama"
    (SentencePiece BPE: `▁` for spaces, unknown characters as <0xXX> byte tokens); anything else is refused."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"GGUF export needs a fast tokenizer (tokenizer.json), not {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model["type"] == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer")):
        return "gpt2", spec
    if model["type"] == "BPE" and model.get("byte_fallback") and _METASPACE in json.dumps(
        [spec.get("pre_tokenizer"), spec.get("normalizer")], ensure_ascii=False
    ):
        return "llama", spec
    raise ExportError(
        f"the tokenizer is {model['type']} without byte-level pre-tokenization or byte fallback; supported: {SUPPORTED}"
    )


def write_llm_gguf(llm: PreTrainedModel, processor: Processor, path: Path, weight_type: str) -> None:
    """One GGUF file: the architecture's hyper-parameters, the tokenizer, the chat template, then every weight."""
    import gguf  # optional dependency: `pip install minillava[gguf]`

    writer = gguf.GGUFWriter(path, arch=llm.config.model_type)
    _write_hparams(writer, llm, weight_type)
    _write_tokenizer(writer, processor, llm.get_input_embeddings().num_embeddings)
    for name, array in llm_tensors(llm):
        _add_tensor(writer, name, array, weight_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_hparams(writer: Any, llm: PreTrainedModel, weight_type: str) -> None:
    import gguf

    cfg = llm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_name(getattr(cfg, "_name_or_path", "") or "minillava-llm")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope(cfg)["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(llm.get_input_embeddings().num_embeddings)
    types = gguf.LlamaFileType
    file_type = {"f32": types.ALL_F32, "f16": types.MOSTLY_F16, "q8_0": types.MOSTLY_Q8_0,
                 "q4_0": types.MOSTLY_Q4_0}[weight_type]  # fmt: skip
    writer.add_file_type(file_type)


def _write_tokenizer(writer: Any, processor: Processor, vocab_size: int) -> None:
    """The vocabulary (every id up to the embedding's rows) with its types, the merges (BPE) or scores
    (SentencePiece), special ids and the chat template."""
    tok = processor.tokenizer
    kind, spec = tokenizer_spec(tok)
    tokens, types = _vocabulary(tok, vocab_size, kind)
    writer.add_tokenizer_model(kind)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "gpt2":
        writer.add_tokenizer_pre(pre_tokenizer_name(spec))
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])])
    else:
        writer.add_token_scores(_merge_scores(tokens, spec))
        writer.add_add_space_prefix(_space_prefix(spec))
        if '"prepend_scheme": "first"' in json.dumps(spec.get("pre_tokenizer")):
            log.warning("GGUF: this SentencePiece tokenizer is non-legacy (no space after special tokens); llama.cpp's "
                        "own tokenizer puts one there, so llama-server may split chat prompts differently from "
                        "training (minillava's runtime tokenizes with the model's own tokenizer)")  # fmt: skip
    for setter, token_id in ((writer.add_bos_token_id, tok.bos_token_id), (writer.add_eos_token_id, tok.eos_token_id),
                             (writer.add_unk_token_id, tok.unk_token_id),
                             (writer.add_pad_token_id, processor.pad_token_id)):  # fmt: skip
        if token_id is not None:
            setter(token_id)
    end_of_turn = [t for t in stop_token_ids(processor) if t != tok.eos_token_id]
    if end_of_turn:
        writer.add_eot_token_id(end_of_turn[0])
    writer.add_add_bos_token(bool(processor.bos_ids))
    template = _export_chat_template(processor)
    if template is not None:
        writer.add_chat_template(template)


def _vocabulary(tok: Any, vocab_size: int, kind: str) -> tuple[list[str], list[int]]:
    """Each id's text and GGUF token type: added tokens are CONTROL (special) or USER_DEFINED, SentencePiece's
    <0xXX> pieces BYTE and its <unk> UNKNOWN, ids past the tokenizer (embedding rows padded for speed) UNUSED."""
    import gguf

    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(text)
        if kind == "llama" and i == tok.unk_token_id:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif kind == "llama" and re.fullmatch(r"<0x[0-9A-F]{2}>", text):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _merge_scores(tokens: list[str], spec: dict[str, Any]) -> list[float]:
    """SentencePiece's scores, recovered from the merges: llama.cpp joins the adjacent pair whose joined piece
    scores highest, a BPE tokenizer the pair of lowest rank, so a piece scores minus the rank of the first merge
    that makes it. Pieces no merge makes (characters, bytes, specials) are never a pair's result: 0."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(spec["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _space_prefix(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer puts `▁` before the text (SentencePiece's dummy prefix): Metaspace's prepend scheme
    (transformers 5) or a Prepend normalizer (older tokenizer.json files)."""
    pre, norm = json.dumps(spec.get("pre_tokenizer")), json.dumps(spec.get("normalizer"))
    return '"prepend_scheme": "never"' not in pre and ("Metaspace" in pre or '"Prepend"' in norm)


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name for how a tokenizer (its tokenizer.json `spec`) splits text before BPE: GPT-2's own
    splitting (byte-level with its regex, nothing else) is "gpt-2". Others get "default" and a warning: minillava's
    engine tokenizes itself, but other GGUF readers may split some text differently from the tokenizer the model
    was trained with."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    log.warning("GGUF: pre-tokenizer %s has no llama.cpp name here; writing 'default'", json.dumps(pre)[:80])
    return "default"


def llm_tensors(llm: PreTrainedModel) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every weight of a transformers Llama or Qwen2, in llama.cpp's layout.

    llama.cpp's llama rotates query/key dimensions in interleaved pairs, transformers in two halves: for a Llama the
    rows of q_proj and k_proj are permuted per head so that both compute the same attention (llama.cpp's qwen2
    rotates halves, as transformers does: no permutation). Qwen2's q/k/v biases follow their weights' rows."""
    cfg = llm.config
    state = {k: v.detach().float().cpu().numpy() for k, v in llm.state_dict().items()}
    llama = cfg.model_type == "llama"
    out = [("token_embd.weight", state["model.embed_tokens.weight"])]
    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}  # fmt: skip
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for hf, gguf_name, heads in (("q_proj", "attn_q", cfg.num_attention_heads),
                                     ("k_proj", "attn_k", cfg.num_key_value_heads)):  # fmt: skip
            for kind in ("weight", "bias"):
                tensor = state.get(f"{prefix}self_attn.{hf}.{kind}")
                if tensor is not None:
                    out.append((f"blk.{i}.{gguf_name}.{kind}", _rope_rows(tensor, heads) if llama else tensor))
        out += [(f"blk.{i}.{gguf_name}.weight", state[f"{prefix}{hf}.weight"]) for hf, gguf_name in names.items()]
        if f"{prefix}self_attn.v_proj.bias" in state:
            out.append((f"blk.{i}.attn_v.bias", state[f"{prefix}self_attn.v_proj.bias"]))
    out.append(("output_norm.weight", state["model.norm.weight"]))
    embedding, head = llm.get_input_embeddings().weight, llm.get_output_embeddings().weight
    if head.data_ptr() != embedding.data_ptr():  # tied embeddings: llama.cpp reuses token_embd
        out.append(("output.weight", state["lm_head.weight"]))
    return out


def _rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:  # (heads * head_dim, ...), halves -> pairs per head
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _add_tensor(writer: Any, name: str, array: np.ndarray, weight_type: str) -> None:
    import gguf

    if array.ndim == 1 or weight_type == "f32":  # norms stay float32 in every type, as llama.cpp keeps them
        writer.add_tensor(name, np.ascontiguousarray(array, np.float32))
        return
    kind = weight_type
    if kind == "q4_0" and name in ("token_embd.weight", "output.weight"):
        kind = "q8_0"  # the vocabulary rows (and a tied LM head) at 8 bits, as llama.cpp's own 4-bit files keep them
    if kind in ("q8_0", "q4_0") and array.shape[-1] % QUANT_BLOCK == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0 if kind == "q8_0" else gguf.GGMLQuantizationType.Q4_0
        writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(array, np.float32), qtype), raw_dtype=qtype)
    else:  # f16, and quantized types' rows that are no whole number of blocks
        writer.add_tensor(name, np.ascontiguousarray(array, np.float16))


def build_manifest(
    model: MiniLlava,
    processor: Processor,
    llm: PreTrainedModel,
    llm_file: str,
    weight_type: str,
    mmproj: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a runtime needs beyond the GGUF: which file is which and how image tokens are spliced."""
    files = {"llm": llm_file, "processor_config": PROCESSOR_CONFIG, "tokenizer": "llm"}
    if mmproj and mmproj.get("file"):
        files["mmproj"] = mmproj["file"]
    return {
        "format": "minillava-gguf",
        "format_version": FORMAT_VERSION,
        "files": files,
        "type": weight_type,
        "mmproj": mmproj or {"file": None, "reason": "not requested"},
        "image_encoder": "minillava (config.json, vision/, projector.safetensors): pixels -> image tokens in torch",
        "image": {
            "token": processor.image_token,
            "token_id": processor.image_token_id,
            "tokens_per_image": model.tokens_per_image,
        },
        "splice": "the processor expands each <image> to tokens_per_image placeholder ids; the decoder gets input "
        "embeddings, each placeholder's row replaced by the image's tokens in order",
        "hidden_size": llm.get_input_embeddings().embedding_dim,
        "vocab_size": llm.get_input_embeddings().num_embeddings,
        "chat_template": processor.template.name,
        "eos_token_ids": stop_token_ids(processor),
    }
