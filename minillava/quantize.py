"""Weight-only int8 quantization of the language model: per-output-channel symmetric int8 weights, the LM head too.

Batch-1 decoding on a CPU is bound by memory bandwidth: each token reads every weight once, so bytes per weight
set the speed. Int8 weights read a quarter of float32's bytes. The matmul runs on torch's own weight-only int8
kernel, `torch._weight_int8pack_mm` (int8 weight [N, K] x per-channel scale [N], dequantized in registers), with
bfloat16 activations where the CPU has bf16 units: measured on 2 EPYC cores (AVX-512 BF16), the SmolLM2-135M LM
head (576 -> 49,152) at batch 1 took 3.8 ms there against 8.7 ms in float32, 16 ms through
`torch.ao.quantization.quantize_dynamic` (per-channel) and 24 ms through the same kernel fed float32 activations.

Only `nn.Linear` layers of the LLM are quantized (decoder layers, xattn blocks, LM head); the embedding table
(a gather, cheap per token), the vision tower and the projector (run once per image) stay as they are. A tied
LM head gets its own int8 copy; the input embedding keeps the float table.

A quantized directory (`minillava quantize`) is a normal minillava directory (its llm/ holds the dequantized
float weights, so any loader reads it) plus the int8 weights and scales in `quantized.safetensors` and
`quantization.json` naming the scheme; `load` swaps the stored int8 layers in without quantizing again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

SCHEMES = ("none", "int8")
QUANT_CONFIG = "quantization.json"
QUANT_WEIGHTS = "quantized.safetensors"


def parse_scheme(name: str | None) -> str:
    """None | "none" | "int8" -> the scheme; anything else is a one-line ValueError."""
    scheme = "none" if name is None else name
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {name!r}; use one of {', '.join(SCHEMES)}")
    return scheme


def _kernel_fits(in_features: int) -> bool:
    # torch's CPU kernel (2.13) returns garbage or crashes unless K is a multiple of 16 and at least 32
    return in_features % 16 == 0 and in_features >= 32


def compute_dtype(device: torch.device) -> torch.dtype:
    """The activation dtype fed to the int8 kernel: bf16 where the hardware has it (the fast kernel path)."""
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


class Int8Linear(nn.Module):
    """y = x @ (q * scale[:, None]).T + bias, q int8 [out, in], scale per output channel (symmetric, no zero point).

    `weight_int8` and `scale` are buffers (nothing here trains). Where the kernel does not fit the shape (or the
    CPU lacks bf16), the weight is dequantized on the fly: correct, not faster than float.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.act_dtype: torch.dtype | None = None  # resolved on the first call, from the device
        self._scale_act: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # per output channel, symmetric
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype)
        layer.weight_int8.copy_(q)
        layer.scale.copy_(scale)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer.to(linear.weight.device)

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_dtype is None or self._scale_act is None or self._scale_act.device != x.device:
            self.act_dtype = compute_dtype(x.device)
            self._scale_act = self.scale.to(self.act_dtype)
        shape = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        if _kernel_fits(self.in_features) and self.act_dtype != torch.float32:
            y = torch._weight_int8pack_mm(flat.to(self.act_dtype).contiguous(), self.weight_int8, self._scale_act)
            y = y.to(x.dtype)
        else:
            y = nn.functional.linear(flat, self.dequantized().to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def _linear_names(llm: nn.Module) -> list[str]:
    return [name for name, m in llm.named_modules() if type(m) is nn.Linear or isinstance(m, Int8Linear)]


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def quantize_model(model: nn.Module, scheme: str | None = "int8") -> nn.Module:
    """Quantize the LLM's Linear layers of a MiniLlava (or of a bare LLM) in place; returns the model.

    "none" leaves it as it is; quantizing twice is a no-op. Inference only: the int8 layers have no gradients.
    """
    scheme = parse_scheme(scheme)
    if scheme == "none":
        return model
    llm = getattr(model, "llm", model)
    for name, module in list(llm.named_modules()):
        if type(module) is nn.Linear:
            _set(llm, name, Int8Linear.from_linear(module))
    model.quantization = scheme  # type: ignore[assignment]
    return model


def quantized_scheme(model: nn.Module) -> str:
    return getattr(model, "quantization", "none")


def is_quantized_dir(directory: str | Path) -> bool:
    return Path(directory, QUANT_CONFIG).exists()


def save_quantized(model: nn.Module, processor, directory: str | Path) -> Path:
    """Write a quantized MiniLlava: the normal directory plus its int8 layers (safetensors, never pickle)."""
    from minillava.model import MiniLlava

    if not isinstance(model, MiniLlava):
        raise ValueError("save_quantized needs a MiniLlava")
    scheme = quantized_scheme(model)
    if scheme == "none":
        raise ValueError("the model is not quantized: call quantize_model(model, 'int8') first")
    directory = Path(directory)
    llm = model.llm
    names = [n for n, m in llm.named_modules() if isinstance(m, Int8Linear)]
    int8 = {n: llm.get_submodule(n) for n in names}
    # llm/ gets float Linear layers holding the dequantized weights: transformers' save needs them, and the
    # directory then also loads as a plain float model that computes what the int8 one does
    for n, q in int8.items():
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=q.weight_int8.device)
        lin.weight = nn.Parameter(q.dequantized().to(q.bias.dtype if q.bias is not None else model.dtype))
        if q.bias is not None:
            lin.bias = nn.Parameter(q.bias.clone())
        _set(llm, n, lin)
    try:
        model.save_pretrained(directory, processor)
    finally:
        for n, q in int8.items():
            _set(llm, n, q)
    tensors: dict[str, torch.Tensor] = {}
    for n, q in int8.items():
        tensors[f"{n}.weight_int8"] = q.weight_int8.contiguous().cpu()
        tensors[f"{n}.scale"] = q.scale.contiguous().cpu()
        if q.bias is not None:
            tensors[f"{n}.bias"] = q.bias.contiguous().cpu()
    save_file(tensors, directory / QUANT_WEIGHTS)
    meta = {"scheme": scheme, "granularity": "per-output-channel", "symmetric": True, "layers": names}
    (directory / QUANT_CONFIG).write_text(json.dumps(meta, indent=2))
    return directory


def load_quantized_weights(model: nn.Module, directory: str | Path) -> nn.Module:
    """Swap in the stored int8 layers of a quantized directory (no re-quantizing)."""
    directory = Path(directory)
    meta = json.loads((directory / QUANT_CONFIG).read_text())
    scheme = parse_scheme(meta.get("scheme"))
    state = load_file(directory / QUANT_WEIGHTS)
    llm = model.llm
    for n in meta["layers"]:
        q8 = state.get(f"{n}.weight_int8")
        if q8 is None:
            raise ValueError(f"{directory / QUANT_WEIGHTS}: no weights for layer {n!r}")
        bias = state.get(f"{n}.bias")
        old = llm.get_submodule(n)
        dtype = old.weight.dtype if isinstance(old, nn.Linear) else torch.float32
        layer = Int8Linear(q8.shape[1], q8.shape[0], bias is not None, dtype)
        layer.weight_int8.copy_(q8)
        layer.scale.copy_(state[f"{n}.scale"])
        if bias is not None:
            layer.bias.copy_(bias)
        _set(llm, n, layer.to(model.device))
    model.quantization = scheme  # type: ignore[assignment]
    return model


def load(
    directory: str, dtype: str = "float32", device: str | None = None, quantize: str | None = None
) -> tuple[nn.Module, object]:
    """`minillava.load`, then int8: the stored weights of a quantized directory, or `quantize` applied now."""
    import minillava

    scheme = parse_scheme(quantize)
    model, processor = minillava.load(directory, dtype, device)
    return quantize_loaded(model, directory, scheme), processor


def quantize_loaded(model: nn.Module, directory: str | Path, scheme: str | None) -> nn.Module:
    """A model just loaded from `directory`: its stored int8 layers if the directory is quantized, else `scheme`
    applied now."""
    if is_quantized_dir(directory):
        return load_quantized_weights(model, directory)
    return quantize_model(model, scheme)


def quantize_dir(source: str, out: str | Path, scheme: str = "int8", dtype: str = "float32") -> Path:
    """`minillava quantize`: load SOURCE, quantize, save to OUT."""
    if parse_scheme(scheme) == "none":
        raise ValueError("--scheme none: nothing to quantize")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty")
    if is_quantized_dir(source):
        raise ValueError(f"{source} is already quantized")
    model, processor = load(source, dtype, "cpu")
    quantize_model(model, scheme)
    if out.exists():
        shutil.rmtree(out)
    return save_quantized(model, processor, out)
