"""The training loop: `train(config) -> summary`, as named phases over a few dataclasses of run state.

    start_run          options checked against this machine, OUT prepared                  -> Run
    setup_model        build/load, freeze(stage) [+ LoRA], resumed weights, device         -> Trainee
    build_data         feature cache, data set, batch sampler (grouped, or token-budget for --packing), steps -> Data
    prepare_projector  input standardisation, word-space warm start (before any LLM step)
    build_optimizer    strategy wrap, AdamW, warmup schedule (+ fp16 scaler), resumed      -> Optim
    open_metrics       metrics JSONL with a start/resume record
    run_steps          epochs -> run_epoch -> take_step -> train_step (grad_accum micro-batches, token-weighted
                       loss, clip, step, log) or skip_step; write_checkpoint every --save-every
    finish             final checkpoint, export a self-contained model directory (LoRA merged), curve, summary

The same code runs in one process or under `torchrun` / `accelerate launch` (DDP or FSDP2, see
strategy.py; gloo on CPU, NCCL on GPUs). The loss of a step is the mean over every supervised token of the
global batch, whatever the split over micro-batches and ranks, so 2 processes x batch 2 give the loss of
1 process x batch 4. The frozen tower's features come from features.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from minillava.config import ModelConfig, ProjectorConfig, VisionConfig
from minillava.data.dataset import Collator, SupervisedDataset, worker_count
from minillava.data.packing import check_fits
from minillava.data.sampler import GroupedBatchSampler, TokenBudgetSampler
from minillava.model import MiniLlava
from minillava.processor import IGNORE_INDEX, Processor
from minillava.runtime import compile_decoder_layers, fast_bfloat16
from minillava.train import checkpoint as ckpt
from minillava.train.cache import FeatureCache
from minillava.train.config import TrainConfig
from minillava.train.distill import text_teacher
from minillava.train.features import fit_feature_stats, open_feature_cache, vision_features_for
from minillava.train.kernels import attention_kernel, autocast_ctx
from minillava.train.metrics import MetricsWriter, plot_curves
from minillava.train.stages import (
    ADAPTER_DIR,
    LoraSettings,
    freeze,
    keep_adapter_inputs,
    merge_lora,
    param_groups,
    save_adapter,
)
from minillava.train.strategy import DDPStrategy, clip_grad_norm, make_strategy, resolve_strategy
from minillava.train.warmstart import word_space_warmstart

if TYPE_CHECKING:
    from tqdm.auto import tqdm

log = logging.getLogger("minillava.train")
MODEL_DIR = "model"
# What a run writes into OUT. A fresh run among an earlier run's files would mix the two: the old checkpoints
# outlive keep_last (and a later --resume picks the newest, whichever run it came from), and the old model/,
# summary.json and curve stay until the new run ends, or for good if it crashes.
RUN_RECORDS = ("checkpoints", MODEL_DIR, "metrics.jsonl", "train_config.json", "summary.json", "loss_curve.png",
               "tensorboard")  # fmt: skip


# ---- process group -----------------------------------------------------------------------------
class Dist:
    def __init__(self, group: bool = False) -> None:
        """`group`: a process group even for one process (a DeepSpeed engine needs one)."""
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        if (self.world > 1 or group) and not dist.is_initialized():
            backend = "gloo"
            if torch.cuda.is_available():  # NCCL for CUDA tensors; gloo for the CPU scalars of `sum`/`gather`
                torch.cuda.set_device(self.local_rank)
                backend = "cuda:nccl,cpu:gloo"
            if self.world == 1:  # no rendezvous to wait for: launched or not, an in-process store
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            else:
                dist.init_process_group(backend)
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


def pick_device(name: str, d: Dist) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{d.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available")
    if device.type == "cuda" and device.index is None:  # one GPU per rank
        device = torch.device(f"cuda:{d.local_rank}")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- model -------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig) -> tuple[MiniLlava, Processor]:
    if cfg.model is not None:
        if not Path(cfg.model).is_dir():
            raise OSError(f"{cfg.model}: model directory not found")
        return MiniLlava.from_pretrained(cfg.model)
    mc = ModelConfig(
        vision=VisionConfig(source=cfg.vision), projector=ProjectorConfig(name=cfg.projector), llm_source=cfg.llm
    )
    if cfg.vision.startswith("torchvision:"):
        mc.vision.backend = "torchvision"
    return MiniLlava.build(mc)


def check_qlora(cfg: TrainConfig, device: torch.device) -> None:
    if not cfg.qlora:
        return
    if device.type != "cuda":
        raise ValueError("--qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); on CPU use --lora instead")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError("--qlora needs bitsandbytes: pip install bitsandbytes") from e


def quantize_llm_4bit(model: MiniLlava) -> None:
    """QLoRA base: replace the LLM's linear layers (not the head) by bitsandbytes 4-bit NF4 layers (CUDA)."""
    import bitsandbytes as bnb

    head = model.llm.get_output_embeddings()
    for name, module in list(model.llm.named_modules()):
        if isinstance(module, nn.Linear) and module is not head:
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.bfloat16, quant_type="nf4")  # fmt: skip
            q.weight = bnb.nn.Params4bit(module.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            if module.bias is not None:
                q.bias = nn.Parameter(module.bias.data, requires_grad=False)
            parent_name, _, child = name.rpartition(".")
            setattr(model.llm.get_submodule(parent_name) if parent_name else model.llm, child, q)


def dequantize_llm_4bit(model: MiniLlava) -> None:
    """QLoRA export: each 4-bit layer back to an nn.Linear of its dequantized float32 weights, so that LoRA
    merges into it and the output is an ordinary checkpoint (the 4-bit layout has no place in it)."""
    import bitsandbytes as bnb

    for name, module in list(model.llm.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            plain.weight = nn.Parameter(weight, requires_grad=False)
            if module.bias is not None:
                plain.bias = nn.Parameter(module.bias.data.float(), requires_grad=False)
            parent_name, _, child = name.rpartition(".")
            setattr(model.llm.get_submodule(parent_name) if parent_name else model.llm, child, plain)


def noisy(tokens: torch.Tensor, scale: float) -> torch.Tensor:  # (..., D) image tokens
    """Each token plus Gaussian noise of std `scale` x the token's RMS (drawn from torch's seeded generator)."""
    rms = tokens.detach().float().pow(2).mean(-1, keepdim=True).sqrt()
    return tokens + (torch.randn_like(tokens, dtype=torch.float32) * rms * scale).to(tokens.dtype)


class TrainStep(nn.Module):
    """projector (+ vision when it trains) + LLM loss, in one forward so DDP sees every trainable part.

    A text-only micro-batch runs the same modules, in the same order, with gradients flowing along the same
    edges, as one with images: zero images through the tower (when it trains) and the projector, their
    (zero) sum added to the input embeddings where the splice would have written image tokens. DDP needs
    every trainable parameter in the graph; DeepSpeed ZeRO-3 records the forward and backward module order
    and re-checks it across ranks (a collective on that rank only) when it changes. Without the embedding
    edge, frozen input embeddings (LoRA, a frozen LLM) would not require grad in a text-only batch, and the
    first decoder layer's frozen modules would drop out of its backward.
    """

    def __init__(self, model: MiniLlava, tune_vision: bool, distill_text: bool = False,
                 image_token_noise: float = 0.0, distill_weight: float = 1.0) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self.tune_vision = tune_vision
        self.distill_text = distill_text  # text-only rows learn the base LLM's distribution (distill.py)
        self.distill_weight = distill_weight
        self.image_token_noise = image_token_noise  # std relative to each image token's RMS (config.py)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
        vision_features: torch.Tensor | None, pixel_values: torch.Tensor | None, image_sizes: torch.Tensor | None,
        image_counts: torch.Tensor | None = None,  # (B,) images per row: the splice checks each row's slots
        segment_ids: torch.Tensor | None = None,  # (B, T) --packing: each row's samples 1, 2, ...; 0 padding
    ) -> torch.Tensor:  # fmt: skip
        m = self.model
        soft = text_teacher(m, input_ids, attention_mask, labels, self.distill_weight) if self.distill_text else None
        if self.tune_vision and pixel_values is not None:
            vision_features = m.vision(pixel_values)
        if vision_features is not None:
            image_features = m.project(vision_features, image_sizes)
            if self.image_token_noise:
                image_features = noisy(image_features, self.image_token_noise)
            out = m(input_ids, attention_mask, labels=labels, image_features=image_features, return_logits=False,
                    image_sizes=image_sizes, image_counts=image_counts, segment_ids=segment_ids,
                    soft_targets=soft)  # fmt: skip
            return out.loss
        if self.tune_vision:  # zero images out of the tower: one dummy image's features, none of its rows
            size = m.vision.image_size
            dummy = torch.zeros(1, 3, size, size, device=input_ids.device, dtype=m.projector_dtype)
            features = m.vision(dummy)[:0]
        else:  # zero images of the tower's shape: every projector takes it
            rows, cols = m.vision.patch_grid
            patches = rows * cols + m.vision.extra_tokens
            features = torch.zeros(0, patches, m.vision.hidden_size, device=input_ids.device, dtype=m.projector_dtype)
        zero = m.projector(features.to(m.projector_dtype)).sum()
        if m.anyres is not None:
            zero = zero + m.anyres.image_newline.sum() * 0.0
        hook = m.llm.get_input_embeddings().register_forward_hook(lambda _m, _a, text: text + zero.to(text.dtype))
        try:
            out = m(input_ids, attention_mask, labels=labels, image_features=None, return_logits=False,
                    segment_ids=segment_ids, soft_targets=soft)
        finally:
            hook.remove()
        return out.loss


# ---- schedule ----------------------------------------------------------------------------------
def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return f


def make_optimizer(groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where the device has it (CUDA, CPU in torch >= 2.4), else foreach."""
    kw = dict(betas=cfg.adam_betas, eps=cfg.adam_eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kw)


# ---- step helpers ------------------------------------------------------------------------------
def empty_batch(pad_id: int) -> dict[str, Any]:
    """One token, nothing supervised: a rank whose samples were all skipped still runs forward and backward
    (the other ranks wait for its gradients) and adds zero to the loss and the gradients."""
    ids = torch.full((1, 1), pad_id)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, IGNORE_INDEX),
            "pixel_values": None, "image_sizes": None, "features": [], "num_samples": 0}  # fmt: skip


def skip_update(state: dict[str, Any], scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """A step with no sample left (all skipped as bad): no forward, backward or optimizer step, since AdamW would
    still move the weights on zero gradients (momentum, weight decay). The step still counts, and the schedule
    advances with it, so the data position, the LR curve, --max-steps and a resume stay where they would be."""
    with warnings.catch_warnings():  # torch warns when the very first step is one without optimizer.step()
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        scheduler.step()
    state["step"] += 1
    state["step_in_epoch"] += 1


# a gradient norm this far below the run's peak is dead too: saturated fp32 softmaxes leave ~1e-9, not 0
COLLAPSE_RATIO = 1e-6


def is_dead(grad_norm: float, peak: float) -> bool:
    return not math.isfinite(grad_norm) or grad_norm <= COLLAPSE_RATIO * peak


def collapse_check(limit: int, run: int, grad_norm: float | None, peak: float, step: int, loss: float) -> int:
    """The new count of consecutive dead steps; raises once it reaches `limit` (0: never). A step with
    supervised tokens and a gradient norm of 0 (or not finite) moves nothing: after a few in a row the run
    has collapsed (saturated activations, e.g. from an absurd LR) and would otherwise finish silently."""
    if not limit or grad_norm is None:
        return 0
    run = run + 1 if is_dead(grad_norm, peak) else 0
    if run >= limit:
        shown = "0" if math.isfinite(grad_norm) else "not finite"
        raise FloatingPointError(
            f"training collapsed at step {step}: gradient norm {shown} for {limit} steps (loss {loss:.4f}, last "
            f"norm {grad_norm:.1e}); lower --lr"
        )
    return run


# ---- the loop ----------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict[str, Any]:
    cfg.validate()
    d = Dist(group=resolve_strategy(cfg.strategy, os.environ).startswith("deepspeed"))
    try:
        summary = _train(cfg, d)
    except BaseException:
        d.close()  # no barrier on the way out of a failure: the other ranks may never reach one
        raise
    d.barrier()  # every rank done with its collectives before any tears the group down
    d.close()
    return summary


def claim_out_dir(out: Path, cfg: TrainConfig, main: bool) -> None:
    """A fresh run needs an OUT without an earlier run's records: refuse, or with --overwrite delete them.

    Every rank checks (so all of them refuse together, none waits at a barrier); only the main one deletes."""
    if cfg.resume is not None:
        return
    found = [name for name in RUN_RECORDS if (out / name).exists()]
    if not found:
        return
    if not cfg.overwrite:
        raise FileExistsError(f"{out}: holds an earlier run ({', '.join(found)}); give --resume to continue it, "
                              "--overwrite to replace it, or another --out")  # fmt: skip
    if main:
        for name in found:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        log.info(f"--overwrite: deleted the earlier run's {', '.join(found)} in {out}")


@dataclass
class Run:
    """What every phase reads and none changes."""

    cfg: TrainConfig
    d: Dist
    out: Path
    device: torch.device
    strategy: DDPStrategy
    say: Callable[[str], None]  # log.info on the main rank, silent on the others


@dataclass
class Trainee:
    """The model being trained, and where a resumed run left it."""

    model: MiniLlava
    processor: Processor  # the model's own: the exported directory saves it
    train_processor: Processor  # with this run's chat template and max length
    lora: LoraSettings | None
    freeze_info: dict[str, Any]  # freeze()'s account: trainable and total parameter counts, the LoRA settings
    # the position in the data, which every checkpoint keeps and a resume restores
    state: dict[str, Any] = field(default_factory=lambda: {"step": 0, "epoch": 0, "step_in_epoch": 0, "skipped": [],
                                                           "tokens": 0, "samples": 0})  # fmt: skip
    resume_dir: Path | None = None
    resume_state: dict[str, Any] | None = None  # the checkpoint's optimizer, scheduler, scaler and RNG states


@dataclass
class Data:
    """The training data, and the number of steps it makes."""

    dataset: SupervisedDataset
    sampler: GroupedBatchSampler | TokenBudgetSampler  # this rank's micro-batches, grad_accum per step
    cache: FeatureCache | None
    steps_per_epoch: int  # the first epoch's (--packing: later epochs may differ by a step or so)
    total_steps: int
    warmup: int  # warmup steps of the LR schedule
    pack_budget: int | None = None  # --packing: tokens per packed row


@dataclass
class Optim:
    """What takes a step: the wrapped loss module, AdamW, the LR schedule, the fp16 loss scaler."""

    step_module: nn.Module  # TrainStep as the strategy wraps it: a DDP/FSDP module, or the DeepSpeed engine
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None  # fp16 only


@dataclass
class Tally:
    """What the step loop counts as it goes: the summary's numbers, and what the failure checks compare with."""

    last_ckpt: Path | None  # the newest checkpoint known good: finite weights, and the step after it was alive
    unproven_ckpt: Path | None = None  # saved after the last step; good if the next step's gradient is alive
    losses: list[float] = field(default_factory=list)
    cache_stats: dict[str, int] = field(default_factory=lambda: {"hits": 0, "misses": 0})
    zero_grad_run: int = 0  # consecutive optimizer steps whose gradient norm was 0 or not finite
    peak_grad_norm: float = 0.0  # the largest finite one so far: what "0" is measured against
    tokens: float = 0  # global tokens and samples of this process's steps (not those before a resume)
    slots: float = 0  # token positions computed, padding included: 1 - tokens / slots is the padding waste
    samples: float = 0
    skipped_steps: int = 0  # steps whose every sample was skipped: counted, but no update
    halted: bool = False  # stopped at --halt-at-step: no final checkpoint, no export


@dataclass
class Session:
    """One run's phases put together: what the step loop, the checkpoints and the summary read and update."""

    run: Run
    trainee: Trainee
    data: Data
    optim: Optim
    metrics: MetricsWriter | None  # main rank only
    warmstart: dict[str, Any] | None  # the word-space warm start's account, when one ran
    tally: Tally
    progress: tqdm | None  # main rank with --progress


def _train(cfg: TrainConfig, d: Dist) -> dict[str, Any]:
    run = start_run(cfg, d)
    trainee = setup_model(run)
    data = build_data(run, trainee)
    warmstart = prepare_projector(run, trainee, data)
    optim = build_optimizer(run, trainee, data)
    run.say(f"{len(data.dataset)} samples, {data.sampler.describe()}, {data.steps_per_epoch} steps/epoch, "
            f"{data.total_steps} steps, warmup {data.warmup}")  # fmt: skip
    metrics = open_metrics(run, trainee)
    if trainee.resume_state is not None:
        ckpt.set_rng_state(trainee.resume_state["rng"])  # last: nothing above may consume random numbers after this
    progress = open_progress(run, trainee.state["step"], data.total_steps)
    tally = Tally(last_ckpt=trainee.resume_dir or ckpt.latest_checkpoint(run.out))
    s = Session(run, trainee, data, optim, metrics, warmstart, tally, progress)
    return finish(s, run_steps(s))


# ---- setup phases ------------------------------------------------------------------------------
def start_run(cfg: TrainConfig, d: Dist) -> Run:
    """Check the options against this machine (device, strategy, precision) and prepare OUT."""
    say = log.info if d.main else (lambda *_: None)
    out = Path(cfg.out).expanduser()
    claim_out_dir(out, cfg, d.main)
    device = pick_device(cfg.device, d)
    check_qlora(cfg, device)
    strategy = make_strategy(resolve_strategy(cfg.strategy, os.environ), d.world, device)
    if strategy.name != "ddp" and (cfg.qlora or cfg.precision == "fp16"):
        raise ValueError(f"--strategy {strategy.name} supports neither --qlora nor fp16: use ddp, or bf16")
    say(f"{d.world} process(es), strategy {strategy.name}")
    if cfg.precision == "auto":  # every rank measures; bf16 only if all of them found it faster
        cfg.precision = "bf16" if all(d.gather(fast_bfloat16(device))) else "fp32"
        say(f"precision auto -> {cfg.precision} on {device}")
    if cfg.compile and (strategy.name != "ddp" or cfg.qlora):
        raise ValueError(f"--compile is tested with one process or DDP, without QLoRA; not with --strategy "
                         f"{strategy.name}{' and --qlora' if cfg.qlora else ''}")
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; on CPU use bf16 or fp32")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_partial(out)
    d.barrier()
    return Run(cfg, d, out, device, strategy, say)


def setup_model(run: Run) -> Trainee:
    """Build (or load) the model, freeze all but what this stage trains (+ LoRA, QLoRA), take a resumed
    checkpoint's trainable weights and data position, and place the model on the device."""
    cfg, say = run.cfg, run.say
    warn = log.warning if run.d.main else (lambda *_: None)
    resumed = ckpt.load_resume(run.out, cfg.resume, warn, None if cfg.resume_changed else cfg.to_dict())
    if cfg.resume and resumed is None:
        say(f"--resume: no checkpoint under {run.out}; starting from scratch")
    seed_everything(cfg.seed)
    model, processor = build_model(cfg)
    train_processor = Processor(
        processor.tokenizer, processor.image_transform, processor.tokens_per_image, processor.image_token,
        cfg.resolved_template(processor.template_name), cfg.max_length or processor.max_length, processor.max_pixels,
        processor.anyres,
    )  # fmt: skip
    if cfg.qlora:
        quantize_llm_4bit(model)
    lora = LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.lora_layers) \
        if cfg.use_lora else None  # fmt: skip
    freeze_info = freeze(model, cfg.stage, lora=lora, tune_vision=cfg.tune_vision,
                         freeze_projector=cfg.freeze_projector, log_fn=say)  # fmt: skip
    lora = LoraSettings(**freeze_info["lora"]) if freeze_info["lora"] else None
    trainee = Trainee(model, processor, train_processor, lora, freeze_info)
    if resumed is not None:
        load_resumed(trainee, *resumed)
        say(f"resuming from {trainee.resume_dir} at step {trainee.state['step']}")
    place_model(run, model)
    return trainee


def load_resumed(trainee: Trainee, resume_dir: Path, weights: dict[str, torch.Tensor],
                 resume_state: dict[str, Any]) -> None:  # fmt: skip
    """A checkpoint's trainable weights into the model, its data position into the state; the rest of what it
    holds (optimizer, scheduler, RNG) waits in `resume_state` for the phases that own those."""
    expected = {n for n, p in trainee.model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        raise ValueError(
            f"{resume_dir}: its trainable parameters do not match this run's (different stage, LoRA or "
            f"model?): {len(set(weights) ^ expected)} names differ"
        )
    trainee.model.load_state_dict(weights, strict=False)
    trainee.state.update({k: resume_state[k] for k in trainee.state})
    trainee.resume_dir, trainee.resume_state = resume_dir, resume_state


def place_model(run: Run, model: MiniLlava) -> None:
    """Storage precision of the frozen parts, the device, gradient checkpointing, torch.compile."""
    cfg = run.cfg
    if cfg.frozen_bf16 and cfg.precision == "bf16":  # bf16 storage only pays where bf16 kernels are fast
        if not cfg.tune_vision:
            model.vision.to(torch.bfloat16)
        if cfg.stage == "align":
            model.llm.to(torch.bfloat16)
            model.xattn.float()  # the cross-attention blocks live inside the LLM but train: float32 masters
    if cfg.use_lora and cfg.precision != "fp32":
        keep_adapter_inputs(model.llm)
    model.to(run.device)
    if cfg.grad_checkpointing and cfg.stage == "instruct":
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.use_lora:
            model.llm.enable_input_require_grads()
    if cfg.compile:
        run.say(f"compiling {compile_decoder_layers(model.llm)} LLM decoder layers (torch.compile: one graph per "
                f"kind of layer, e.g. with and without LoRA)")  # fmt: skip


def build_data(run: Run, trainee: Trainee) -> Data:
    """The feature cache, the data set, this rank's batch sampler, and the step counts they give."""
    cfg, d = run.cfg, run.d
    cache = open_feature_cache(cfg, trainee.model, trainee.processor, d.rank, run.say)
    dataset = SupervisedDataset(cfg.data, trainee.train_processor, cfg.image_root, cfg.data_format,
                                cfg.on_bad_sample, cfg.truncate, cache, cfg.allow_outside_image_root)  # fmt: skip
    budget = pack_budget(cfg, trainee)
    sampler: GroupedBatchSampler | TokenBudgetSampler
    if budget is None:
        sampler = GroupedBatchSampler(dataset.modality_lengths(), cfg.batch_size, cfg.grad_accum, d.world, d.rank,
                                      cfg.seed, cfg.group_by_length)  # fmt: skip
    else:  # --batch-size rows of `budget` tokens, filled with as many samples as fit (exact token counts)
        lengths = dataset.token_lengths()
        check_fits(lengths, budget, [r.id for r in dataset.records])
        sampler = TokenBudgetSampler(lengths, cfg.batch_size, budget, cfg.grad_accum, d.world, d.rank, cfg.seed)
    total_steps = cfg.max_steps or steps_for_epochs(sampler, cfg.epochs)
    return Data(dataset, sampler, cache, sampler.steps_per_epoch(0), total_steps,
                round(cfg.warmup_ratio * total_steps), budget)  # fmt: skip


def steps_for_epochs(sampler: GroupedBatchSampler | TokenBudgetSampler, epochs: float) -> int:
    """Steps of `epochs` epochs, each counted on its own (a token-budget epoch's step count depends on its order)."""
    whole = int(epochs)
    steps = sum(sampler.steps_per_epoch(e) for e in range(whole))
    if epochs > whole:  # ceil(epochs * n) - whole * n: the same float as ceil(epochs * n) when every epoch has n
        n = sampler.steps_per_epoch(whole)
        steps += math.ceil(epochs * n - whole * n)
    return max(1, steps)


def pack_budget(cfg: TrainConfig, trainee: Trainee) -> int | None:
    """--packing: the tokens of one packed row (--max-tokens-per-batch, else the longest sample allowed)."""
    if not cfg.packing:
        return None
    if trainee.model.config.fusion != "splice":
        raise ValueError("--packing needs fusion splice: under xattn a sample would see the previous sample's image")
    return cfg.max_tokens_per_batch or trainee.train_processor.max_length


def prepare_projector(run: Run, trainee: Trainee, data: Data) -> dict[str, Any] | None:
    """Before any LLM step: fit the projector's input standardisation, and the word-space warm start (a fresh
    run only: a resumed run's projector comes from its checkpoint). Returns the warm start's account."""
    cfg, model = run.cfg, trainee.model
    collate = Collator(trainee.train_processor)
    if cfg.standardize_features and not model.projector.standardizes:
        fit_feature_stats(model, data.dataset, collate, data.cache, run.device, cfg.feature_stats_images, run.say)
    if not cfg.word_warmup_steps or trainee.resume_dir is not None:
        return None
    if model.config.fusion != "splice" or model.anyres is not None:
        raise ValueError("--word-warmup-steps needs spliced image tokens, one crop per image (no xattn, no AnyRes)")
    return word_space_warmstart(model, data.dataset, collate, data.cache, run.device, cfg.word_warmup_steps,
                                cfg.word_warmup_lr, cfg.seed, run.say, cfg.word_warmup_objective,
                                cfg.word_warmup_images, precision=cfg.precision)  # fmt: skip


def build_optimizer(run: Run, trainee: Trainee, data: Data) -> Optim:
    """Wrap the loss module for the strategy, AdamW over the parameter groups, the LR schedule (and the fp16
    scaler), each restored from a resumed checkpoint."""
    cfg, model, strategy = run.cfg, trainee.model, run.strategy
    step = TrainStep(model, cfg.tune_vision, cfg.distill_text, cfg.image_token_noise, cfg.distill_weight)
    step_module = strategy.wrap(step, model, cfg.tune_vision)
    groups = param_groups(model, cfg.resolved_lr(), cfg.resolved_projector_lr(), cfg.vision_lr, cfg.weight_decay)
    optimizer = make_optimizer(groups, cfg, run.device)  # after wrapping: FSDP replaces parameters by shards
    step_module = strategy.attach_optimizer(
        step_module, optimizer, cfg.batch_size, cfg.grad_accum, cfg.max_grad_norm
    )  # DeepSpeed: its engine, which owns the step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.scheduler, data.warmup, data.total_steps))
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    resume_state = trainee.resume_state
    if resume_state is not None:
        strategy.load_optimizer_state(step_module, optimizer, resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        if scaler is not None and "scaler" in resume_state:
            scaler.load_state_dict(resume_state["scaler"])
    return Optim(step_module, optimizer, scheduler, scaler)


def open_metrics(run: Run, trainee: Trainee) -> MetricsWriter | None:
    """The main rank's metrics JSONL (and TensorBoard), opened with a start or a resume record; the config
    saved next to it."""
    if not run.d.main:
        return None
    cfg, state, resume_state = run.cfg, trainee.state, trainee.resume_state
    metrics = MetricsWriter(run.out / "metrics.jsonl", state["step"] if resume_state else None, cfg.tensorboard)
    cfg.save(run.out / "train_config.json")
    if resume_state is None:
        metrics.write({"event": "start", "step": 0, "config": cfg.to_dict(),
                       "trainable": trainee.freeze_info["trainable"], "total_params": trainee.freeze_info["total"],
                       "world_size": run.d.world, "strategy": run.strategy.name})  # fmt: skip
    else:
        metrics.write({"event": "resume", "step": state["step"], "from": str(trainee.resume_dir)})
    return metrics


def open_progress(run: Run, step: int, total_steps: int) -> tqdm | None:
    """The main rank's progress bar on stderr, with --progress."""
    if not (run.d.main and run.cfg.progress):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total_steps, initial=step, desc=f"{run.cfg.stage}", unit="step", file=sys.stderr,
                dynamic_ncols=True)  # fmt: skip


def make_loader(s: Session) -> DataLoader:
    """The run's one DataLoader over the batch sampler.

    Workers are forked once, not once per epoch: a process forked from the trained-on parent shares the
    parent's freed heap, and every page the parent reuses then costs a copy-on-write fault (measured: the
    first step of each later epoch 3-4x slower, mostly kernel time). The batch sampler runs in this process,
    so each epoch's iter() still follows set_epoch."""
    cfg = s.run.cfg
    workers = worker_count(cfg.num_workers)
    return DataLoader(
        s.data.dataset, batch_sampler=s.data.sampler,
        collate_fn=Collator(s.trainee.train_processor, s.data.pack_budget),
        num_workers=workers, persistent_workers=workers > 0, generator=torch.Generator().manual_seed(cfg.seed),
        pin_memory=s.run.device.type == "cuda",
    )  # fmt: skip


# ---- the steps ---------------------------------------------------------------------------------
def run_steps(s: Session) -> float:
    """Epoch after epoch of steps until the last one (or --halt-at-step); returns the seconds they took."""
    state, sampler, cache = s.trainee.state, s.data.sampler, s.data.cache
    t_start = time.perf_counter()
    loader = make_loader(s)
    while state["step"] < s.data.total_steps and not s.tally.halted:
        sampler.set_epoch(state["epoch"], state["step_in_epoch"])
        if cache is not None:
            cache.flush()  # what earlier epochs and the warm start computed: workers read shards, not memory
        run_epoch(s, iter(loader))
    del loader  # stops the workers
    if s.progress:
        s.progress.close()
    return time.perf_counter() - t_start


def run_epoch(s: Session, batches: Iterator[dict[str, Any]]) -> None:
    """Steps from where the epoch stands until its batches run out, the last step, or --halt-at-step; with the
    periodic checkpoints."""
    cfg, state, data = s.run.cfg, s.trainee.state, s.data
    while state["step"] < data.total_steps:
        micro = [b for b in (next(batches, None) for _ in range(cfg.grad_accum)) if b is not None]
        if not micro:  # this epoch's batches are used up
            next_epoch(state)
            return
        take_step(s, micro)
        step_no = state["step"]
        if cfg.save_every and step_no % cfg.save_every == 0 and step_no < data.total_steps:
            s.tally.unproven_ckpt = write_checkpoint(s, step_no)
        if cfg.halt_at_step is not None and step_no >= cfg.halt_at_step:
            s.tally.halted = True
            return
        if state["step_in_epoch"] >= data.sampler.steps_per_epoch():  # the epoch set_epoch named
            next_epoch(state)
            return


def next_epoch(state: dict[str, Any]) -> None:
    state["epoch"] += 1
    state["step_in_epoch"] = 0


def take_step(s: Session, micro: list[dict[str, Any]]) -> None:
    """One step over this rank's micro-batches: an optimizer step, or a counted no-op when every sample of the
    global batch was skipped as bad."""
    t0 = time.perf_counter()
    state = s.trainee.state
    for b in micro:
        state["skipped"] += [{"id": x.id, "where": x.where, "reason": x.reason} for x in b["skipped"]]
    n_local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro if b["num_samples"])
    n_global = s.run.d.sum(n_local)  # supervised tokens of the global batch, every rank's micro-batches
    if n_global:
        train_step(s, micro, n_global, t0)
    else:
        skip_step(s)


def skip_step(s: Session) -> None:
    """Every sample of the step was skipped (on every rank: n_global is their sum): no update, but counted."""
    state = s.trainee.state
    skip_update(state, s.optim.scheduler)
    s.tally.skipped_steps += 1
    s.run.say(f"step {state['step']}: every sample of its batch was skipped (--on-bad-sample skip); no update")
    if s.metrics is not None:
        s.metrics.write({"event": "skipped_step", "step": state["step"], "epoch": state["epoch"],
                         "skipped_total": len(state["skipped"])})  # fmt: skip
        if s.progress:
            s.progress.update(1)


def train_step(s: Session, micro: list[dict[str, Any]], n_global: float, t0: float) -> None:
    """Forward and backward over the micro-batches, then clip, step the optimizer and the schedule, and log;
    stops the run on a loss that is not finite or on a collapsed gradient."""
    state, optim = s.trainee.state, s.optim
    step_loss = forward_backward(s, micro, n_global)
    step_no = state["step"] + 1
    if not math.isfinite(step_loss):
        stop_on_bad_loss(s, step_loss, step_no)
    grad_norm = optimizer_step(s)
    watch_collapse(s, grad_norm, step_no, step_loss)
    lr_now = optim.scheduler.get_last_lr()[0]
    optim.scheduler.step()
    optim.optimizer.zero_grad(set_to_none=True)
    state["step"] = step_no
    state["step_in_epoch"] += 1
    record_step(s, micro, step_loss, lr_now, grad_norm, time.perf_counter() - t0)


def forward_backward(s: Session, micro: list[dict[str, Any]], n_global: float) -> float:
    """Backward of each micro-batch's loss weighted by its share of the global batch's supervised tokens, so
    the gradient is that of the mean over all of them, however they split over micro-batches and ranks
    (gradients synced on the last micro-batch only). Returns that mean: the step's loss."""
    d, strategy, optim = s.run.d, s.run.strategy, s.optim
    pad_id = s.trainee.train_processor.tokenizer.pad_token_id or 0
    loss_sum = torch.zeros((), dtype=torch.float64)
    for j, b in enumerate(micro):
        if not b["num_samples"]:
            if d.world == 1:
                continue
            b = empty_batch(pad_id)  # the other ranks wait for this one's gradients
        # the attention kernel over the backward too: gradient checkpointing recomputes the forward there
        with strategy.grad_sync(optim.step_module, sync=j == len(micro) - 1), \
                attention_kernel(s.run.device, b["input_ids"].shape[1]):
            loss, n = micro_batch_loss(s, b)
            scaled = loss * (n * d.world / max(n_global, 1))  # DDP averages over ranks: x world undoes it
            strategy.backward(optim.step_module, optim.scaler.scale(scaled) if optim.scaler else scaled)
            loss_sum += loss.detach().double().cpu() * n
    return d.sum(float(loss_sum)) / n_global


def micro_batch_loss(s: Session, b: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """The mean loss over one micro-batch's supervised tokens, and their number."""
    cfg, device, model = s.run.cfg, s.run.device, s.trainee.model
    vf = vision_features_for(b, model, s.data.cache, device, cfg.tune_vision, s.tally.cache_stats)  # (C, P, Dv)
    pv = b["pixel_values"].to(device) if cfg.tune_vision and b["pixel_values"] is not None else None
    sizes = None if b["image_sizes"] is None else b["image_sizes"].to(device)
    n = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
    segments = b.get("segment_ids")
    with autocast_ctx(cfg.precision, device):
        loss = s.optim.step_module(b["input_ids"].to(device), b["attention_mask"].to(device), b["labels"].to(device),
                                   vf, pv, sizes, b.get("image_counts"),
                                   None if segments is None else segments.to(device))  # fmt: skip
    return loss, n


def stop_on_bad_loss(s: Session, step_loss: float, step_no: int) -> NoReturn:
    keep = set_aside_unproven(s)
    if s.progress:
        s.progress.close()
    raise FloatingPointError(f"loss is {step_loss} at step {step_no}; stopping. {keep}; lower --lr or check the data")


def optimizer_step(s: Session) -> float | None:
    """Unscale (fp16), clip, step; the gradient norm when it was measured (clipping or the collapse check)."""
    cfg, optim = s.run.cfg, s.optim
    if s.run.strategy.owns_step:  # DeepSpeed: the engine clips and steps the optimizer
        return s.run.strategy.step(optim.step_module)
    grad_norm = None
    if optim.scaler is not None:
        optim.scaler.unscale_(optim.optimizer)
    if cfg.max_grad_norm or cfg.collapse_steps:  # inf: the norm alone, for the collapse check
        params = [p for g in optim.optimizer.param_groups for p in g["params"]]
        grad_norm = clip_grad_norm(params, cfg.max_grad_norm or math.inf)
    if optim.scaler is not None:
        optim.scaler.step(optim.optimizer)
        optim.scaler.update()
    else:
        optim.optimizer.step()
    return grad_norm


def watch_collapse(s: Session, grad_norm: float | None, step_no: int, step_loss: float) -> None:
    """Track the peak gradient norm and the run of dead steps; collapse_check raises once it is too long."""
    tally = s.tally
    # fp16: an overflowed step is the scaler's business (it skips it and lowers the scale), not a collapse
    overflow = s.optim.scaler is not None and grad_norm is not None and not math.isfinite(grad_norm)
    if grad_norm is not None and math.isfinite(grad_norm):
        tally.peak_grad_norm = max(tally.peak_grad_norm, grad_norm)
    norm = None if overflow else grad_norm
    # a checkpoint is proven by the step after it: the weights of a run that collapses look finite and fine
    if tally.unproven_ckpt is not None and (norm is None or not is_dead(norm, tally.peak_grad_norm)):
        tally.last_ckpt = tally.unproven_ckpt
        if s.run.d.main:  # the good one it kept beyond keep_last can go now
            ckpt.prune(s.run.out, s.run.cfg.keep_last, tally.last_ckpt)
    tally.unproven_ckpt = None
    try:
        tally.zero_grad_run = collapse_check(s.run.cfg.collapse_steps, tally.zero_grad_run, norm,
                                             tally.peak_grad_norm, step_no, step_loss)  # fmt: skip
    except FloatingPointError as e:
        raise FloatingPointError(f"{e}; {set_aside_unproven(s)}") from None


def set_aside_unproven(s: Session) -> str:
    """A run that diverged (a loss that is not finite, or a collapse): rename the checkpoints newer than the last
    good one to `diverged-step-*` (kept, but no longer what --resume picks) and say which one to resume from."""
    good = s.tally.last_ckpt
    moved = []
    if s.run.d.main:
        for p in ckpt.list_checkpoints(s.run.out):
            if good is None or ckpt.step_of(p) > ckpt.step_of(good):
                p.rename(p.with_name(f"diverged-{p.name}"))
                moved.append(p.name)
    aside = f" ({len(moved)} saved after it renamed diverged-step-*)" if moved else ""
    if good is None:
        return f"no checkpoint was saved before it diverged{aside}"
    return f"the last good checkpoint is {good}{aside}"


def record_step(s: Session, micro: list[dict[str, Any]], step_loss: float, lr: float, grad_norm: float | None,
                seconds: float) -> None:  # fmt: skip
    """Count the step's global tokens and samples; the main rank logs it (every --log-every) and ticks the bar."""
    cfg, d, state, tally = s.run.cfg, s.run.d, s.trainee.state, s.tally
    tokens = sum(int(b["attention_mask"].sum()) for b in micro if b["num_samples"])
    slots = sum(b["input_ids"].numel() for b in micro if b["num_samples"])  # what the LLM computed, padding too
    samples = sum(b["num_samples"] for b in micro)
    tokens_g, slots_g, samples_g = d.sum(tokens), d.sum(slots), d.sum(samples)
    state["tokens"] += int(tokens_g)
    state["samples"] += int(samples_g)
    tally.tokens += tokens_g
    tally.slots += slots_g
    tally.samples += samples_g
    tally.losses.append(step_loss)
    if s.metrics is None:
        return
    step_no = state["step"]
    rec = {"event": "step", "step": step_no, "epoch": state["epoch"], "loss": step_loss, "lr": lr,
           "grad_norm": grad_norm, "tokens": int(tokens_g), "samples": int(samples_g), "step_s": seconds,
           "tokens_per_s": tokens_g / seconds, "samples_per_s": samples_g / seconds,
           "padding": 1 - tokens_g / max(slots_g, 1), "skipped_total": len(state["skipped"])}  # fmt: skip
    if step_no % cfg.log_every == 0 or step_no == s.data.total_steps:
        s.metrics.write(rec)
    if s.progress:
        s.progress.update(1)
        s.progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_g / seconds:.0f}",
                               smp_s=f"{samples_g / seconds:.1f}")  # fmt: skip


# ---- checkpoints and the end -------------------------------------------------------------------
def write_checkpoint(s: Session, step: int) -> Path | None:
    """The trainable weights and everything a resume needs (optimizer, schedule, scaler, RNG, data position);
    None when not written (another rank, or weights that are not all finite). Every rank takes part."""
    run, optim = s.run, s.optim
    if s.data.cache is not None:
        s.data.cache.flush()
    path = None
    weights = run.strategy.trainable_state(s.trainee.model)  # collectives under FSDP: every rank takes part
    optimizer_state = run.strategy.optimizer_state(optim.step_module, optim.optimizer)
    if run.d.main:
        lora = s.trainee.lora
        st = {**s.trainee.state, "optimizer": optimizer_state, "scheduler": optim.scheduler.state_dict(),
              "rng": ckpt.rng_state(), "lora": asdict(lora) if lora else None}  # fmt: skip
        if optim.scaler is not None:
            st["scaler"] = optim.scaler.state_dict()
        if ckpt.weights_finite(weights):
            path = ckpt.save_checkpoint(run.out, step, weights, st, run.cfg.to_dict(), run.cfg.keep_last,
                                        keep=s.tally.last_ckpt)  # fmt: skip
        else:  # never let exploded weights become the checkpoint a resume or the NaN message points at
            log.warning(f"step {step}: trainable weights are not all finite; checkpoint not saved")
    run.d.barrier()
    return path


def finish(s: Session, seconds: float) -> dict[str, Any]:
    """The run's summary; unless halted, after the final checkpoint and the exported model directory."""
    summary = summarize(s, seconds)
    if s.tally.halted:
        summary["halted"] = True
        return summary
    if s.data.cache is not None:
        s.data.cache.flush()
    final = write_checkpoint(s, s.trainee.state["step"])
    if final is not None:  # the run ended well: its last weights are the model, and the one to keep
        ckpt.prune(s.run.out, s.run.cfg.keep_last, final)
    summary["checkpoint"] = str(final)
    s.run.strategy.gather_model(s.optim.step_module, s.run.d.main)
    if s.metrics is not None:
        export_and_report(s, s.metrics, summary)
    s.run.d.barrier()
    return summary


def summarize(s: Session, seconds: float) -> dict[str, Any]:
    d, state, tally, info = s.run.d, s.trainee.state, s.tally, s.trainee.freeze_info
    all_skipped = state["skipped"]
    if d.world > 1:
        all_skipped = [x for part in d.gather(state["skipped"]) for x in part]
    return {
        "steps": state["step"], "total_steps": s.data.total_steps, "seconds": seconds,
        "tokens_per_s": tally.tokens / max(seconds, 1e-9), "samples_per_s": tally.samples / max(seconds, 1e-9),
        "padding": 1 - tally.tokens / max(tally.slots, 1),
        "final_loss": tally.losses[-1] if tally.losses else None, "losses": tally.losses,
        "skipped": len(all_skipped), "skipped_steps": tally.skipped_steps, "skipped_samples": all_skipped,
        "feature_cache": tally.cache_stats if s.data.cache is not None else None, "word_warmup": s.warmstart,
        "trainable": info["trainable"], "total_params": info["total"], "out": str(s.run.out),
    }  # fmt: skip


def export_and_report(s: Session, metrics: MetricsWriter, summary: dict[str, Any]) -> None:
    """Main rank: the model directory (QLoRA dequantized, LoRA merged or beside it), the end record, the loss
    curve, summary.json and the summary lines."""
    cfg, out, model = s.run.cfg, s.run.out, s.trainee.model
    if cfg.qlora:
        dequantize_llm_4bit(model)
    model_dir = export(model, s.trainee.processor, s.trainee.lora, out / MODEL_DIR, merge=cfg.merge_lora)
    summary["model"] = str(model_dir)
    metrics.write({"event": "end", **{k: v for k, v in summary.items() if k != "losses"}})
    if cfg.plot:
        png = plot_curves(metrics.records(), out / "loss_curve.png")
        summary["plot"] = str(png) if png else None
    metrics.close()
    (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2))
    s.run.say(format_summary(summary))


def export(model: MiniLlava, processor: Processor, lora: LoraSettings | None, directory: Path, merge: bool) -> Path:
    """A self-contained model directory that `MiniLlava.from_pretrained` loads as it is."""
    if any(t.device.type != "cpu" for t in (*model.parameters(), *model.buffers())):  # FSDP: gathered to CPU
        model = model.to("cpu")
    if lora is not None and merge:
        merge_lora(model)
        model.save_pretrained(directory, processor)
    elif lora is not None:
        import copy

        base = copy.deepcopy(model)
        _strip_lora(base)
        base.save_pretrained(directory, processor)
        save_adapter(model, lora, directory / ADAPTER_DIR)
    else:
        model.save_pretrained(directory, processor)
    return directory


def _strip_lora(model: MiniLlava) -> int:
    """Put the base layers back without merging (for an unmerged export)."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for name, module in list(model.llm.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(model.llm.get_submodule(parent_name) if parent_name else model.llm, child, module.get_base_layer())
            n += 1
    model.llm.__dict__.pop("peft_config", None)
    return n


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"done: {s['steps']} steps in {s['seconds']:.1f}s, {s['tokens_per_s']:.0f} tokens/s, "
        f"{s['samples_per_s']:.2f} samples/s, padding {s['padding']:.1%}, final loss {s['final_loss']:.4f}"
        if s["final_loss"] is not None else f"done: {s['steps']} steps",
        f"skipped samples: {s['skipped']}" + (" (ids: " + ", ".join(x["id"] for x in s["skipped_samples"][:20]) + ")"
                                              if s["skipped"] else ""),
    ]  # fmt: skip
    if s.get("feature_cache"):
        lines.append(f"feature cache: {s['feature_cache']['hits']} hits, {s['feature_cache']['misses']} misses")
    if s.get("model"):
        lines.append(f"model: {s['model']}")
    return "\n".join(lines)
