"""Vision feature cache: with a frozen tower, each image is encoded once, ever.

Layout: `DIR/<namespace>/shard-<rank>-<uuid>.safetensors`, one tensor per image, named by a hash of the
image key (resolved path, size, mtime). The namespace is a hash of everything that changes the features:
the encoder's config (source, layer, feature selection, image size), a fingerprint of its weights, the
image preprocessing (size, mean, std, aspect mode) and the feature dtype; change any of them and the
cache misses (the old namespace is left alone). Shards are written to a temp file and renamed, so a
crash never leaves a half-written shard where readers look; each shard lists its own keys, so several
ranks write side by side without a shared index.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minillava.images import ImageTransform
from minillava.vision import VisionTower

SHARD_GLOB = "shard-*.safetensors"
RACY_NS = 2_000_000_000  # a listing this soon after the directory's mtime may have missed a same-tick write
RELIST_NS = 100_000_000  # how often such an unsettled directory may be listed again


def _name(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """Cheap identity of a tower's weights: each tensor's name, shape, sum and first values."""
    h = hashlib.sha1()
    with torch.no_grad():
        for name, t in module.state_dict().items():
            flat = t.detach().reshape(-1)
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(flat[:64].float().cpu().numpy().tobytes())
            h.update(repr(float(flat.float().sum())).encode() if flat.numel() else b"")
    return h.hexdigest()


def namespace_for(vision: VisionTower, transform: ImageTransform, dtype: torch.dtype) -> dict:
    return {
        "format": 1,
        "vision": asdict(vision.config),
        "weights": weights_fingerprint(vision),
        "transform": transform.to_dict(),
        "dtype": str(dtype),
    }


class FeatureCache:
    def __init__(self, root: str | Path, namespace: dict, rank: int = 0, shard_size: int = 256) -> None:
        digest = hashlib.sha256(json.dumps(namespace, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root).expanduser() / digest
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "namespace.json"
        if not meta.exists():
            tmp = meta.with_suffix(f".{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps(namespace, indent=2) + "\n")
            os.replace(tmp, meta)
        self.rank, self.shard_size = rank, shard_size
        self.index: dict[str, str] = {}  # tensor name -> shard file name
        self.pending: dict[str, torch.Tensor] = {}
        self._handles: dict[str, object] = {}
        self._shards: set[str] = set()  # shard files already in the index
        self._listed = (-1, -1)  # (the directory's mtime, when) at the last listing
        self.refresh()

    def refresh(self) -> None:
        """Re-read the shard list: other ranks, another process (a DataLoader worker reads while the main
        process writes) or an earlier epoch may have added shards. A new shard is renamed into the directory,
        which changes its mtime, so the directory is listed again when its mtime moved, or, if the last listing
        came less than 2 s after that mtime (a later write may fall in the same timestamp tick: git's racy
        rule), at most every 0.1 s."""
        mtime, now = self.dir.stat().st_mtime_ns, time.time_ns()
        seen_mtime, seen_at = self._listed
        if mtime == seen_mtime and (seen_at - mtime > RACY_NS or now - seen_at < RELIST_NS):
            return
        self._listed = (mtime, now)
        for shard in sorted(self.dir.glob(SHARD_GLOB)):
            if shard.name in self._shards:
                continue
            try:
                with safe_open(shard, "pt") as f:
                    for k in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                        self.index.setdefault(k, shard.name)
            except Exception:  # noqa: BLE001 - an unreadable shard is a miss, never a crash
                continue
            self._shards.add(shard.name)

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return _name(key) in self.index

    def get(self, key: str) -> torch.Tensor | None:
        name = _name(key)
        if name not in self.index and name not in self.pending:
            self.refresh()  # one stat() while nothing new was written
        shard = self.index.get(name)
        if shard is None:
            return self.pending.get(name)
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(self.dir / shard, "pt")
        return handle.get_tensor(name)

    def put(self, key: str, features: torch.Tensor) -> None:
        name = _name(key)
        if name not in self.index and name not in self.pending:
            self.pending[name] = features.detach().to("cpu").contiguous().clone()
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        shard = f"shard-{self.rank}-{uuid.uuid4().hex[:12]}.safetensors"
        tmp = self.dir / f".{shard}.tmp"
        save_file(self.pending, tmp)
        os.replace(tmp, self.dir / shard)
        for name in self.pending:
            self.index[name] = shard
        self._shards.add(shard)
        self.pending = {}

    def __getstate__(self) -> dict:  # DataLoader workers get the index, not open file handles
        state = dict(self.__dict__)
        state["_handles"], state["pending"] = {}, {}
        return state
