"""Data-parallel strategies of the training loop (Prismatic-style, swappable): DDP, FSDP2 or DeepSpeed ZeRO.

    ddp                 every rank holds the whole model; DDP all-reduces gradients (one process: no wrapper)
    fsdp-full-shard     torch FSDP2 `fully_shard`: parameters, gradients and optimizer states sharded over the
                        ranks, parameters re-gathered in backward (FSDP1 FULL_SHARD, ~ZeRO-3)
    fsdp-shard-grad-op  the same, but parameters stay gathered from forward to backward (SHARD_GRAD_OP, ~ZeRO-2)
    deepspeed-zero2     a DeepSpeed engine, ZeRO stage 2: gradients and optimizer states partitioned
    deepspeed-zero3     ZeRO stage 3: parameters partitioned too (`pip install deepspeed`, an optional extra)

FSDP units: each LLM decoder layer (transformers' `_no_split_modules`, what accelerate's TRANSFORMER_BASED_WRAP
picks); everything else (embeddings, head, projector, a trained vision tower) is the root unit, whose
gradients are reduced once at the end of backward. That keeps the order of collectives the same on every
rank: a text-only micro-batch runs zero images through the projector (and a trained tower) into its input
embeddings (loop.TrainStep), as an image batch does, and the root unit reduces all of them once. DeepSpeed
ZeRO-3 needs more: the same modules in the same order, forward and backward, in every micro-batch (it
records the order once and, on a rank where it changes, re-checks it with a collective the other ranks do
not run), which TrainStep gives spliced single-crop models; AnyRes and xattn models run image-only modules
and are refused under ZeRO-3. A frozen vision tower is not sharded at all (`ignored_params`): it has no
gradients, and the loop runs it outside the step (feature cache). Every strategy averages gradients over
ranks, so the loss sequence equals one process's with the same global batch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from minillava.train.stages import trainable_state


def resolve_strategy(name: str, env: Mapping[str, str]) -> str:
    """`auto`: what `accelerate launch --config_file` asked for (its environment variables), else ddp."""
    if name != "auto":
        return name
    if env.get("ACCELERATE_USE_DEEPSPEED") == "true":
        return _deepspeed_from_env(env)
    if env.get("ACCELERATE_USE_FSDP") != "true":
        return "ddp"
    if env.get("FSDP_OFFLOAD_PARAMS", "false") != "false":
        raise ValueError("fsdp_offload_params is not supported by minillava's FSDP strategy: set it to false")
    # FSDP2 configs say fsdp_reshard_after_forward: true|false; FSDP1 configs name the sharding strategy
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").upper()
    sharding = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
    if "NO_SHARD" in (reshard, sharding):
        raise ValueError("FSDP NO_SHARD is plain data parallelism: launch with --strategy ddp (or torchrun)")
    if reshard == "FALSE" or "SHARD_GRAD_OP" in (reshard, sharding):
        return "fsdp-shard-grad-op"
    if reshard in ("TRUE", "FULL_SHARD"):
        return "fsdp-full-shard"
    raise ValueError(f"FSDP reshard_after_forward {reshard!r}: use true (FULL_SHARD) or false (SHARD_GRAD_OP)")


def _deepspeed_from_env(env: Mapping[str, str]) -> str:
    """`distributed_type: DEEPSPEED` configs: minillava builds the DeepSpeed config itself from the stage."""
    if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        raise ValueError("deepspeed_config_file is not supported: give zero_stage 2 or 3 in the accelerate config "
                         "(minillava writes the DeepSpeed config from its own flags)")  # fmt: skip
    for key in ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"):
        if env.get(key, "none") != "none":
            raise ValueError("DeepSpeed offload is not supported by minillava's DeepSpeed strategy: set "
                             "offload_optimizer_device and offload_param_device to none")  # fmt: skip
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    if stage not in ("2", "3"):
        raise ValueError(f"DeepSpeed zero_stage {stage}: minillava supports 2 and 3 (stage 0 is ddp)")
    return f"deepspeed-zero{stage}"


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor


class DDPStrategy:
    """The whole model on every rank; one process runs the bare module."""

    name = "ddp"
    owns_step = False  # True: the wrapped module itself does backward, clipping and the optimizer step

    def __init__(self, world: int, device: torch.device) -> None:
        self.world, self.device = world, device

    def wrap(self, step: nn.Module, model: nn.Module, tune_vision: bool) -> nn.Module:
        if self.world == 1:
            return step
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(step, device_ids=ids)

    def attach_optimizer(self, module: nn.Module, optimizer: torch.optim.Optimizer, micro_batch: int,
                         grad_accum: int, max_grad_norm: float) -> nn.Module:  # fmt: skip
        """The module the loop runs, once the optimizer exists (DeepSpeed: its engine)."""
        return module

    def grad_sync(self, module: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Gradients are exchanged on the last micro-batch of a step only."""
        return contextlib.nullcontext() if sync or self.world == 1 else module.no_sync()

    def backward(self, module: nn.Module, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, module: nn.Module) -> float | None:
        """`owns_step` strategies only: clip, optimizer step, zero the gradients; the gradient norm."""
        raise NotImplementedError

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Collective under FSDP: every rank calls it; the main rank saves what it returns."""
        return trainable_state(model)

    def optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def gather_model(self, module: nn.Module, main: bool) -> None:
        """Make the main rank's model whole for export (collective under FSDP)."""


class FSDPStrategy(DDPStrategy):
    def __init__(self, world: int, device: torch.device, reshard_after_forward: bool) -> None:
        super().__init__(world, device)
        self.reshard = reshard_after_forward
        self.name = "fsdp-full-shard" if reshard_after_forward else "fsdp-shard-grad-op"

    def wrap(self, step: nn.Module, model: nn.Module, tune_vision: bool) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        # the first layer's gradients are reduced when its input's gradient is computed; with a frozen
        # embedding a text-only batch's input has none, and that rank would reduce in another order
        model.llm.enable_input_require_grads()
        layers = _layer_classes(model.llm)
        for module in model.llm.modules():
            if type(module).__name__ in layers:
                fully_shard(module, mesh=mesh, reshard_after_forward=self.reshard)
        ignored = set() if tune_vision else set(model.vision.parameters())
        fully_shard(step, mesh=mesh, reshard_after_forward=self.reshard, ignored_params=ignored)
        return step

    def grad_sync(self, module: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        module.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: _full(p).cpu() for n, p in model.named_parameters() if p.requires_grad}

    def optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(module, optimizer, options=options)

    def load_optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def gather_model(self, module: nn.Module, main: bool) -> None:
        """Every rank gathers each sharded parameter in turn; the main rank puts the whole tensors in place,
        on the CPU (FSDP modules refuse `.to()` once their parameters are no longer shards)."""
        whole: dict[int, nn.Parameter | None] = {}
        for name, p in list(module.named_parameters(remove_duplicate=False)):  # tied weights: every name
            if id(p) not in whole:  # one all-gather per parameter, in the same order on every rank
                full = _full(p).detach().cpu()
                whole[id(p)] = nn.Parameter(full, requires_grad=p.requires_grad) if main else None
            if main:
                owner, _, leaf = name.rpartition(".")
                setattr(module.get_submodule(owner), leaf, whole[id(p)])
        if main:
            for name, b in list(module.named_buffers()):
                owner, _, leaf = name.rpartition(".")
                module.get_submodule(owner)._buffers[leaf] = b.cpu()


class DeepSpeedStrategy(DDPStrategy):
    """A DeepSpeed engine around the train step, ZeRO stage 2 or 3, fp32 master weights (minillava's --precision
    autocasts the forward, as with DDP/FSDP). The loop's AdamW and LR schedule are handed to the engine, which
    owns backward, clipping (`gradient_clipping` = --max-grad-norm) and the step; the loop weights each
    micro-batch's loss itself, so the engine neither divides by grad_accum nor counts micro-batches
    (`managed_gradient_accumulation: false`: `step()` ends the accumulation, whatever the number of
    micro-batches). Under ZeRO-3 a frozen vision tower is hidden from the engine until the export (ZeRO-3
    would partition it, and the loop runs it outside the step, on the ranks that have images only).
    Checkpoints hold the whole trainable weights and an unpartitioned AdamW state in DDP's layout, so they
    resume under any world size."""

    owns_step = True

    def __init__(self, world: int, device: torch.device, stage: int) -> None:
        super().__init__(world, device)
        self.stage = stage
        self.name = f"deepspeed-zero{stage}"
        self.params: list[nn.Parameter] = []  # the trainable parameters, in the optimizer's order
        self.group_sizes: list[int] = []
        self.owner: nn.Module | None = None
        self.hidden: nn.Module | None = None  # ZeRO-3: the frozen vision tower, kept out of the engine's sight

    def wrap(self, step: nn.Module, model: nn.Module, tune_vision: bool) -> nn.Module:
        if self.stage == 3 and (model.anyres is not None or model.config.fusion != "splice"):
            raise ValueError("--strategy deepspeed-zero3 does not support AnyRes or xattn models (an image micro-"
                             "batch runs modules a text-only one skips): use fsdp-full-shard (~ZeRO-3)")  # fmt: skip
        if self.stage == 3 and not tune_vision:  # hidden until `gather_model`: a plain attribute, no submodule
            self.owner, self.hidden = model, model.vision
            del model._modules["vision"]
            model.__dict__["vision"] = self.hidden
        return step

    def attach_optimizer(self, module: nn.Module, optimizer: torch.optim.Optimizer, micro_batch: int,
                         grad_accum: int, max_grad_norm: float) -> nn.Module:  # fmt: skip
        try:
            import deepspeed
        except ImportError as e:
            raise ImportError(f"--strategy {self.name} needs DeepSpeed: pip install 'minillava[deepspeed]' "
                              "(DS_BUILD_OPS=0 builds no kernels; none are needed)") from e  # fmt: skip
        if not torch.distributed.is_initialized():
            raise RuntimeError(f"--strategy {self.name} needs a process group (torchrun / accelerate launch)")
        if self.world == 1:  # the engine reads LOCAL_RANK, which a launcher sets; one process without one is 0
            os.environ.setdefault("LOCAL_RANK", "0")
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.group_sizes = [len(g["params"]) for g in optimizer.param_groups]  # ZeRO flattens each group
        config = {
            "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
            "train_batch_size": micro_batch * grad_accum * self.world, "managed_gradient_accumulation": False,
            "gradient_clipping": max_grad_norm, "zero_optimization": {"stage": self.stage},
            "bf16": {"enabled": False}, "fp16": {"enabled": False}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**62, "wall_clock_breakdown": False,
        }  # fmt: skip
        engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, model_parameters=self.params,
                                          config=config, dist_init_required=False)  # fmt: skip
        return engine

    def grad_sync(self, module: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine accumulates until `step()`

    def backward(self, module: nn.Module, loss: torch.Tensor) -> None:
        module.backward(loss, scale_wrt_gas=False)

    def step(self, module: nn.Module) -> float | None:
        module.step()
        norm = module.get_global_grad_norm()
        return None if norm is None else float(norm)

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """ZeRO-3: each trainable parameter gathered in turn (collective); ZeRO-2 keeps them whole."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                full = safe_get_full_fp32_param(p) if hasattr(p, "ds_id") else None
                out[name] = (p.detach() if full is None else full).cpu().clone()
        return out

    def optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """AdamW's state_dict as one process would have it: per parameter (in optimizer order) the whole
        exp_avg / exp_avg_sq, gathered from the partitions (collective)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        keys = ("exp_avg", "exp_avg_sq")
        step = _adam_step(optimizer)
        _link_adam_states(module, optimizer, None)
        state = {}
        for i, p in enumerate(self.params):
            parts = {k: safe_get_full_optimizer_state(p, k) for k in keys}
            if step is not None and all(v is not None for v in parts.values()):
                state[i] = {"step": step.clone(), **{k: v.detach().cpu().clone() for k, v in parts.items()}}
        groups, start = [], 0
        for g, n in zip(optimizer.param_groups, self.group_sizes, strict=True):
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(start, start + n))})
            start += n
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        saved = state["state"]
        if [len(g["params"]) for g in state["param_groups"]] != self.group_sizes:
            raise ValueError("the checkpoint's optimizer state does not match this run's trainable parameters")
        for group, old in zip(optimizer.param_groups, state["param_groups"], strict=True):
            group.update({k: v for k, v in old.items() if k != "params"})
        steps = {float(v["step"]) for v in saved.values()}
        if len(steps) > 1:
            raise ValueError(f"the checkpoint's AdamW states have different step counts {sorted(steps)}: "
                             "DeepSpeed keeps one per parameter group partition")  # fmt: skip
        if not steps:
            return
        _link_adam_states(module, optimizer, steps.pop())  # a state to write into, before the first step
        for i, p in enumerate(self.params):
            for k in ("exp_avg", "exp_avg_sq"):
                value = saved[i][k] if i in saved else torch.zeros(p.ds_shape if hasattr(p, "ds_id") else p.shape)
                safe_set_full_optimizer_state(p, value.to(self.device), k)  # collective under ZeRO-3

    def gather_model(self, module: nn.Module, main: bool) -> None:
        """ZeRO-3: every rank gathers each partitioned parameter in turn; the main rank puts the whole tensors
        in place (plain parameters, as the export needs them)."""
        if self.stage < 3:
            return
        import deepspeed

        if self.hidden is not None:  # the frozen tower back in its place, as an ordinary submodule
            del self.owner.__dict__["vision"]
            self.owner._modules["vision"] = self.hidden
            self.hidden = None

        whole: dict[int, nn.Parameter | None] = {}
        for name, p in list(module.named_parameters(remove_duplicate=False)):
            if not hasattr(p, "ds_id"):  # the frozen tower: never partitioned
                continue
            if id(p) not in whole:
                with deepspeed.zero.GatheredParameters([p]):
                    full = p.detach().cpu().clone()
                whole[id(p)] = nn.Parameter(full, requires_grad=p.requires_grad) if main else None
            if main:
                owner, _, leaf = name.rpartition(".")
                setattr(module.get_submodule(owner), leaf, whole[id(p)])


def _link_adam_states(engine: nn.Module, optimizer: torch.optim.Optimizer, step: float | None) -> None:
    """Give every flat fp32 partition the engine's AdamW steps an AdamW state (zeros, and `step`, where it has
    none yet; `step` given: every partition's step count), and link ZeRO-2's per-parameter views to them.
    DeepSpeed 0.19 links those views once, right after the first parameter group's first step, so the other
    groups' views stay empty; the full-state accessors need them all. ZeRO-3 puts each flat partition in its
    parameter group only for the length of its step: the engine lists them."""
    zero = engine.optimizer
    flats = getattr(zero, "fp32_partitioned_groups_flat", None)
    if flats is not None:  # ZeRO-3
        pairs = [(optimizer.param_groups[zero.sub_group_to_group_id[i]], f) for i, f in enumerate(flats)]
    else:
        pairs = [(g, f) for g in optimizer.param_groups for f in g["params"]]
    for group, flat in pairs:
        on_device = group.get("fused") or group.get("capturable")  # where torch's AdamW keeps `step`
        st = optimizer.state[flat]
        if not st:
            st.update(exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
        if step is not None or "step" not in st:
            st["step"] = torch.tensor(float(step or 0), device=flat.device if on_device else "cpu")
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 (ZeRO-3 reads the states directly)
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _adam_step(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """The (common) step count of the engine's AdamW states, None before the first step."""
    for s in optimizer.state.values():
        if "step" in s:
            step = s["step"]
            return step.detach().cpu().float() if torch.is_tensor(step) else torch.tensor(float(step))
    return None


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _layer_classes(llm: nn.Module) -> set[str]:
    """Class names of the decoder layers, from the transformers model's `_no_split_modules`."""
    names = set(getattr(llm, "_no_split_modules", None) or ())
    if not names:
        raise ValueError(f"{type(llm).__name__} declares no `_no_split_modules`: FSDP cannot find its decoder layers")
    return names


def make_strategy(name: str, world: int, device: torch.device) -> DDPStrategy:
    """`name` resolved (no `auto`). One process has nothing to shard: it runs the bare module, except under
    DeepSpeed, whose engine (ZeRO over one rank, its clipping and optimizer step) runs as it would on N GPUs."""
    if name == "ddp" or (world == 1 and not name.startswith("deepspeed-zero")):
        return DDPStrategy(world, device)
    if name.startswith("deepspeed-zero"):
        return DeepSpeedStrategy(world, device, stage=int(name[-1]))
    return FSDPStrategy(world, device, reshard_after_forward=name == "fsdp-full-shard")
