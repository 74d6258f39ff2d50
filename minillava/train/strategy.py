"""Data-parallel strategies of the training loop (Prismatic-style, swappable): DDP or FSDP2.

    ddp                 every rank holds the whole model; DDP all-reduces gradients (one process: no wrapper)
    fsdp-full-shard     torch FSDP2 `fully_shard`: parameters, gradients and optimizer states sharded over the
                        ranks, parameters re-gathered in backward (FSDP1 FULL_SHARD, ~ZeRO-3)
    fsdp-shard-grad-op  the same, but parameters stay gathered from forward to backward (SHARD_GRAD_OP, ~ZeRO-2)

FSDP units: each LLM decoder layer (transformers' `_no_split_modules`, what accelerate's TRANSFORMER_BASED_WRAP
picks); everything else (embeddings, head, projector, a trained vision tower) is the root unit, whose
gradients are reduced once at the end of backward. That keeps the order of collectives the same on every
rank: a text-only micro-batch reaches the projector (and a trained tower) through a zero-weight side path,
so a unit of its own would reduce its gradients at a different moment than on a rank with images. A
frozen vision tower is not sharded at all (`ignored_params`): it has no gradients, and the loop runs it
outside the step (feature cache). Every strategy averages gradients over ranks, so the loss sequence
equals one process's with the same global batch.
"""

from __future__ import annotations

import contextlib
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
        raise ValueError(
            "DeepSpeed launches are not supported (minillava trains with DDP or FSDP2); use "
            "configs/accelerate/fsdp-shard-grad-op.yaml (~ZeRO-2) or fsdp-full-shard.yaml (~ZeRO-3)"
        )
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


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor


class DDPStrategy:
    """The whole model on every rank; one process runs the bare module."""

    name = "ddp"

    def __init__(self, world: int, device: torch.device) -> None:
        self.world, self.device = world, device

    def wrap(self, step: nn.Module, model: nn.Module, tune_vision: bool) -> nn.Module:
        if self.world == 1:
            return step
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(step, device_ids=ids)

    def grad_sync(self, module: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Gradients are exchanged on the last micro-batch of a step only."""
        return contextlib.nullcontext() if sync or self.world == 1 else module.no_sync()

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


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _layer_classes(llm: nn.Module) -> set[str]:
    """Class names of the decoder layers, from the transformers model's `_no_split_modules`."""
    names = set(getattr(llm, "_no_split_modules", None) or ())
    if not names:
        raise ValueError(f"{type(llm).__name__} declares no `_no_split_modules`: FSDP cannot find its decoder layers")
    return names


def make_strategy(name: str, world: int, device: torch.device) -> DDPStrategy:
    """`name` resolved (no `auto`). One process has nothing to shard: it runs the bare module."""
    if name == "ddp" or world == 1:
        return DDPStrategy(world, device)
    return FSDPStrategy(world, device, reshard_after_forward=name == "fsdp-full-shard")
