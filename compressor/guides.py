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
methods of a study. Single-process only (each process of a multi-process run
sees different batches; the cache is then off).

Layout: one folder per guide and settings, ``<cache>/guides/<key>/``, holding
``settings.json`` (what the key hashes, for people) and one safetensors shard per
epoch, ``epoch-00000.safetensors``: ``filled`` (uint8, one per step), ``rows``
(int32, the last batch may be short) and the logits of every step of the epoch.
A shard is replaced atomically (:func:`~compressor.fileio.atomic_write`) when
the trainer flushes, i.e. at the end of every epoch and on Ctrl-C; a partly
filled shard (interrupted epoch, or a guide dropped for some batches) is loaded
back into memory and completed by the next run.

Memory: a complete shard is read through ``safetensors.safe_open`` (a memory
map; each step reads only its own slice); only the epoch being filled is held in
memory. So RAM holds at most one epoch of logits, whatever the number of
epochs: ``steps x batch x classes x 2`` bytes dense (391 x 128 x 100 x 2 = 10 MB
for CIFAR-100), ``steps x batch x (4k + 4)`` bytes top-k (5005 x 256 x 84 =
108 MB for ImageNet, where dense would be 2.6 GB per epoch).

Storage: float16 logits when there are at most :data:`TOPK_ABOVE_CLASSES` (100)
classes. With more classes, sparse soft labels: per row the :data:`TOPK` (20)
largest logits (float16) with their class indices (int16), plus ``rest``, the
float32 ``logsumexp`` of the other logits divided by the KD temperature ``T``.
:func:`densify` rebuilds a full row for the KD loss by giving each of the
``C - k`` other classes the same logit ``T * (rest - log(C - k))``: their total
``exp(z / T)`` is then exactly the original one, so ``softmax(z / T)`` of the
rebuilt row equals the original on the top k classes (up to float16 rounding)
and spreads the remaining probability uniformly over the others. ``T`` is
therefore part of the key of a top-k cache.

Key (:func:`cache_key`): the guide's weights (:func:`weights_fingerprint`) and
what it is besides them (:func:`compressor.models.model_identity`: architecture,
options such as ``stem``, classes, channels and, for user code, the sha256 of its
file -- the same weights under another stem give other logits), the
content of the training split (:func:`data_fingerprint`), the image size, the
augmentation policy, :data:`BATCH_CODE_VERSION`, and the other settings that
change the batches or the logits (seed, batch size, normalisation, precision,
memory format, subset/validation split, storage format). Any change is a miss
(a new folder), never stale logits. The number of epochs is not in the key:
epoch ``e`` has the same batches in a 30- and a 160-epoch run.

Unlabeled images (``--unlabeled``): their batches get caches of their own, keyed
by the same settings plus ``unlabeled`` (the unlabeled set's fingerprint, image
count, batch size and batch-code version; ``pipeline._guide_cache_opener``), so
the labelled caches stay shared with runs without unlabeled images.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .data import augment_batch, batch_augmentation
from .fileio import atomic_write, write_json

# Bump when the code that makes a batch from the data changes (sampler order,
# augment_batch, normalize, make_loader): cached logits of old batches then miss.
BATCH_CODE_VERSION = 2

# Top-k sparse soft labels above this many classes (CIFAR-100 stays dense and exact).
TOPK_ABOVE_CLASSES = 100
TOPK = 20


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of a model's state dict (names, shapes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_fingerprint(split) -> str:
    """A content fingerprint of a data split: its ``fingerprint()`` (both backends have one:
    the decoded pixels and labels in memory, the file list with sizes and mtimes when
    streamed; 0.15-0.5 s for 50,000 CIFAR images in memory, benchmarks/guide_cache.py)."""
    return str(split.fingerprint())


def top_k_for(num_classes: int) -> int | None:
    """The number of logits kept per row: ``None`` (all, dense) up to 100 classes, else 20."""
    return min(TOPK, num_classes) if num_classes > TOPK_ABOVE_CLASSES else None


def _index_dtype(num_classes: int) -> torch.dtype:
    return torch.int16 if num_classes <= torch.iinfo(torch.int16).max else torch.int32


def sparsify(logits: torch.Tensor, k: int, temperature: float) -> dict[str, torch.Tensor]:
    """Top-k soft labels of float logits ``(N, C)``: ``values`` float16 ``(N, k)``, ``indices``
    ``(N, k)`` and ``rest`` float32 ``(N,)`` = ``logsumexp`` over the other classes of ``z / T``."""
    z = logits.float()
    num_classes = z.shape[1]
    if not 0 < k < num_classes:
        raise ValueError(f"top-k needs 0 < k < classes, got k={k} for {num_classes} classes")
    values, indices = z.topk(k, dim=1)
    others = z.scatter(1, indices, float("-inf"))
    rest = torch.logsumexp(others / float(temperature), dim=1)
    return {"values": values.half(), "indices": indices.to(_index_dtype(num_classes)), "rest": rest}


def fit_float16(logits: torch.Tensor) -> torch.Tensor:
    """Float32 logits ``(N, C)`` whose float16 copy is finite and gives the same softmax.

    A row with a logit beyond float16's range (+-65,504; an untrained or badly
    scaled guide in eval mode reaches 1e5) would be stored as ``inf`` and the KD
    loss would be NaN at the first step. Softmax is unchanged by subtracting a
    row's maximum, so such rows are shifted to a maximum of 0 and clipped at
    -65,504 (``exp(-65504 / T)`` underflows to 0 in float32 for any T up to ~600). Rows in range
    are returned unchanged, so ordinary logits are stored exactly as before.
    """
    limit = torch.finfo(torch.float16).max
    out_of_range = logits.abs().amax(dim=1, keepdim=True) > limit
    if not bool(out_of_range.any()):  # the usual case: one reduction per cached batch
        return logits
    shifted = (logits - logits.amax(dim=1, keepdim=True)).clamp(min=-limit)
    return torch.where(out_of_range, shifted, logits)


def densify(values: torch.Tensor, indices: torch.Tensor, rest: torch.Tensor, num_classes: int,
            temperature: float) -> torch.Tensor:
    """Full float32 logits ``(N, C)`` from top-k soft labels (see the module docstring):
    the top-k classes keep their logits, the others get ``T * (rest - log(C - k))``."""
    k = values.shape[1]
    fill = float(temperature) * (rest.float() - math.log(num_classes - k))
    out = fill.unsqueeze(1).expand(values.shape[0], num_classes).clone()
    return out.scatter_(1, indices.long(), values.float())


class GuideLogitCache:
    """Logits of one guide for every (epoch, step) of a run's batches, one shard per epoch.

    ``directory`` holds the shards; ``epochs`` bounds the epochs this run stores (a
    later epoch is a miss, as is a step beyond ``steps``). ``top_k``: ``"auto"``
    (:func:`top_k_for`), ``None`` for dense, or a k; ``temperature`` is the KD
    temperature, used by top-k only.
    """

    def __init__(self, directory: Path, epochs: int, steps: int, batch_size: int, num_classes: int, *,
                 temperature: float = 1.0, top_k: int | None | str = "auto"):
        self.directory = Path(directory)
        self.epochs, self.steps, self.batch_size, self.num_classes = epochs, steps, batch_size, num_classes
        self.top_k = top_k_for(num_classes) if top_k == "auto" else top_k
        if self.top_k is not None and not 0 < self.top_k < num_classes:
            self.top_k = None  # keeping every class is the dense format
        self.temperature = float(temperature)
        self.hits = self.misses = 0
        self._epoch: int | None = None  # the epoch whose shard is open or being filled
        self._reader: dict | None = None  # slices of a complete shard (memory-mapped by safe_open)
        self._buffer: dict[str, torch.Tensor] | None = None  # the epoch being filled, in RAM
        self._filled = torch.zeros(steps, dtype=torch.uint8)
        self._rows = torch.zeros(steps, dtype=torch.int32)
        self._dirty = False

    # ------------------------------------------------------------------ format
    def _metadata(self) -> dict[str, str]:
        meta = {"format": "dense" if self.top_k is None else "topk", "steps": str(self.steps),
                "batch_size": str(self.batch_size), "num_classes": str(self.num_classes)}
        if self.top_k is not None:
            meta.update(k=str(self.top_k), temperature=repr(self.temperature))
        return meta

    def _layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of each logit tensor of a shard (besides ``filled`` and ``rows``)."""
        s, b, k = self.steps, self.batch_size, self.top_k
        if k is None:
            return {"logits": ((s, b, self.num_classes), torch.float16)}
        return {"values": ((s, b, k), torch.float16), "indices": ((s, b, k), _index_dtype(self.num_classes)),
                "rest": ((s, b), torch.float32)}

    def _empty_epoch(self) -> dict[str, torch.Tensor]:
        return {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in self._layout().items()}

    def _record(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        z = fit_float16(logits.detach().to("cpu", torch.float32))
        if self.top_k is None:
            return {"logits": z.half()}
        return sparsify(z, self.top_k, self.temperature)

    def _restore(self, record: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.top_k is None:
            return record["logits"]
        return densify(record["values"], record["indices"], record["rest"], self.num_classes, self.temperature)

    def shard_path(self, epoch: int) -> Path:
        return self.directory / f"epoch-{epoch:05d}.safetensors"

    # ------------------------------------------------------------------ epochs
    def _select(self, epoch: int) -> None:
        """Make ``epoch`` the current one: flush the previous, open (or load) its shard."""
        if epoch == self._epoch:
            return
        self.flush()
        self._epoch, self._reader, self._buffer = epoch, None, None
        self._filled = torch.zeros(self.steps, dtype=torch.uint8)
        self._rows = torch.zeros(self.steps, dtype=torch.int32)
        path = self.shard_path(epoch)
        if not path.exists():
            return
        try:
            reader = safe_open(str(path), framework="pt")
            layout = self._layout()
            if reader.metadata() != self._metadata() or set(reader.keys()) != {*layout, "filled", "rows"}:
                return  # another format: rebuilt
            if any(tuple(reader.get_slice(name).get_shape()) != shape for name, (shape, _) in layout.items()):
                return
            filled, rows = reader.get_tensor("filled"), reader.get_tensor("rows")
            if tuple(filled.shape) != (self.steps,) or tuple(rows.shape) != (self.steps,):
                return
            if bool(filled.all()):
                self._reader = {name: reader.get_slice(name) for name in layout}
            else:  # a partly filled epoch: completed in memory, written again at the next flush
                self._buffer = {name: reader.get_tensor(name).clone() for name in layout}
            self._filled, self._rows = filled.clone(), rows.clone()
        except (SafetensorError, OSError, KeyError, ValueError, RuntimeError):
            self._reader = self._buffer = None  # a damaged shard is rebuilt
            self._filled.zero_()

    def get(self, epoch: int, step: int) -> torch.Tensor | None:
        """The stored logits of (epoch, step) as the KD loss should see them, or ``None``."""
        if epoch >= self.epochs or step >= self.steps:
            self.misses += 1
            return None
        self._select(epoch)
        if not self._filled[step]:
            self.misses += 1
            return None
        n = int(self._rows[step])
        if self._buffer is not None:
            record = {name: t[step, :n] for name, t in self._buffer.items()}
        else:
            record = {name: stored[step, :n] for name, stored in self._reader.items()}
        self.hits += 1
        return self._restore(record)

    def put(self, epoch: int, step: int, logits: torch.Tensor) -> torch.Tensor:
        """Store a batch's logits; returns them as :meth:`get` will, on ``logits``' device,
        so that a run that fills the cache trains exactly like one that reads it."""
        record = self._record(logits)
        if epoch < self.epochs and step < self.steps:
            self._select(epoch)
            if self._buffer is None:
                self._buffer = self._empty_epoch()
                if self._reader is not None:  # complete shard: nothing should miss, but stay correct
                    for name, stored in self._reader.items():
                        self._buffer[name].copy_(stored[:])
                    self._reader = None
            n = logits.shape[0]
            for name, value in record.items():
                self._buffer[name][step, :n] = value
            self._rows[step] = n
            self._filled[step] = 1
            self._dirty = True
        return self._restore(record).to(logits.device, torch.float32)

    def flush(self) -> None:
        """Write the current epoch's shard (atomically) if it changed."""
        if not self._dirty or self._buffer is None or self._epoch is None:
            return
        with atomic_write(self.shard_path(self._epoch), suffix=".safetensors") as tmp:
            save_file({**self._buffer, "filled": self._filled, "rows": self._rows}, str(tmp),
                      metadata=self._metadata())
        self._dirty = False


def augmentation_policy(augment) -> dict:
    """The training augmentation as the key sees it: the policy (``cifar``, ``crop``, ``imagenet``,
    ``none``; the old booleans and an unresolved ``auto`` count as cifar/none as the
    training loop treats them), plus ``augment_batch``'s settings for cifar and crop."""
    if augment in (False, None, "none"):
        return {"policy": "none"}
    policy = "cifar" if augment in (True, "auto") else str(augment)
    batch_aug = batch_augmentation(policy)
    if batch_aug is None:
        return {"policy": policy}
    defaults = {name: p.default for name, p in inspect.signature(augment_batch).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {"policy": policy, **defaults, **batch_aug}


def cache_settings(cfg, train_split, input_size, mean, std, num_classes: int) -> dict:
    """Everything besides the guide's weights that changes a guide's batches or stored logits.

    ``cfg``: the run's config (seed, batch size, passes per epoch, augmentation, precision, memory
    format, subset/validation split, KD temperature); ``train_split``: the split the
    batches come from; ``input_size``: (C, H, W) of its images.
    """
    top_k = top_k_for(num_classes)
    return {"batch_code": BATCH_CODE_VERSION, "data": data_fingerprint(train_split),
            "image_size": [int(v) for v in input_size], "n_train": len(train_split),
            "augment": augmentation_policy(cfg.augment), "seed": cfg.seed, "batch_size": cfg.batch_size,
            "epoch_repeats": getattr(cfg, "epoch_repeats", None) or 1,
            "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "channels_last": cfg.channels_last, "mixed_precision": cfg.mixed_precision,
            "train_subset": cfg.train_subset, "val_fraction": cfg.val_fraction, "num_classes": num_classes,
            "storage": {"format": "dense"} if top_k is None else
            {"format": "topk", "k": top_k, "temperature": float(cfg.temperature)}}


def cache_key(guide_fingerprint: str, settings: dict) -> str:
    blob = json.dumps({"guide": guide_fingerprint, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def open_guide_cache(root: Path, guide: nn.Module, settings: dict, *, epochs: int, steps: int,
                     batch_size: int, num_classes: int, fingerprint: str | None = None) -> GuideLogitCache:
    """The cache of ``guide`` under ``root/<key>/`` (``settings`` from :func:`cache_settings`, plus
    the guide's :func:`~compressor.models.model_identity`); writes ``settings.json`` there the first
    time. ``fingerprint``: ``weights_fingerprint(guide)`` if the caller already has it."""
    from .models import model_identity

    fingerprint = fingerprint or weights_fingerprint(guide)
    settings = {**settings, "guide_model": model_identity(guide)}
    folder = Path(root) / cache_key(fingerprint, settings)
    if not (folder / "settings.json").exists():
        write_json(folder / "settings.json", {"guide": fingerprint, **settings})
    storage = settings["storage"]
    return GuideLogitCache(folder, epochs, steps, batch_size, num_classes,
                           temperature=storage.get("temperature", 1.0), top_k=storage.get("k"))


class GuideSet:
    """The guides of one stage; ``logits(kept, x, epoch, step)`` runs (or looks up) the kept ones."""

    def __init__(self, guides: Sequence[nn.Module], caches: Sequence[GuideLogitCache | None] | None = None,
                 autocast=None):
        """``autocast``: the guides' own autocast context factory (else the one ``logits`` is given:
        the training's), e.g. bf16 inference beside fp32 training (``PrecisionChoice.guides``)."""
        self.autocast = autocast
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
            with torch.inference_mode(), (self.autocast or autocast)():
                z = self.guides[i](x)
            # Clone outside inference mode so autograd may save it for backward.
            z = z.float().clone()
            if cache is not None:
                # As the cache stores it (float16, or top-k), so hits and misses train alike.
                z = cache.put(epoch, step, z)
            out.append(z)
        return out

    def flush(self) -> None:
        for cache in self.caches:
            if cache is not None:
                cache.flush()

    def cache_stats(self) -> list[tuple[int, int]]:
        return [(c.hits, c.misses) if c is not None else (0, 0) for c in self.caches]
