"""The vision side of a GGUF export as an `mmproj` file: the layout llama.cpp's multimodal library (tools/mtmd,
clip.cpp) reads, so `llama-mtmd-cli -m llm.gguf --mmproj mmproj.gguf` and `llama-server --mmproj` run the model.

llama.cpp runs it with its LLaVA graph (projector type "mlp"):

    pixels (3, S, S) -> patch conv (+ bias) [+ CLS] + position table [-> pre_ln] -> the first k encoder layers
    -> patch rows (CLS dropped) -> mm.0 -> GELU -> mm.2 -> image tokens (P, Dl)

Mapping from minillava (LLaVA-1.5 semantics):
  * select_layer: written as `clip.vision.feature_layer = [k]`, k the index into transformers' hidden_states
    (0: embeddings, i: after layer i). With it llama.cpp runs exactly k layers; the implicit rule without it
    (n_layer - 1) has been applied twice by some converters, so the explicit key is the unambiguous one. Only the
    k layers are written: the rest never reach the projector. No post-layernorm is written (LLaVA skips it).
  * input standardisation (feature_mean / feature_std) is folded into mm.0: W (x - m) / s + b = (W/s) x + b - (W/s) m.
  * mlp2x_gelu: mm.0 = linear_1, mm.2 = linear_2. llama.cpp's GELU is the tanh approximation (on CPU through a
    float16 lookup table), minillava's the exact erf one: outputs differ at the 1e-3 level, as in every LLaVA mmproj.
  * linear: llama.cpp's "mlp" always applies GELU after mm.0 and has no plain-linear LLaVA projector, so the map
    is written as mm.0 = [W; -W], mm.2 = [I, -I]: GELU(z) - GELU(-z) = z for any GELU of the form z * s(z) with
    s(z) + s(-z) = 1 (erf and tanh forms alike), so it is the linear map exactly up to GELU's rounding.
  * tower activation: CLIP's quick_gelu is llama.cpp's default; SigLIP's gelu_pytorch_tanh is `clip.use_gelu`.
  * image size, mean and std come from minillava's processor (its ImageTransform).

Weights: f32 writes every tensor in float32; f16 and q8_0 write the vision matrices in float16 (q8_0 quantizes
the LLM only: llama.cpp's own mmproj files are f16/f32 and the patch convolution wants a float kernel); norms,
biases and the embedding tables stay float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from minillava.interop.hf import folded_projector_state
from minillava.model import MiniLlava
from minillava.processor import Processor
from minillava.projectors import LinearProjector, MLPProjector
from minillava.vision import HFVisionTower

SUPPORTED = (
    "CLIP or SigLIP towers (transformers) reading patch tokens at their own input size, with a linear or "
    "mlp2x_gelu projector, fusion splice without AnyRes"
)
TOWERS = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}
# transformers' hidden_act -> clip.use_gelu (llama.cpp: False is quick_gelu, True is the tanh-approximated GELU)
ACTIVATIONS = {"quick_gelu": False, "gelu_pytorch_tanh": True, "gelu_new": True}
CLIP_CLS_NOTE = (
    "CLIP tower: llama.cpp builds whose LLaVA graph appends the CLS token after the patches (ggml-org/llama.cpp#25814, "
    "e.g. the one in llama-cpp-python 0.3.36) shift the position embeddings and drop patch 0; this file is correct "
    "for builds with CLS first (the fix, ggml-org/llama.cpp#25844)"
)
FEATURE_LAYER_KEY = "clip.vision.feature_layer"  # not in gguf-py's Keys; clip-impl.h's KEY_FEATURE_LAYERS


def mmproj_type(weight_type: str) -> str:
    """The mmproj file's weight type for an export type: q8_0 keeps the vision side in float16."""
    return "f32" if weight_type == "f32" else "f16"


def mmproj_refusal(model: MiniLlava) -> str | None:
    """None if llama.cpp's LLaVA graph computes this model's image tokens, else one line saying why not."""
    why = _refusal(model)
    return None if why is None else f"no mmproj: {why}; supported: {SUPPORTED}"


def _refusal(model: MiniLlava) -> str | None:
    tower = model.vision
    if model.config.fusion != "splice" or model.anyres is not None:
        return "only spliced single-crop images map to llama.cpp's LLaVA graph (no xattn, no AnyRes)"
    if not isinstance(tower, HFVisionTower) or tower.model.config.model_type not in TOWERS:
        kind = getattr(getattr(tower, "model", None), "config", None)
        return f"vision tower {getattr(kind, 'model_type', type(tower).__name__)!r} has no llama.cpp LLaVA graph here"
    vc = tower.model.config
    if model.config.vision.select_feature != "patch":
        return f"select_feature {model.config.vision.select_feature!r}: llama.cpp's LLaVA graph drops the CLS token"
    if type(model.projector) not in (LinearProjector, MLPProjector):
        return f"projector {model.projector.name!r} is not a LLaVA linear/MLP projector"
    if vc.hidden_act not in ACTIVATIONS:
        return f"tower activation {vc.hidden_act!r} has no exact llama.cpp counterpart"
    if tower.image_size != vc.image_size:
        return f"input size {tower.image_size} differs from the tower's {vc.image_size} (interpolated positions)"
    if vc.intermediate_size == vc.hidden_size:  # clip.cpp swaps ffn up/down when they look like legacy files
        return "the tower's MLP is square (intermediate_size == hidden_size), which clip.cpp mistakes for a legacy file"
    return None


def write_mmproj(model: MiniLlava, processor: Processor, path: str | Path, weight_type: str) -> None:
    """Write the tower's first `select_layer` layers and the projector as one llama.cpp mmproj GGUF."""
    import gguf  # optional dependency: `pip install minillava[gguf]`

    why = mmproj_refusal(model)
    if why is not None:
        raise ValueError(why)
    writer = gguf.GGUFWriter(Path(path), arch="clip")
    tensors = vision_tensors(model) + projector_tensors(model.projector)
    _write_keys(writer, model, processor, tensors, weight_type)
    for name, array in tensors:
        _add(writer, name, array, weight_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_keys(writer: Any, model: MiniLlava, processor: Processor, tensors: list, weight_type: str) -> None:
    import gguf
    from gguf.constants import Keys

    tower: HFVisionTower = model.vision  # type: ignore[assignment]
    vc, transform = tower.model.config, processor.image_transform
    llm_dim = dict(tensors)["mm.2.weight"].shape[0]
    writer.add_name("minillava-mmproj")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if weight_type == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_string(Keys.Clip.PROJECTOR_TYPE, "mlp")
    writer.add_bool(Keys.Clip.HAS_VISION_ENCODER, True)
    writer.add_bool(Keys.Clip.HAS_LLAVA_PROJECTOR, True)
    writer.add_uint32(Keys.ClipVision.IMAGE_SIZE, tower.image_size)
    writer.add_uint32(Keys.ClipVision.PATCH_SIZE, vc.patch_size)
    writer.add_uint32(Keys.ClipVision.EMBEDDING_LENGTH, vc.hidden_size)
    writer.add_uint32(Keys.ClipVision.FEED_FORWARD_LENGTH, vc.intermediate_size)
    writer.add_uint32(Keys.ClipVision.BLOCK_COUNT, _layers_written(tower))
    writer.add_uint32(Keys.ClipVision.PROJECTION_DIM, llm_dim)
    writer.add_uint32(Keys.ClipVision.Attention.HEAD_COUNT, vc.num_attention_heads)
    writer.add_float32(Keys.ClipVision.Attention.LAYERNORM_EPS, vc.layer_norm_eps)
    writer.add_array(Keys.ClipVision.IMAGE_MEAN, [float(m) for m in transform.mean])
    writer.add_array(Keys.ClipVision.IMAGE_STD, [float(s) for s in transform.std])
    writer.add_array(FEATURE_LAYER_KEY, [tower.selected_layer])
    writer.add_bool(Keys.ClipVision.USE_GELU, ACTIVATIONS[vc.hidden_act])


def _layers_written(tower: HFVisionTower) -> int:
    # at least one: clip.cpp builds no LLaVA graph for a tower of zero layers
    return max(tower.selected_layer, 1)


def vision_tensors(model: MiniLlava) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for the embeddings and the layers up to the selected one, clip.cpp's names."""
    tower: HFVisionTower = model.vision  # type: ignore[assignment]
    kind = TOWERS[tower.model.config.model_type]
    # transformers nests the weights under `vision_model.` in some classes and versions, not in others
    weights = tower.model.state_dict().items()
    state = {k.removeprefix("vision_model."): v.detach().float().cpu().numpy() for k, v in weights}
    emb = "embeddings."
    out = [
        ("v.patch_embd.weight", state[emb + "patch_embedding.weight"]),  # (D, 3, p, p), a conv kernel
        ("v.position_embd.weight", state[emb + "position_embedding.weight"]),  # (n_pos, D)
    ]
    if kind == "clip":  # CLS token and pre-layernorm; CLIP's patch conv has no bias
        out.append(("v.class_embd", state[emb + "class_embedding"]))
        out += [(f"v.pre_ln.{part}", state[f"pre_layrnorm.{part}"]) for part in ("weight", "bias")]
    else:  # SigLIP: no CLS, no pre-layernorm, a biased patch conv
        out.append(("v.patch_embd.bias", state[emb + "patch_embedding.bias"]))
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2", "mlp.fc1": "ffn_up",
             "mlp.fc2": "ffn_down"}  # fmt: skip
    for i in range(_layers_written(tower)):
        for hf, ours in names.items():
            for part in ("weight", "bias"):
                out.append((f"v.blk.{i}.{ours}.{part}", state[f"encoder.layers.{i}.{hf}.{part}"]))
    return out


def projector_tensors(projector: LinearProjector | MLPProjector) -> list[tuple[str, np.ndarray]]:
    """mm.0 / mm.2 of llama.cpp's "mlp" projector, the input standardisation folded into mm.0."""
    if isinstance(projector, MLPProjector):
        state = folded_projector_state(projector)
        names = {"mm.0": "linear_1", "mm.2": "linear_2"}
        return [(f"{g}.{p}", state[f"{t}.{p}"].float().numpy()) for g, t in names.items() for p in ("weight", "bias")]
    weight = projector.linear.weight / projector.feature_std  # (Dl, Dv) / (Dv,)
    bias = projector.linear.bias - weight @ projector.feature_mean  # (Dl,)
    eye = torch.eye(len(bias))  # (Dl, Dl)
    # mm.0 computes (z, -z) with z = W' x + b'; GELU(z) - GELU(-z) = z, which mm.2 = [I, -I] takes
    return [
        ("mm.0.weight", torch.cat([weight, -weight]).detach().float().numpy()),  # (2 Dl, Dv)
        ("mm.0.bias", torch.cat([bias, -bias]).detach().float().numpy()),  # (2 Dl,)
        ("mm.2.weight", torch.cat([eye, -eye], dim=1).numpy()),  # (Dl, 2 Dl)
        ("mm.2.bias", np.zeros(len(bias), np.float32)),
    ]


def _add(writer: Any, name: str, array: np.ndarray, weight_type: str) -> None:
    # matrices (and the conv kernel) in float16 unless f32; norms, biases, CLS and the position table stay float32
    is_matrix = array.ndim >= 2 and "position_embd" not in name
    dtype = np.float16 if is_matrix and weight_type != "f32" else np.float32
    writer.add_tensor(name, np.ascontiguousarray(array, dtype))
