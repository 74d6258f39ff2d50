"""The training loop: one function, `train(config) -> summary`.

    build/load model -> freeze(stage) [+ LoRA] -> dataset + grouped sampler -> AdamW + warmup schedule
    -> for each step: grad_accum micro-batches (token-weighted loss), clip, step, log, checkpoint
    -> final checkpoint, export a self-contained model directory (LoRA merged), curve PNG, summary.

The same code runs in one process or under `torchrun` / `accelerate launch` (DDP or FSDP2, see
strategy.py; gloo on CPU, NCCL on GPUs). The loss of a step is the mean over every supervised token of the
global batch, whatever the split over micro-batches and ranks, so 2 processes x batch 2 give the loss of
1 process x batch 4.
"""

from __future__ import annotations

import contextlib
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
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from minillava.config import ModelConfig, ProjectorConfig, VisionConfig
from minillava.data.dataset import Collator, SupervisedDataset, worker_count
from minillava.data.sampler import GroupedBatchSampler
from minillava.model import MiniLlava
from minillava.processor import IGNORE_INDEX, Processor
from minillava.runtime import compile_decoder_layers, fast_bfloat16
from minillava.train import checkpoint as ckpt
from minillava.train.cache import FeatureCache, namespace_for
from minillava.train.config import TrainConfig
from minillava.train.metrics import MetricsWriter, plot_curves
from minillava.train.stages import (
    ADAPTER_DIR,
    LoraSettings,
    freeze,
    merge_lora,
    param_groups,
    save_adapter,
)
from minillava.train.strategy import clip_grad_norm, make_strategy, resolve_strategy
from minillava.train.warmstart import word_space_warmstart

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

    def __init__(self, model: MiniLlava, tune_vision: bool) -> None:
        super().__init__()
        self.model = model
        self.tune_vision = tune_vision

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
        vision_features: torch.Tensor | None, pixel_values: torch.Tensor | None, image_sizes: torch.Tensor | None,
        image_counts: torch.Tensor | None = None,  # (B,) images per row: the splice checks each row's slots
    ) -> torch.Tensor:  # fmt: skip
        m = self.model
        if self.tune_vision and pixel_values is not None:
            vision_features = m.vision(pixel_values)
        if vision_features is not None:
            image_features = m.project(vision_features, image_sizes)
            out = m(input_ids, attention_mask, labels=labels, image_features=image_features, return_logits=False,
                    image_sizes=image_sizes, image_counts=image_counts)  # fmt: skip
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
            out = m(input_ids, attention_mask, labels=labels, image_features=None, return_logits=False)
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


# ---- batches -----------------------------------------------------------------------------------
def vision_features_for(batch: dict, model: MiniLlava, cache: FeatureCache | None, device: torch.device,
                        tune_vision: bool, stats: dict) -> torch.Tensor | None:  # fmt: skip
    """(C, P, Dv) features of the batch's image crops, from the cache or from the frozen tower (then cached)."""
    feats: list[torch.Tensor | None] = batch.get("features") or []
    if not feats or tune_vision:
        return None
    if cache is None:  # also AnyRes, whose images have several crops each
        with torch.no_grad():
            return model.vision(batch["pixel_values"].to(device))
    missing = [i for i, f in enumerate(feats) if f is None]
    stats["hits"] += len(feats) - len(missing)
    stats["misses"] += len(missing)
    if missing:
        with torch.no_grad():
            computed = model.vision(batch["pixel_values"].to(device))
        for j, i in enumerate(missing):
            feats[i] = computed[j]
            if cache is not None:
                cache.put(batch["image_keys"][i], computed[j])
    return torch.stack([f.to(device) for f in feats])


def frozen_features(
    model: MiniLlava, dataset: SupervisedDataset, collate: Collator, cache: FeatureCache | None,
    device: torch.device, indices: list[int], chunk: int = 32,
) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:  # fmt: skip
    """(batch, its vision features (C, P, Dv)) for the given samples, `chunk` at a time, from the feature cache
    or the frozen tower (then cached): what the steps before training (statistics, warm start) read."""
    for start in range(0, len(indices), chunk):
        batch = collate([dataset[i] for i in indices[start : start + chunk]])
        if not batch["num_samples"]:
            continue
        feats = vision_features_for(batch, model, cache, device, False, {"hits": 0, "misses": 0})
        if feats is not None:
            yield batch, feats


T = TypeVar("T")


def evenly_spaced(items: list[T], k: int) -> list[T]:
    """`k` of `items` spread evenly from first to last (all of them when there are no more than `k`)."""
    if len(items) <= k:
        return items
    return [items[j * len(items) // k] for j in range(k)]


def fit_feature_stats(model: MiniLlava, dataset: SupervisedDataset, collate: Collator, cache: FeatureCache | None,
                      device: torch.device, max_images: int, say: Callable[[str], None]) -> None:  # fmt: skip
    """Fit the projector's input standardisation: per-channel mean and std of the frozen tower's features over
    `max_images` samples with images spread evenly over the data (several files one after another: each has its
    share, not just the first file), chosen without randomness, so a resumed run refits the very same numbers;
    the features land in the feature cache on the way."""
    with_images = evenly_spaced([i for i, n in enumerate(dataset.modality_lengths()) if n > 0], max_images)
    total = total_sq = None
    count, seen = 0, 0
    for _, feats in frozen_features(model, dataset, collate, cache, device, with_images):
        flat = feats.reshape(-1, feats.shape[-1]).double()  # (C*P, Dv)
        total = flat.sum(0) if total is None else total + flat.sum(0)
        total_sq = flat.square().sum(0) if total_sq is None else total_sq + flat.square().sum(0)
        count, seen = count + flat.shape[0], seen + feats.shape[0]
    if not count:
        raise ValueError("--standardize-features: the training data holds no images to fit the statistics on")
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt().clamp_min(1e-6)
    model.projector.set_feature_stats(mean.float().to(device), std.float().to(device))
    say(
        f"projector input standardised: per-channel mean/std of {seen} image crops ({count:,} feature vectors); "
        f"largest |mean| {mean.abs().max():.2f}, median std {std.median():.2f}"
    )


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


def collapse_check(limit: int, run: int, grad_norm: float | None, peak: float, step: int, loss: float) -> int:
    """The new count of consecutive dead steps; raises once it reaches `limit` (0: never). A step with
    supervised tokens and a gradient norm of 0 (or not finite) moves nothing: after a few in a row the run
    has collapsed (saturated activations, e.g. from an absurd LR) and would otherwise finish silently."""
    if not limit or grad_norm is None:
        return 0
    dead = not math.isfinite(grad_norm) or grad_norm <= COLLAPSE_RATIO * peak
    run = run + 1 if dead else 0
    if run >= limit:
        shown = "0" if math.isfinite(grad_norm) else "not finite"
        raise FloatingPointError(
            f"training collapsed at step {step}: gradient norm {shown} for {limit} steps (loss {loss:.4f}, last "
            f"norm {grad_norm:.1e}); lower --lr"
        )
    return run


def autocast_ctx(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


# ---- the loop ----------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict[str, Any]:
    cfg.validate()
    d = Dist(group=resolve_strategy(cfg.strategy, os.environ).startswith("deepspeed"))
    try:
        return _train(cfg, d)
    finally:
        d.close()


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


def _train(cfg: TrainConfig, d: Dist) -> dict[str, Any]:
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
    resumed = ckpt.load_resume(out, cfg.resume, log.warning if d.main else (lambda *_: None))
    resume_dir = resumed[0] if resumed else None
    if cfg.resume and resume_dir is None:
        say(f"--resume: no checkpoint under {out}; starting from scratch")

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

    state: dict[str, Any] = {"step": 0, "epoch": 0, "step_in_epoch": 0, "skipped": [], "tokens": 0, "samples": 0}
    resume_state = None
    if resumed is not None:
        resume_dir, weights, resume_state = resumed
        expected = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(weights) != expected:
            raise ValueError(
                f"{resume_dir}: its trainable parameters do not match this run's (different stage, LoRA or "
                f"model?): {len(set(weights) ^ expected)} names differ"
            )
        model.load_state_dict(weights, strict=False)
        state.update({k: resume_state[k] for k in state})
        say(f"resuming from {resume_dir} at step {state['step']}")

    if cfg.frozen_bf16 and cfg.precision == "bf16":  # bf16 storage only pays where bf16 kernels are fast
        if not cfg.tune_vision:
            model.vision.to(torch.bfloat16)
        if cfg.stage == "align":
            model.llm.to(torch.bfloat16)
            model.xattn.float()  # the cross-attention blocks live inside the LLM but train: float32 masters
    model.to(device)
    if cfg.grad_checkpointing and cfg.stage == "instruct":
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.use_lora:
            model.llm.enable_input_require_grads()
    if cfg.compile:
        say(f"compiling {compile_decoder_layers(model.llm)} LLM decoder layers (torch.compile: one graph per kind "
            f"of layer, e.g. with and without LoRA)")

    cache = None
    if cfg.feature_cache:
        if cfg.tune_vision:
            say("--feature-cache is ignored with --tune-vision (the tower's features change as it trains)")
        elif model.anyres is not None:
            say("--feature-cache is ignored with AnyRes (each image has its own number of crops)")
        else:
            feature_dtype = next(model.vision.parameters()).dtype
            cache = FeatureCache(cfg.feature_cache, namespace_for(model.vision, processor.image_transform,
                                                                   feature_dtype), rank=d.rank)  # fmt: skip
            say(f"feature cache {cache.dir}: {len(cache)} images cached")
    dataset = SupervisedDataset(cfg.data, train_processor, cfg.image_root, cfg.data_format, cfg.on_bad_sample,
                                cfg.truncate, cache, cfg.allow_outside_image_root)  # fmt: skip
    if cfg.standardize_features and not model.projector.standardizes:
        fit_feature_stats(model, dataset, Collator(train_processor), cache, device, cfg.feature_stats_images, say)
    warmstart = None
    if cfg.word_warmup_steps and resume_dir is None:  # a resumed run's projector comes from its checkpoint
        if model.config.fusion != "splice" or model.anyres is not None:
            raise ValueError("--word-warmup-steps needs spliced image tokens, one crop per image (no xattn, no AnyRes)")
        warmstart = word_space_warmstart(model, dataset, Collator(train_processor), cache, device,
                                         cfg.word_warmup_steps, cfg.word_warmup_lr, cfg.seed, say,
                                         cfg.word_warmup_objective, cfg.word_warmup_images)  # fmt: skip
    sampler = GroupedBatchSampler(dataset.modality_lengths(), cfg.batch_size, cfg.grad_accum, d.world, d.rank,
                                  cfg.seed, cfg.group_by_length)  # fmt: skip
    steps_per_epoch = sampler.steps_per_epoch()
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = round(cfg.warmup_ratio * total_steps)
    step_module = strategy.wrap(TrainStep(model, cfg.tune_vision), model, cfg.tune_vision)
    groups = param_groups(model, cfg.resolved_lr(), cfg.resolved_projector_lr(), cfg.vision_lr, cfg.weight_decay)
    optimizer = make_optimizer(groups, cfg, device)  # after wrapping: FSDP replaces parameters by shards
    step_module = strategy.attach_optimizer(
        step_module, optimizer, cfg.batch_size, cfg.grad_accum, cfg.max_grad_norm
    )  # DeepSpeed: its engine, which owns the step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.scheduler, warmup, total_steps))
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    if resume_state is not None:
        strategy.load_optimizer_state(step_module, optimizer, resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        if scaler is not None and "scaler" in resume_state:
            scaler.load_state_dict(resume_state["scaler"])
    say(f"{len(dataset)} samples, global batch {sampler.global_batch} ({cfg.batch_size} x {cfg.grad_accum} accum x "
        f"{d.world} ranks), {steps_per_epoch} steps/epoch, {total_steps} steps, warmup {warmup}")  # fmt: skip

    metrics = MetricsWriter(out / "metrics.jsonl", state["step"] if resume_state else None, cfg.tensorboard) \
        if d.main else None  # fmt: skip
    if d.main:
        cfg.save(out / "train_config.json")
        if resume_state is None:
            metrics.write({"event": "start", "step": 0, "config": cfg.to_dict(), "trainable": freeze_info["trainable"],
                           "total_params": freeze_info["total"], "world_size": d.world,
                           "strategy": strategy.name})  # fmt: skip
        else:
            metrics.write({"event": "resume", "step": state["step"], "from": str(resume_dir)})
    if resume_state is not None:
        ckpt.set_rng_state(resume_state["rng"])  # last: nothing above may consume random numbers after this

    def save(step: int) -> Path | None:
        if cache is not None:
            cache.flush()
        path = None
        weights = strategy.trainable_state(model)  # collectives under FSDP: every rank takes part
        optimizer_state = strategy.optimizer_state(step_module, optimizer)
        if d.main:
            st = {**state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                  "rng": ckpt.rng_state(), "lora": asdict(lora) if lora else None}  # fmt: skip
            if scaler is not None:
                st["scaler"] = scaler.state_dict()
            if ckpt.weights_finite(weights):
                path = ckpt.save_checkpoint(out, step, weights, st, cfg.to_dict(), cfg.keep_last)
            else:  # never let exploded weights become the checkpoint a resume or the NaN message points at
                log.warning(f"step {step}: trainable weights are not all finite; checkpoint not saved")
        d.barrier()
        return path

    progress = None
    if d.main and cfg.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=state["step"], desc=f"{cfg.stage}", unit="step", file=sys.stderr,
                        dynamic_ncols=True)  # fmt: skip
    cache_stats = {"hits": 0, "misses": 0}
    pad_id = train_processor.tokenizer.pad_token_id or 0
    losses: list[float] = []
    last_ckpt = resume_dir or ckpt.latest_checkpoint(out)  # the newest known to load and hold finite weights
    zero_grad_run = 0  # consecutive optimizer steps whose gradient norm was 0 or not finite
    peak_grad_norm = 0.0  # the largest finite one so far: what "0" is measured against
    t_start = time.perf_counter()
    tokens_run = samples_run = 0
    halted = False
    skipped_steps = 0  # steps whose every sample was skipped: counted, but no update
    workers = worker_count(cfg.num_workers)
    # Workers are forked once, not once per epoch: a process forked from the trained-on parent shares the
    # parent's freed heap, and every page the parent reuses then costs a copy-on-write fault (measured: the
    # first step of each later epoch 3-4x slower, mostly kernel time). The batch sampler runs in this process,
    # so each epoch's iter() still follows set_epoch.
    loader = DataLoader(
        dataset, batch_sampler=sampler, collate_fn=Collator(train_processor), num_workers=workers,
        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(cfg.seed),
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    while state["step"] < total_steps and not halted:
        sampler.set_epoch(state["epoch"], state["step_in_epoch"])
        if cache is not None:
            cache.flush()  # what earlier epochs and the warm start computed: workers read shards, not memory
        it = iter(loader)
        while state["step"] < total_steps:
            micro = [b for b in (next(it, None) for _ in range(cfg.grad_accum)) if b is not None]
            if not micro:  # this epoch's batches are used up
                state["epoch"] += 1
                state["step_in_epoch"] = 0
                break
            t0 = time.perf_counter()
            for b in micro:
                state["skipped"] += [{"id": s.id, "where": s.where, "reason": s.reason} for s in b["skipped"]]
            n_local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro if b["num_samples"])
            n_global = d.sum(n_local)
            if not n_global:  # every sample of the step was skipped (on every rank: n_global is their sum)
                skip_update(state, scheduler)
                skipped_steps += 1
                say(f"step {state['step']}: every sample of its batch was skipped (--on-bad-sample skip); "
                    "no update")  # fmt: skip
                if d.main:
                    metrics.write({"event": "skipped_step", "step": state["step"], "epoch": state["epoch"],
                                   "skipped_total": len(state["skipped"])})  # fmt: skip
                    if progress:
                        progress.update(1)
            else:
                loss_sum = torch.zeros((), dtype=torch.float64)
                tokens = sum(int(b["attention_mask"].sum()) for b in micro if b["num_samples"])
                samples = sum(b["num_samples"] for b in micro)
                for j, b in enumerate(micro):
                    if not b["num_samples"]:
                        if d.world == 1:
                            continue
                        b = empty_batch(pad_id)
                    with strategy.grad_sync(step_module, sync=j == len(micro) - 1):
                        vf = vision_features_for(b, model, cache, device, cfg.tune_vision, cache_stats)
                        pv = b["pixel_values"].to(device) if cfg.tune_vision and b["pixel_values"] is not None else None
                        sizes = None if b["image_sizes"] is None else b["image_sizes"].to(device)
                        n = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
                        with autocast_ctx(cfg.precision, device):
                            loss = step_module(b["input_ids"].to(device), b["attention_mask"].to(device),
                                               b["labels"].to(device), vf, pv, sizes,
                                               b.get("image_counts"))  # fmt: skip
                        scaled = loss * (n * d.world / max(n_global, 1))
                        strategy.backward(step_module, scaler.scale(scaled) if scaler else scaled)
                        loss_sum += loss.detach().double().cpu() * n
                step_loss = d.sum(float(loss_sum)) / n_global
                step_no = state["step"] + 1
                if not math.isfinite(step_loss):
                    keep = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                    if progress:
                        progress.close()
                    raise FloatingPointError(
                        f"loss is {step_loss} at step {step_no}; stopping. {keep}; lower --lr or check the data"
                    )
                grad_norm = None
                if strategy.owns_step:  # DeepSpeed: the engine clips and steps the optimizer
                    grad_norm = strategy.step(step_module)
                else:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    if cfg.max_grad_norm or cfg.collapse_steps:  # inf: the norm alone, for the collapse check
                        params = [p for g in optimizer.param_groups for p in g["params"]]
                        grad_norm = clip_grad_norm(params, cfg.max_grad_norm or math.inf)
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                # fp16: an overflowed step is the scaler's business (it skips it and lowers the scale), not a collapse
                overflow = scaler is not None and grad_norm is not None and not math.isfinite(grad_norm)
                if grad_norm is not None and math.isfinite(grad_norm):
                    peak_grad_norm = max(peak_grad_norm, grad_norm)
                zero_grad_run = collapse_check(cfg.collapse_steps, zero_grad_run, None if overflow else grad_norm,
                                               peak_grad_norm, step_no, step_loss)  # fmt: skip
                lr_now = scheduler.get_last_lr()[0]
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] = step_no
                state["step_in_epoch"] += 1
                dt = time.perf_counter() - t0
                tokens_g, samples_g = d.sum(tokens), d.sum(samples)
                state["tokens"] += int(tokens_g)
                state["samples"] += int(samples_g)
                tokens_run += tokens_g
                samples_run += samples_g
                losses.append(step_loss)
                if d.main:
                    rec = {"event": "step", "step": step_no, "epoch": state["epoch"], "loss": step_loss, "lr": lr_now,
                           "grad_norm": grad_norm, "tokens": int(tokens_g), "samples": int(samples_g),
                           "step_s": dt, "tokens_per_s": tokens_g / dt, "samples_per_s": samples_g / dt,
                           "skipped_total": len(state["skipped"])}  # fmt: skip
                    if step_no % cfg.log_every == 0 or step_no == total_steps:
                        metrics.write(rec)
                    if progress:
                        progress.update(1)
                        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr_now:.2e}", tok_s=f"{tokens_g / dt:.0f}",
                                             smp_s=f"{samples_g / dt:.1f}")  # fmt: skip
            step_no = state["step"]
            if cfg.save_every and step_no % cfg.save_every == 0 and step_no < total_steps:
                last_ckpt = save(step_no) or last_ckpt
            if cfg.halt_at_step is not None and step_no >= cfg.halt_at_step:
                halted = True
                break
            if state["step_in_epoch"] >= steps_per_epoch:
                state["epoch"] += 1
                state["step_in_epoch"] = 0
                break
        del it
    del loader  # stops the workers
    if progress:
        progress.close()
    elapsed = time.perf_counter() - t_start
    all_skipped = state["skipped"]
    if d.world > 1:
        all_skipped = [s for part in d.gather(state["skipped"]) for s in part]
    summary: dict[str, Any] = {
        "steps": state["step"], "total_steps": total_steps, "seconds": elapsed,
        "tokens_per_s": tokens_run / max(elapsed, 1e-9), "samples_per_s": samples_run / max(elapsed, 1e-9),
        "final_loss": losses[-1] if losses else None, "losses": losses, "skipped": len(all_skipped),
        "skipped_steps": skipped_steps,
        "skipped_samples": all_skipped, "feature_cache": cache_stats if cache is not None else None,
        "word_warmup": warmstart,
        "trainable": freeze_info["trainable"], "total_params": freeze_info["total"], "out": str(out),
    }  # fmt: skip
    if halted:
        summary["halted"] = True
        return summary
    if cache is not None:
        cache.flush()
    summary["checkpoint"] = str(save(state["step"]))
    strategy.gather_model(step_module, d.main)
    if d.main:
        if cfg.qlora:
            dequantize_llm_4bit(model)
        model_dir = export(model, processor, lora, out / MODEL_DIR, merge=cfg.merge_lora)
        summary["model"] = str(model_dir)
        metrics.write({"event": "end", **{k: v for k, v in summary.items() if k != "losses"}})
        if cfg.plot:
            png = plot_curves(metrics.records(), out / "loss_curve.png")
            summary["plot"] = str(png) if png else None
        metrics.close()
        (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2))
        say(format_summary(summary))
    d.barrier()
    return summary


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
        f"{s['samples_per_s']:.2f} samples/s, final loss {s['final_loss']:.4f}"
        if s["final_loss"] is not None else f"done: {s['steps']} steps",
        f"skipped samples: {s['skipped']}" + (" (ids: " + ", ".join(x["id"] for x in s["skipped_samples"][:20]) + ")"
                                              if s["skipped"] else ""),
    ]  # fmt: skip
    if s.get("feature_cache"):
        lines.append(f"feature cache: {s['feature_cache']['hits']} hits, {s['feature_cache']['misses']} misses")
    if s.get("model"):
        lines.append(f"model: {s['model']}")
    return "\n".join(lines)
