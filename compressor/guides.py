"""Guides: the larger models a stage learns from, and the optional logit cache.

:class:`GuideSet` keeps every guide in eval mode without gradients, runs only
the guides kept for a batch (dropped guides cost nothing), under
``torch.inference_mode`` and the accelerator's autocast, and returns logits
that autograd may use.

:class:`GuideLogitCache` (``--cache-guides``) stores each guide's logits per
(epoch, step) on disk, FKD-style. Data order and augmentation depend only on
the run's seed (see ``pipeline``), so a guide sees the same augmented batch at
(epoch, step) in every stage of a chain and in every run with the same seed,
data and batch settings: the teacher runs once for all stages and for all
methods of a study. Logits are stored as float16 (10 classes x 128 images x
391 steps x 160 epochs = 160 MB per guide on CIFAR-10). The cache key hashes
the guide's weights and every setting that changes the batches; a different
setting simply misses. Single-process only (each process of a multi-process
run sees different batches; the cache is then off).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .fileio import atomic_write


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of a model's state dict (names, shapes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class GuideLogitCache:
    """Logits of one guide for every (epoch, step) of a run's batches."""

    def __init__(self, path: Path, epochs: int, steps: int, batch_size: int, num_classes: int):
        self.path = Path(path)
        self.shape = (epochs, steps, batch_size, num_classes)
        self.logits = torch.zeros(self.shape, dtype=torch.float16)
        self.filled = torch.zeros(epochs, steps, dtype=torch.uint8)
        self.rows = torch.zeros(epochs, steps, dtype=torch.int32)  # the last batch may be short
        self.dirty = False
        self.hits = self.misses = 0
        if self.path.exists():
            try:
                stored = load_file(str(self.path))
                if tuple(stored["logits"].shape) == self.shape:
                    self.logits, self.filled, self.rows = stored["logits"], stored["filled"], stored["rows"]
            except (SafetensorError, OSError, KeyError):
                pass  # a damaged cache is rebuilt

    def get(self, epoch: int, step: int) -> torch.Tensor | None:
        if epoch < self.shape[0] and step < self.shape[1] and self.filled[epoch, step]:
            self.hits += 1
            return self.logits[epoch, step, : int(self.rows[epoch, step])]
        self.misses += 1
        return None

    def put(self, epoch: int, step: int, logits: torch.Tensor) -> None:
        if epoch >= self.shape[0] or step >= self.shape[1]:
            return
        n = logits.shape[0]
        self.logits[epoch, step, :n] = logits.detach().to("cpu", torch.float16)
        self.rows[epoch, step] = n
        self.filled[epoch, step] = 1
        self.dirty = True

    def flush(self) -> None:
        if not self.dirty:
            return
        with atomic_write(self.path, suffix=".safetensors") as tmp:
            save_file({"logits": self.logits, "filled": self.filled, "rows": self.rows}, str(tmp))
        self.dirty = False


def cache_key(guide_fingerprint: str, settings: dict) -> str:
    blob = json.dumps({"guide": guide_fingerprint, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class GuideSet:
    """The guides of one stage; ``logits(kept, x, epoch, step)`` runs (or looks up) the kept ones."""

    def __init__(self, guides: Sequence[nn.Module], caches: Sequence[GuideLogitCache | None] | None = None):
        self.guides = list(guides)
        self.caches = list(caches) if caches is not None else [None] * len(self.guides)
        for g in self.guides:
            g.eval()
            g.requires_grad_(False)

    def __len__(self) -> int:
        return len(self.guides)

    def __getitem__(self, i: int) -> nn.Module:
        return self.guides[i]

    def logits(self, kept: Sequence[int], x: torch.Tensor, epoch: int, step: int, autocast) -> list[torch.Tensor]:
        out = []
        for i in kept:
            cache = self.caches[i]
            cached = cache.get(epoch, step) if cache is not None else None
            if cached is not None:
                out.append(cached.to(x.device, torch.float32))
                continue
            with torch.inference_mode(), autocast():
                z = self.guides[i](x)
            # Clone outside inference mode so autograd may save it for backward.
            z = z.float().clone()
            if cache is not None:
                # Round through float16 like a cache hit, so hits and misses train alike.
                z = z.half().float()
                cache.put(epoch, step, z)
            out.append(z)
        return out

    def flush(self) -> None:
        for cache in self.caches:
            if cache is not None:
                cache.flush()

    def cache_stats(self) -> list[tuple[int, int]]:
        return [(c.hits, c.misses) if c is not None else (0, 0) for c in self.caches]
