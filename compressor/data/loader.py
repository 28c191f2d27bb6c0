"""One loader interface over both backends: :func:`make_loader`, :class:`EpochSampler`, :func:`subset`.

Order comes from :class:`EpochSampler`, a pure function of ``(seed, epoch)``,
so it is the same in every process, for both backends, for any number of
workers and after a resume. Batches are gathered by the dataset's
``__getitems__`` (one indexing op in memory, one worker per batch when
streaming) and passed through unchanged (identity collate). The loader
survives ``accelerate.Accelerator.prepare``.
"""
from __future__ import annotations

import torch

from .memory import BatchedSplit, ImageSplit, eval_images, subset_images
from .stream import FileSplit, StreamDataset, default_workers, eval_files, subset_files, worker_init


class EpochSampler(torch.utils.data.Sampler):
    """Indices ``0..n-1``, ``repeats`` times per epoch: each pass a permutation seeded by
    ``seed * 1_000_003 + epoch * repeats + pass`` when ``shuffle``.

    The order is a pure function of (n, seed, epoch, repeats), identical in every
    process and after a resume; call :meth:`set_epoch` before each epoch. ``repeats``
    passes make one epoch (``--epoch-repeats``: a small data set trains for more than a
    few dozen steps per epoch, as timm's ``--epoch-repeats``); with 1 the order is the
    plain per-epoch permutation. With ``with_epoch`` it yields ``(pass, index)`` pairs
    (``pass = epoch * repeats + k``), for datasets that seed per-sample augmentation by
    them, so a repeated image gets a new crop in each pass.
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int, with_epoch: bool = False, repeats: int = 1):
        if int(repeats) < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.n = int(n)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.with_epoch = bool(with_epoch)
        self.repeats = int(repeats)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def passes(self) -> list[int]:
        """The numbers of this epoch's passes over the data (the epoch itself when ``repeats`` is 1)."""
        return [self.epoch * self.repeats + k for k in range(self.repeats)]

    def _pass_order(self, p: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + p)
        return torch.randperm(self.n, generator=g).tolist()

    def _tagged(self) -> list[tuple[int, int]]:
        return [(p, i) for p in self.passes() for i in self._pass_order(p)]

    def order(self) -> list[int]:
        return [i for _, i in self._tagged()]

    def __iter__(self):
        return iter(self._tagged() if self.with_epoch else self.order())

    def __len__(self) -> int:
        return self.n * self.repeats


def subset(split, indices):
    """A new split with the samples at ``indices`` (sequence, range, slice, index or bool tensor)."""
    if isinstance(indices, slice):
        indices = range(len(split))[indices]
    idx = torch.as_tensor(indices if not isinstance(indices, range) else list(indices))
    if idx.dtype == torch.bool:
        idx = idx.nonzero().flatten()
    idx = idx.to(torch.int64).reshape(-1)
    if isinstance(split, FileSplit):
        return subset_files(split, idx)
    return subset_images(split, idx)


def as_eval(split):
    """``split`` in the evaluation view of its data (:mod:`.view`): what a validation split cut
    from the training split must be scored on, so that it sees the same pixels as the test split
    would for the same file. A split already in its evaluation view is returned as it is."""
    if isinstance(split, FileSplit):
        return eval_files(split)
    if isinstance(split, ImageSplit):
        return eval_images(split)
    raise TypeError(f"as_eval takes an ImageSplit or a FileSplit, got {type(split).__name__}")


def _identity(batch):
    return batch


def make_loader(split, batch_size: int, *, shuffle: bool, seed: int = 0, drop_last: bool = False,
                policy: str | None = None, workers: int | None = None,
                pin_memory: bool | None = None, repeats: int = 1) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` yielding ``(images_uint8, labels_int64)`` batches, already collated.

    ``split`` is an :class:`ImageSplit` (memory) or a :class:`FileSplit` (stream:
    ``workers`` processes, default :func:`default_workers`; pinned memory when a
    GPU is present). ``policy="imagenet"`` with ``shuffle`` makes the loader
    apply RandomResizedCrop + flip per sample (``loader.dataset.augments`` is
    then true and the training loop does not augment again).
    ``loader.sampler`` is the :class:`EpochSampler`; call ``set_epoch(e)`` each epoch.
    ``repeats`` passes over ``split`` make one epoch (training loaders of small data sets).
    """
    augments = policy == "imagenet" and shuffle
    sampler = EpochSampler(len(split), shuffle=shuffle, seed=seed, with_epoch=augments, repeats=repeats)
    kwargs = {}
    if isinstance(split, FileSplit):
        dataset = StreamDataset(split, "imagenet" if augments else None, seed)
        n_workers = default_workers() if workers is None else int(workers)
        if n_workers > 0:
            kwargs = dict(num_workers=n_workers, worker_init_fn=worker_init, prefetch_factor=2)
        kwargs["pin_memory"] = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
    elif isinstance(split, ImageSplit):
        dataset = BatchedSplit(split, "imagenet" if augments else None, seed)
    else:
        raise TypeError(f"make_loader takes an ImageSplit or a FileSplit, got {type(split).__name__}")
    return torch.utils.data.DataLoader(dataset, batch_size=int(batch_size), sampler=sampler,
                                       collate_fn=_identity, drop_last=drop_last, **kwargs)


def channel_stats(split, n: int = 2000, seed: int = 0, workers: int | None = None) -> tuple[list, list]:
    """Per-channel mean and std of ``x / 255`` over ``n`` images of ``split`` (a seeded sample).

    What ``compress train`` stores as the normalisation of a new data set.
    """
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(len(split), generator=g)[: min(int(n), len(split))].sort().values
    part = subset(split, idx)
    total = sq = None
    count = 0
    for images, _ in make_loader(part, 256, shuffle=False, workers=workers, pin_memory=False):
        x = images.to(torch.float64).div_(255.0).transpose(0, 1).reshape(images.shape[1], -1)
        total = x.sum(1) if total is None else total + x.sum(1)
        sq = (x * x).sum(1) if sq is None else sq + (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = (sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return [round(float(v), 4) for v in mean], [round(max(float(v), 1e-3), 4) for v in std]
