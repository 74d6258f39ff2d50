"""TrainConfig: one dataclass, filled from a YAML file and then from command-line overrides."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("align", "instruct")
# see strategy.py
STRATEGIES = ("auto", "ddp", "fsdp-full-shard", "fsdp-shard-grad-op", "deepspeed-zero2", "deepspeed-zero3")
STAGE_DEFAULTS = {  # LLaVA-1.5's published hyperparameters
    "align": {"lr": 1e-3, "template": "plain"},
    "instruct": {"lr": 2e-5},
    "lora": {"lr": 2e-4, "projector_lr": 2e-5},
}


@dataclass
class TrainConfig:
    # model: start from a saved minillava directory, or assemble from two sources (fresh projector)
    model: str | None = None
    vision: str | None = None
    llm: str | None = None
    projector: str = "mlp2x_gelu"
    template: str | None = None  # None: `plain` for align, the model's template for instruct
    # data
    data: list[str] = field(default_factory=list)
    image_root: str | None = None
    allow_outside_image_root: bool = False  # use image paths resolving outside image_root (default: bad sample)
    data_format: str = "auto"
    max_length: int | None = None
    truncate: bool = False
    on_bad_sample: str = "error"  # error | skip
    num_workers: int = 2
    group_by_length: bool = True
    # pack samples into batch_size rows of at most max_tokens_per_batch tokens (default: max_length), as many a
    # micro-batch as fit (sampler.TokenBudgetSampler), with per-sample (block-diagonal causal) attention and
    # positions restarting per sample: data/packing.py
    packing: bool = False
    max_tokens_per_batch: int | None = None
    feature_cache: str | None = None
    # what trains
    stage: str = "align"
    lora: bool = False
    qlora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] | str = "all-linear"
    lora_layers: int | None = None  # LoRA on the last N decoder layers only (None: all)
    # instruct with the projector frozen (e.g. after a word-space warm start): with lora_layers, the backward
    # pass then stops at the lowest adapted layer
    freeze_projector: bool = False
    # text-only samples learn the base LLM's next-token distribution (KL, adapters switched off) instead of their
    # answer tokens: keeps what the LLM knew (train/distill.py); LoRA/QLoRA only
    distill_text: bool = False
    # a distilled position's KL counts this many answer tokens' cross-entropy: text-only batches (the sampler groups
    # by modality) have small KL gradients beside the image batches', so the pull back to the base is weak at 1
    distill_weight: float = 1.0
    # Gaussian noise on each image token while training, its std this fraction of the token's RMS: the LLM learns
    # to take the answer's kind from the question when the image tokens are imprecise (pictures unlike training's)
    image_token_noise: float = 0.0
    tune_vision: bool = False
    # fit the projector's input standardisation to N images' features (spread over the data) before step 0
    standardize_features: bool = False
    feature_stats_images: int = 256
    # pre-align a fresh projector with the LLM's word embeddings for N steps before step 0 (no LLM forward)
    word_warmup_steps: int = 0
    word_warmup_objective: str = "words"  # words | caption (see warmstart.py)
    # its own rate: a fresh projector alone, nothing else moves (the run's projector_lr is small beside LLM steps)
    word_warmup_lr: float = 1e-3
    # images it reads (spread evenly over the data), their features held in memory: ~100 kB each for DINOv2-S at
    # 112 px, 2.4 MB for CLIP-L/14 at 336 px
    word_warmup_images: int = 2048
    # optimisation
    out: str = "runs/minillava"
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 4  # per device, per micro-batch
    grad_accum: int = 1
    lr: float | None = None  # None: the stage's default
    projector_lr: float | None = None
    vision_lr: float = 2e-6
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    scheduler: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.03
    max_grad_norm: float | None = 1.0
    # stop once the gradient norm is 0 (or not finite) this many optimizer steps in a row: a collapsed run
    # (e.g. an absurd LR) otherwise trains on silently with its loss pinned; 0 disables the check
    collapse_steps: int = 5
    precision: str = "auto"  # auto (bf16 where it beats fp32: runtime.fast_bfloat16) | bf16 | fp16 (CUDA) | fp32
    frozen_bf16: bool = False  # store fully frozen modules (vision tower; LLM in align) in bfloat16 (bf16 runs only)
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile each LLM decoder layer (fuses norms and activations; see runtime.py)
    device: str = "auto"
    strategy: str = "auto"  # auto (what `accelerate launch` asked for, else ddp) | ddp | fsdp-full-shard | ...
    seed: int = 0
    # checkpoints and records
    save_every: int | None = None
    keep_last: int = 2
    resume: str | None = None  # "latest" or a checkpoint directory
    # resume even though data / batch size / seed ... differ from the checkpoint's (the data position is then reused
    # on other batches: the continued run is not the one that was saved)
    resume_changed: bool = False
    # a fresh run into an OUT that holds an earlier run's records: replace them (without it, such a run is refused)
    overwrite: bool = False
    merge_lora: bool = True  # on export; False writes the base model + `lora_adapter/`
    log_every: int = 1
    progress: bool = True
    plot: bool = True
    tensorboard: bool = False
    halt_at_step: int | None = None  # testing: stop like a crash after this step (no final save)

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        self.adam_betas = tuple(self.adam_betas)

    # ---- derived ----------------------------------------------------------------------------------
    def validate(self) -> None:
        """Coerce every option to its declared type, then check ranges and combinations (ValueError, one line)."""
        for name in FIELDS:
            setattr(self, name, check_option(name, getattr(self, name)))
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; use one of {', '.join(STAGES)}")
        if not self.data:
            raise ValueError("no training data: give --data FILE (LLaVA JSON/JSONL, COCO captions, caption JSONL/CSV)")
        if self.model is None and (self.vision is None or self.llm is None):
            raise ValueError("give --model DIR (a saved minillava model) or both --vision and --llm")
        if self.model is not None and (self.vision or self.llm):
            raise ValueError("give either --model or --vision/--llm, not both")
        if (self.lora or self.qlora) and self.stage == "align":
            raise ValueError("--lora/--qlora train the LLM: use --stage instruct (align trains the projector only)")
        if self.lora_layers is not None and (not (self.lora or self.qlora) or self.lora_layers < 1):
            raise ValueError("--lora-layers N needs --lora or --qlora and N >= 1")
        if self.distill_text and not self.use_lora:
            raise ValueError("--distill-text learns from the LLM with its adapters off: give --lora or --qlora")
        if self.distill_text and self.packing:
            raise ValueError("--distill-text picks text-only rows, --packing mixes samples in a row: give one of them")
        if self.distill_weight <= 0:
            raise ValueError(f"--distill-weight must be more than 0, got {self.distill_weight}")
        if not self.image_token_noise >= 0:
            raise ValueError(f"--image-token-noise must be 0 or more, got {self.image_token_noise}")
        if self.max_tokens_per_batch is not None and not self.packing:
            raise ValueError("--max-tokens-per-batch sizes packed rows: give it with --packing")
        if self.freeze_projector and self.stage != "instruct":
            raise ValueError("--freeze-projector: the align stage trains nothing but the projector")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {self.precision!r}")
        if self.scheduler not in ("cosine", "linear", "constant"):
            raise ValueError(f"scheduler must be cosine, linear or constant, got {self.scheduler!r}")
        if self.word_warmup_objective not in ("words", "caption"):
            raise ValueError(f"word_warmup_objective must be words or caption, got {self.word_warmup_objective!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {self.on_bad_sample!r}")
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"data_format must be one of {', '.join(DATA_FORMATS)}, got {self.data_format!r}")
        if self.resume is not None and self.overwrite:
            raise ValueError("--resume continues the run in OUT, --overwrite replaces it: give one of them")

    @property
    def use_lora(self) -> bool:
        return self.lora or self.qlora

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return STAGE_DEFAULTS["lora" if self.use_lora else self.stage]["lr"]

    def resolved_projector_lr(self) -> float:
        if self.projector_lr is not None:
            return self.projector_lr
        return STAGE_DEFAULTS["lora"]["projector_lr"] if self.use_lora else self.resolved_lr()

    def resolved_template(self, model_template: str) -> str:
        if self.template:
            return self.template
        return "plain" if self.stage == "align" else model_template

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
TYPES = typing.get_type_hints(TrainConfig)  # the annotations are strings (__future__ annotations): resolve them
DATA_FORMATS = ("auto", "llava", "coco", "captions")


# ---- option types and ranges ------------------------------------------------------------------------
# A YAML file types its values by their look, not by the option: PyYAML reads `lr: 1e-3` as the string
# "1e-3" (YAML 1.1 wants a dot in a float), and `max_steps: "two"` or `batch_size: 4.5` would otherwise reach
# the scheduler or the sampler and fail there with a traceback. Each option is checked against its declared type.


def _show(value: Any) -> str:
    return "null" if value is None else repr(value)


def _to_int(value: Any, name: str) -> int:
    number: Any = value
    if isinstance(value, str):
        number = None
        with contextlib.suppress(ValueError):
            number = float(value)  # "1e3" (PyYAML leaves it a string)
        with contextlib.suppress(ValueError):
            number = int(value)  # exact, where float would round past 2**53
    if isinstance(number, int) and not isinstance(number, bool):
        return number
    if isinstance(number, float) and number.is_integer():
        return int(number)
    raise ValueError(f"{name}: expected an integer, got {_show(value)}")


def _to_float(value: Any, name: str) -> float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)  # "1e-3": what PyYAML makes of an exponent without a dot
    if number is None or not math.isfinite(number):
        raise ValueError(f"{name}: expected a {'finite ' if number is not None else ''}number, got {_show(value)}")
    return number


def _to_bool(value: Any, name: str) -> bool:
    # no truthiness: bool("no") is True; YAML's bare yes/no/true/false already arrive as booleans
    if isinstance(value, bool):
        return value
    raise ValueError(f"{name}: expected true or false, got {_show(value)}")


def _to_str(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):  # Path objects from Python callers
        return os.fspath(value)
    raise ValueError(f"{name}: expected a string, got {_show(value)}")


SCALARS: dict[type, Callable[[Any, str], Any]] = {int: _to_int, float: _to_float, bool: _to_bool, str: _to_str}


def coerce(kind: Any, value: Any, name: str) -> Any:
    """`value` as the type `kind` (int, float, bool, str, X | None, list[X], tuple[X, Y], unions), or ValueError."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        # plain types first: `lora_targets: all-linear` stays the string, not a list of one
        for member in sorted((a for a in args if a is not type(None)), key=lambda a: typing.get_origin(a) is not None):
            try:
                return coerce(member, value, name)
            except ValueError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        if isinstance(value, str):  # `data: a.json` means a list of one
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: expected a list, got {_show(value)}")
        return [coerce(args[0], v, name) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{name}: expected a list of {len(args)} values, got {_show(value)}")
        return tuple(coerce(a, v, name) for a, v in zip(args, value, strict=True))
    return SCALARS[kind](value, name)


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f"must be at least {low:g}"


_POSITIVE = (lambda v: v > 0), "must be positive"
_NON_NEGATIVE = (lambda v: v >= 0), "must not be negative"
_FRACTION = (lambda v: 0 <= v <= 1), "must be between 0 and 1"
_PROBABILITY = (lambda v: 0 <= v < 1), "must be at least 0 and below 1"
COUNTS = ("max_length", "max_tokens_per_batch", "lora_r", "lora_layers", "feature_stats_images",
          "word_warmup_images", "max_steps", "batch_size", "grad_accum", "save_every", "keep_last", "log_every",
          "halt_at_step")  # fmt: skip
NON_NEGATIVE = ("num_workers", "word_warmup_steps", "word_warmup_lr", "lr", "projector_lr", "vision_lr",
                "weight_decay", "max_grad_norm", "seed", "collapse_steps")  # fmt: skip
# the range of each numeric option (None, where an option allows it, always passes)
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(COUNTS, _at_least(1)),
    **dict.fromkeys(NON_NEGATIVE, _NON_NEGATIVE),
    "lora_alpha": _POSITIVE,
    "epochs": _POSITIVE,
    "adam_eps": _POSITIVE,
    "warmup_ratio": _FRACTION,
    "lora_dropout": _PROBABILITY,
}


def check_option(name: str, value: Any) -> Any:
    """Option `name`'s value as its declared type and within its range; ValueError naming the option otherwise."""
    if name == "resume" and isinstance(value, bool):  # `resume: true` in a YAML file: the newest checkpoint
        value = "latest" if value else None
    value = coerce(TYPES[name], value, name)
    if name == "adam_betas" and not all(0 <= b < 1 for b in value):
        raise ValueError(f"adam_betas must each be at least 0 and below 1, got {list(value)}")
    check = RANGES.get(name)
    if check is not None and value is not None and not check[0](value):
        raise ValueError(f"{name} {check[1]}, got {value!r}")
    return value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """YAML (or JSON) file, then overrides (None values are ignored). Unknown keys are an error."""
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise OSError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config must be a mapping of option: value")
        unknown = sorted(set(loaded) - set(FIELDS))
        if unknown:
            raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}")
        for key, value in loaded.items():
            try:
                values[key] = check_option(key, value)
            except ValueError as e:  # name the file: the merged config no longer knows where a value came from
                raise ValueError(f"{path}: {e}") from None
    for key, value in (overrides or {}).items():
        if key not in FIELDS:
            raise ValueError(f"unknown option {key!r}")
        if value is not None:
            values[key] = value
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg
