"""Unlabeled images for distillation (``compress distill --unlabeled DIR``).

The guides label these images with their softened outputs; the student learns
from the KD terms alone (:func:`compressor.losses.guides_kd_loss`).

**Folder.** ``DIR`` holds images, in any layout: flat, nested, or an ImageFolder
(class folders are listed like any sub-folder; their names are never read). When
``DIR`` has a ``train/`` sub-folder (an ImageFolder root), only ``train/`` is read,
so its ``val/``/``test/`` images never train. Files are listed as
:func:`.formats._image_files` lists a class folder (recursive, sorted, each real
file once, hidden files left out).

**Pixels.** The same as the labelled training split: its size, channels and
augmentation policy (:func:`load_unlabeled` takes them from the labelled data),
the same decoding (:func:`.formats.decode_file`), and the same store size under
the imagenet policy. Backend: ``memory`` or ``stream`` chosen like the labelled
data's (:func:`.load.choose_mode`). Labels are ``-1`` and are never read.

**Order.** An endless stream of seeded permutations of the set: the unlabeled
batch taken at step ``s`` of epoch ``e`` by process ``r`` of ``W`` is a pure
function of (seed, e, s, r, W, steps per epoch, batch size)
(:func:`unlabeled_positions`) -- the same in every stage of a chain, after a
resume, with any number of loader workers, and disjoint between processes. An
epoch stays defined by the labelled set: an epoch takes ``steps`` unlabeled
batches and the next epoch goes on where it stopped, so every unlabeled image is
seen once before any is seen twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CompressError
from .formats import IMAGE_EXTENSIONS, BadFiles, _image_files, probe_files
from .load import choose_mode
from .memory import BatchedSplit, ImageSplit, decode_into
from .stream import FileSplit, StreamDataset, default_workers, worker_init
from .view import eval_view


@dataclass
class UnlabeledSet:
    """The images of ``--unlabeled DIR`` as a split (labels ``-1``), with what a run records."""

    folder: str
    split: object  # ImageSplit (memory) or FileSplit (stream)
    mode: str
    skipped: int = 0
    notes: list = field(default_factory=list)
    kind: str = "unlabeled"  # unlabeled: a folder's images; mixed: mixes of the training images (--kd-mixup)
    _fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.split)

    def fingerprint(self) -> str:
        """sha256 of the set (:meth:`ImageSplit.fingerprint`: the decoded pixels; streamed: the
        file list with sizes and mtimes), computed once."""
        if self._fingerprint is None:
            self._fingerprint = str(self.split.fingerprint())
        return self._fingerprint

    def record(self) -> dict:
        """What ``config.yaml`` and ``summary.json`` record about the set."""
        out = {"folder": self.folder, "images": len(self), "fingerprint": self.fingerprint(), "data_mode": self.mode}
        if self.skipped:
            out["skipped_images"] = self.skipped
        return out


def list_unlabeled(path) -> tuple[Path, list[str]]:
    """``(folder read, image files)`` of ``--unlabeled PATH`` (see the module docstring)."""
    root = Path(str(path)).expanduser()
    if not root.exists():
        raise CompressError(f"--unlabeled folder {str(path)!r} does not exist; pass a folder of images")
    if not root.is_dir():
        raise CompressError(f"--unlabeled {str(path)!r} is a file, not a folder; pass the folder that holds the "
                            f"images (unpack archives first)")
    folder = root / "train" if (root / "train").is_dir() else root
    files = _image_files(folder)
    if not files:
        raise CompressError(f"--unlabeled folder {str(folder)!r} has no images ({'/'.join(IMAGE_EXTENSIONS)}); "
                            f"put image files in it or in its sub-folders")
    return folder, files


def load_unlabeled(path, *, input_size, policy: str, mode: str = "auto", skip_bad_images: bool = False,
                   processes: int | None = None) -> UnlabeledSet:
    """The unlabeled images at the labelled split's ``input_size`` (C, H, W) and ``policy``.

    Every file's header is read first; undecodable files are reported all together
    (exit 2), or left out and counted with ``skip_bad_images``, as for labelled data.
    """
    folder, files = list_unlabeled(path)
    channels, size = int(input_size[0]), (int(input_size[1]), int(input_size[2]))
    bad = BadFiles()
    probes = probe_files(files)
    keep = []
    for f, p in zip(files, probes):
        if isinstance(p, str):
            bad.add(f, p)
        else:
            keep.append(f)
    if not keep:
        raise CompressError(f"no image in the --unlabeled folder {str(folder)!r} can be decoded; check the files")
    view = eval_view(policy, size)
    store = view.store if policy == "imagenet" else None
    stored = store or size
    chosen, why = choose_mode(mode, len(keep) * channels * stored[0] * stored[1], processes)
    notes = [f"unlabeled: {len(keep)} images in {folder} at {size[0]}x{size[1]}, {channels} channel"
             f"{'s' if channels > 1 else ''}; {why}"]
    if chosen == "stream":
        bad.check(skip_bad_images, len(files))
        split = FileSplit(keep, torch.full((len(keep),), -1, dtype=torch.int64), size, channels, 1.0, store)
    else:
        images, ok = decode_into(keep, stored, channels, 1.0, bad)
        bad.check(skip_bad_images, len(files))
        if not bool(ok.all()):
            images = images.index_select(0, ok.nonzero().flatten()).contiguous()
        labels = torch.full((images.shape[0],), -1, dtype=torch.int64)
        split = (ImageSplit(None, labels, source=images, size=size) if stored != size
                 else ImageSplit(images, labels))
    if len(split) == 0:
        raise CompressError(f"no decodable images left in the --unlabeled folder {str(folder)!r}")
    if len(bad):
        notes.append(f"unlabeled: skipped {len(bad)} undecodable image file{'s' if len(bad) > 1 else ''} "
                     f"(--skip-bad-images)")
    return UnlabeledSet(str(folder), split, chosen, len(bad), notes)


MIXED_POOL_FACTOR = 4  # mixed images made per training image (--kd-mixup)
MIXED_FOLDER = "mixed training images (--kd-mixup)"


def mixed_pixels(pixels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` pairwise mixes of ``pixels`` (uint8 ``(N, C, H, W)``): mix ``k`` is
    ``round(w_k·a + (1 − w_k)·b)`` with ``a, b = pixels[randint(N)]`` drawn independently and
    ``w_k ~ U(0, 1)`` (mixup's Beta(1, 1)); from one generator seeded by ``seed``, in the order
    ``a`` indices, ``b`` indices, weights. Made in chunks (no float copy of the whole set)."""
    if pixels.dim() != 4 or pixels.dtype != torch.uint8:
        raise ValueError(f"pixels must be uint8 (N, C, H, W), got {pixels.dtype} {tuple(pixels.shape)}")
    n = pixels.shape[0]
    g = torch.Generator().manual_seed(int(seed))
    first = torch.randint(0, n, (count,), generator=g)
    second = torch.randint(0, n, (count,), generator=g)
    weight = torch.rand(count, generator=g).view(count, 1, 1, 1)
    out = torch.empty((count, *pixels.shape[1:]), dtype=torch.uint8)
    for lo in range(0, count, 1024):
        hi = min(count, lo + 1024)
        w = weight[lo:hi]
        mix = w * pixels[first[lo:hi]].float() + (1 - w) * pixels[second[lo:hi]].float()
        out[lo:hi] = (mix + 0.5).clamp_(0, 255).to(torch.uint8)
    return out


def mixed_training_set(split: ImageSplit, *, seed: int, factor: int = MIXED_POOL_FACTOR) -> UnlabeledSet:
    """Unlabeled images made from the labelled training ``split`` (``--kd-mixup``): ``factor`` mixes
    per training image (:func:`mixed_pixels`) of its stored pixels (the imagenet policy's larger
    ``source`` when it has one, so the loader's crops draw from mixes as from photos). The guides
    label them like ``--unlabeled`` images, and the student learns the guides' function between
    the training images (Beyer et al. 2022, "function matching"; the pool is mixed before the
    augmentation, from image pairs drawn apart from the labelled batches). Only the training split
    is mixed, never the validation or test images. A streamed split (its pixels are not in memory)
    is refused: :func:`~compressor.training_defaults.resolve_kd_mixup` turns the mixes off there.
    Every process of a multi-process run makes the same pool (seeded, bounded by that rule)."""
    if not isinstance(split, ImageSplit):
        raise TypeError(f"mixes are made from a split held in memory (ImageSplit), got {type(split).__name__}")
    pixels = split.source if split.source is not None else split.images
    pool = mixed_pixels(pixels, factor * pixels.shape[0], seed)
    labels = torch.full((pool.shape[0],), -1, dtype=torch.int64)
    images = (ImageSplit(None, labels, source=pool, size=split.size) if split.source is not None
              else ImageSplit(pool, labels))
    note = (f"unlabeled: {pool.shape[0]} mixes of pairs of the {pixels.shape[0]} training images "
            f"({factor} per image; --no-kd-mixup: none)")
    return UnlabeledSet(MIXED_FOLDER, images, "memory", 0, [note], kind="mixed")


def unlabeled_batch_size(batch_size: int, ratio: float) -> int:
    """Unlabeled images per step: ``max(1, round(ratio * batch_size))``."""
    return max(1, int(round(float(ratio) * int(batch_size))))


def _permutation(n: int, seed: int, rank_pass: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(rank_pass))
    return torch.randperm(n, generator=g)


def unlabeled_positions(n: int, batch: int, *, seed: int, epoch: int, step: int, steps_per_epoch: int,
                        rank: int = 0, world: int = 1, _perms: dict | None = None) -> list[int]:
    """The indices (into a set of ``n``) of the unlabeled batch of (``epoch``, ``step``) for process
    ``rank`` of ``world``.

    The stream is the concatenation of permutations ``perm_0, perm_1, ...`` of ``0..n-1``
    (``perm_p`` seeded by ``seed * 1_000_003 + p``, as :class:`.loader.EpochSampler`); global batch
    ``g = (epoch * steps_per_epoch + step) * world + rank`` takes its positions
    ``g * batch .. g * batch + batch - 1``. ``_perms`` caches permutations between calls.
    """
    g = (int(epoch) * int(steps_per_epoch) + int(step)) * int(world) + int(rank)
    perms = {} if _perms is None else _perms
    out = []
    for pos in range(g * batch, g * batch + batch):
        p, i = divmod(pos, n)
        if p not in perms:
            if len(perms) > 4:
                perms.clear()
            perms[p] = _permutation(n, seed, p)
        out.append(int(perms[p][i]))
    return out


class _BatchPlan(torch.utils.data.Sampler):
    """The batch sampler of :class:`UnlabeledStream`: one epoch's batches from ``start_step`` on."""

    def __init__(self, n: int, batch: int, seed: int, rank: int, world: int, keyed: bool):
        self.n, self.batch, self.seed, self.rank, self.world, self.keyed = n, batch, seed, rank, world, keyed
        self.epoch = self.steps = self.start = 0
        self._perms: dict = {}

    def __iter__(self):
        for step in range(self.start, self.steps):
            idx = unlabeled_positions(self.n, self.batch, seed=self.seed, epoch=self.epoch, step=step,
                                      steps_per_epoch=self.steps, rank=self.rank, world=self.world,
                                      _perms=self._perms)
            if self.keyed:  # per-sample RandomResizedCrop, seeded by the global batch: fresh crops every pass
                g = (self.epoch * self.steps + step) * self.world + self.rank
                yield [(g, i) for i in idx]
            else:
                yield idx

    def __len__(self) -> int:
        return max(0, self.steps - self.start)


class UnlabeledStream:
    """Unlabeled batches (uint8 ``(B, C, H, W)``, CPU) for the steps of each epoch.

    ``augments``: the batches come augmented (imagenet policy: RandomResizedCrop + flip per
    sample, in the loader); otherwise the trainer applies the cifar batch augmentation itself,
    as for the labelled batches. Streamed sets are decoded by ``workers`` loader processes.
    """

    def __init__(self, unlabeled: UnlabeledSet, batch_size: int, *, seed: int, policy: str | None,
                 rank: int = 0, world: int = 1, workers: int | None = None):
        self.unlabeled = unlabeled
        self.batch_size = int(batch_size)
        self.augments = policy == "imagenet"
        split = unlabeled.split
        self.plan = _BatchPlan(len(split), self.batch_size, seed, rank, world, self.augments)
        kwargs = {}
        if isinstance(split, FileSplit):
            dataset = StreamDataset(split, "imagenet" if self.augments else None, seed)
            n_workers = default_workers() if workers is None else int(workers)
            if n_workers > 0:
                kwargs = dict(num_workers=n_workers, worker_init_fn=worker_init, prefetch_factor=2)
            kwargs["pin_memory"] = torch.cuda.is_available()
        else:
            dataset = BatchedSplit(split, "imagenet" if self.augments else None, seed)
        self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=self.plan, collate_fn=_images_only,
                                                  **kwargs)

    def epoch(self, epoch: int, steps: int, start_step: int = 0):
        """An iterator over the unlabeled batches of steps ``start_step .. steps - 1`` of ``epoch``."""
        self.plan.epoch, self.plan.steps, self.plan.start = int(epoch), int(steps), int(start_step)
        return iter(self.loader)


def _images_only(batch):
    images, _labels = batch  # the labels are -1 placeholders: never read
    return images


__all__ = ["UnlabeledSet", "UnlabeledStream", "list_unlabeled", "load_unlabeled", "mixed_pixels",
           "mixed_training_set", "unlabeled_batch_size", "unlabeled_positions"]
