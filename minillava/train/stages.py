"""What trains: `freeze(model, stage)` and LoRA on the LLM's linear layers (never the vision tower).

- align:    projector only (vision and LLM frozen); "projector" includes AnyRes's image_newline throughout
- instruct: projector + LLM; with LoRA, projector + LoRA adapters on the LLM's linear layers
- freeze_projector (instruct only): the projector stays as it is (e.g. after a word-space warm start); with
  LoRA on the last N layers only, nothing below them trains and backward stops there
- tune_vision: additionally the vision tower (its own learning rate)
- fusion xattn: the gated cross-attention blocks train with the projector (the resampler) in both stages,
  fully (never through LoRA) and at the projector's learning rate
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minillava.fusion import xattn_blocks
from minillava.model import MiniLlava

log = logging.getLogger("minillava.train")
LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")  # transformers decoders: model.layers.<i>.self_attn.q_proj
ADAPTER_DIR = "lora_adapter"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "lora_config.json"


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: list[str] | str = "all-linear"  # or leaf names, e.g. ["q_proj", "v_proj"]
    # only the last N decoder layers (None: all): when nothing below them trains, backward stops there
    last_layers: int | None = None
    modules: list[str] = field(default_factory=list)  # resolved full names inside model.llm


def llm_linear_names(
    llm: nn.Module, targets: list[str] | str = "all-linear", last_layers: int | None = None
) -> list[str]:
    """Full names of the LLM's nn.Linear layers to adapt: all of them except the output head and xattn blocks,
    or those of the last `last_layers` decoder layers."""
    head = llm.get_output_embeddings() if hasattr(llm, "get_output_embeddings") else None
    xattn = {id(m) for m in xattn_blocks(llm).modules()}  # new weights: they train fully, never through LoRA
    names = []
    for name, module in llm.named_modules():
        if not isinstance(module, nn.Linear) or module is head or id(module) in xattn:
            continue
        if targets == "all-linear" or name.rsplit(".", 1)[-1] in targets:
            names.append(name)
    if last_layers is not None:
        layers = llm.config.num_hidden_layers
        names = [n for n in names if (m := LAYER_INDEX.search(n)) and int(m.group(1)) >= layers - last_layers]
    if not names:
        where = f" in its last {last_layers} decoder layers" if last_layers is not None else ""
        raise ValueError(f"no linear layers of the LLM match LoRA targets {targets!r}{where}")
    return names


class LoraDropout(nn.Dropout):
    """LoRA's input dropout with a mask drawn a few times faster on a CPU in eager mode; elsewhere (CUDA, and
    compiled code, whose own generator is fast) it is nn.Dropout.

    torch draws a CPU dropout mask one element at a time from a serial generator (~6 ns each on 2 cores): with
    LLaVA's lora_dropout 0.05 a LoRA step of a SmolLM2-135M-shaped LLM spent a quarter of its time there. This
    draws 64 random bits at a time from the same generator (seeded and checkpointed like any torch draw) and
    cuts them into four 16-bit uniforms. An element is kept when its uniform clears p rounded to 1/65536, and
    kept elements are scaled by that rounded rate, so the output's expectation is exactly the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, dropped = x.numel(), round(self.p * 65536)
        if not self.training or not 0 < dropped < 65536 or x.device.type != "cpu" or torch.compiler.is_compiling():
            return super().forward(x)  # also a p too close to 0 or 1 for 16 bits to tell
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # full 64-bit range
        uniform = bits.view(torch.int16)[:n].view(x.shape)  # in [-32768, 32767]
        return torch.where(uniform >= dropped - 32768, x, 0).mul(65536 / (65536 - dropped))


def add_lora(model: MiniLlava, settings: LoraSettings) -> LoraSettings:
    """Inject LoRA adapters into `model.llm` in place: it stays the transformers model."""
    from peft import LoraConfig, inject_adapter_in_model

    modules = settings.modules or llm_linear_names(model.llm, settings.targets, settings.last_layers)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=modules)
    model.llm = inject_adapter_in_model(config, model.llm)
    for module in model.llm.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict):
            for name, dropout in dropouts.items():
                if type(dropout) is nn.Dropout:
                    dropouts[name] = LoraDropout(dropout.p)
    return replace(settings, modules=modules)


def keep_adapter_inputs(llm: nn.Module) -> None:
    """Under autocast, let each LoRA adapter take its input in the dtype it comes in: peft casts a bf16 input up to
    the adapter's float32, which autocast casts straight back for the matmul (two activation copies a layer and
    step for the same bf16 matmuls)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in llm.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def has_lora(model: MiniLlava) -> bool:
    return any("lora_" in n for n, _ in model.llm.named_parameters())


def merge_lora(model: MiniLlava) -> int:
    """Fold every LoRA adapter into its base weight and put the plain nn.Linear back. Returns the count."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.llm.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = model.llm.get_submodule(parent_name) if parent_name else model.llm
            setattr(parent, child, module.get_base_layer())
            merged += 1
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in model.llm.__dict__:
            delattr(model.llm, attr)
    return merged


def save_adapter(model: MiniLlava, settings: LoraSettings, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    weights = {n: p.detach().contiguous() for n, p in model.llm.named_parameters() if "lora_" in n}
    save_file(weights, directory / ADAPTER_WEIGHTS)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(asdict(settings), indent=2) + "\n")


def load_adapter(model: MiniLlava, directory: Path) -> LoraSettings:
    cfg_path = directory / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise OSError(f"{directory}: no LoRA adapter here (missing {ADAPTER_CONFIG})")
    settings = add_lora(model, LoraSettings(**json.loads(cfg_path.read_text())))
    weights = load_file(directory / ADAPTER_WEIGHTS)
    expected = {n for n, _ in model.llm.named_parameters() if "lora_" in n}
    if set(weights) != expected:
        raise ValueError(f"{directory}: adapter weights do not match the model ({len(weights)} vs {len(expected)})")
    model.llm.load_state_dict(weights, strict=False)
    return settings


def freeze(
    model: MiniLlava,
    stage: str,
    *,
    lora: LoraSettings | None = None,
    tune_vision: bool = False,
    freeze_projector: bool = False,
    log_fn: Callable[[str], None] | None = None,
) -> dict:
    """Set requires_grad for a stage, log exactly what trains, and return the parameter counts."""
    if stage not in ("align", "instruct"):
        raise ValueError(f"unknown stage {stage!r}; use align or instruct")
    if lora is not None and stage != "instruct":
        raise ValueError("LoRA adapts the LLM, which only trains in the instruct stage")
    if freeze_projector and stage != "instruct":
        raise ValueError("freeze_projector: the align stage trains nothing but the projector")
    say = log_fn or log.info
    model.requires_grad_(False)
    model.projector.requires_grad_(not freeze_projector)
    if model.anyres is not None:  # image_newline belongs to the bridge, like the projector
        model.anyres.requires_grad_(True)
    if stage == "instruct":
        if lora is not None:
            if not has_lora(model):
                lora = add_lora(model, lora)
            for n, p in model.llm.named_parameters():
                p.requires_grad_("lora_" in n)
        else:
            model.llm.requires_grad_(True)
    model.xattn.requires_grad_(True)
    if tune_vision:  # only what reaches the features: not the layers above select_layer, not the final norms
        for param in model.vision.parameters_in_use():
            param.requires_grad_(True)
    model.train()
    if not tune_vision:
        model.vision.eval()
    counts = model.parameter_counts()
    trainable = sum(c["trainable"] for c in counts.values())
    total = trainable + sum(c["frozen"] for c in counts.values())
    parts = ([] if freeze_projector else ["projector"]) + (["xattn blocks"] if len(model.xattn) else [])
    parts += ["LLM" + (" (LoRA adapters)" if lora else "")] if stage == "instruct" else []
    parts += ["vision tower"] if tune_vision else []
    say(f"stage {stage}: training {' + '.join(parts)}")
    for name, c in counts.items():
        state = "trains" if c["trainable"] else "frozen"
        say(f"  {name:<9} {state:<6} trainable {c['trainable']:>12,}  frozen {c['frozen']:>12,}")
    if lora is not None:
        where = f" (last {lora.last_layers} decoder layers)" if lora.last_layers else ""
        say(f"  LoRA r={lora.r} alpha={lora.alpha} dropout={lora.dropout} on {len(lora.modules)} LLM linear layers"
            + where)
    say(f"  total     trainable {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)")
    return {"modules": counts, "trainable": trainable, "total": total, "lora": asdict(lora) if lora else None}


def param_groups(model: MiniLlava, lr: float, projector_lr: float, vision_lr: float, weight_decay: float) -> list[dict]:
    """Optimizer groups: projector, LLM (full or LoRA), vision and xattn blocks (new weights, like the projector)
    each with their own lr; no decay on biases/norms."""
    groups = []
    parts = model.named_parts()
    lrs = {"projector": projector_lr, "llm": lr, "vision": vision_lr, "xattn": projector_lr, "anyres": projector_lr}
    for name, group_lr in lrs.items():
        decay, no_decay = [], []
        for n, p in parts.get(name, []):
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in n.lower() else decay).append(p)
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                groups.append({"params": params, "lr": group_lr, "weight_decay": wd, "name": name})
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    return groups


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
