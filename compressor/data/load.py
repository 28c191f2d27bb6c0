"""``load_data``: find the data, choose the size, the channels and the backend, build the splits.

Rules (printed by the commands as ``bundle.notes``):

* **Size.** ``image_size`` if given (int: square; ``(H, W)``); else the native
  size when every image of the loaded splits shares it (a uniform non-square
  set stays non-square); else ``default_size`` (the model family's default,
  32 when nobody says). Images of another size are fitted: resized
  (antialiased, aspect ratio kept) to cover the size, then center-cropped; the test split
  (and a validation split, :func:`.loader.as_eval`) is seen through the one
  evaluation view of :mod:`.view` (imagenet policy: cover size/0.875, center-crop).
  Under the imagenet policy both backends start every view of an image from the
  same store-size source (:func:`.transforms.store_size`), so they give the same
  pixels for the same seed.
* **Channels.** ``channels`` if given (a model's ``in_chans``); else 1 when
  every image is grayscale (including 16-bit grayscale PNG), else 3.
* **Backend.** ``mode`` ``memory``, ``stream`` or ``auto``: auto keeps the
  splits in memory when their decoded bytes fit :data:`MEMORY_SHARE` of the
  available RAM divided by the processes of the run, and streams otherwise.
  CIFAR pickles and the demo set are always in memory (they are small).
* **Bad files.** Every file's header is read once; undecodable files are
  reported all together (:class:`.formats.BadFiles`, exit 2), or dropped and
  counted in ``bundle.skipped`` with ``skip_bad_images``.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CompressError
from .formats import DEMO_PATH, BadFiles, decode_demo, detect_format, probe_files, read_cifar, scan_imagefolder
from .memory import ImageSplit, decode_into, fit_images, resize_split, synthetic_split_pair
from .stream import FileSplit
from .transforms import resolve_policy
from .view import EvalView, eval_view

MODES = ("auto", "memory", "stream")
MEMORY_SHARE = 0.5  # auto: at most this share of the available RAM (per process) for decoded images


@dataclass
class DataBundle:
    """A train and a test split plus what they mean. ``train`` is ``None`` when only the
    test split was asked for (``compress eval``)."""

    name: str  # "demo", "cifar10", "cifar100", "imagefolder", "synthetic"
    train: object
    test: object
    class_names: list
    source: str
    mode: str = "memory"
    skipped: int = 0
    notes: list = field(default_factory=list)
    augment: str = "cifar"  # the augmentation policy the splits were made for (see .transforms)
    view: EvalView | None = None  # the evaluation view of the test split (see .view)
    indices: list | None = None  # load_sample: the sampled positions in the split's file list
    decoded: int | None = None  # load_sample: image files decoded

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple((self.train if self.train is not None else self.test).input_size)


def available_memory() -> int:
    """Bytes of RAM available now (``MemAvailable``), or the total when unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def world_size() -> int:
    """Processes of this run (torchrun / accelerate launch set ``WORLD_SIZE``)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def choose_mode(mode: str, decoded_bytes: int, processes: int | None = None) -> tuple[str, str]:
    """``(memory|stream, why)``; ``why`` gives the numbers behind an ``auto`` decision."""
    if mode not in MODES:
        raise CompressError(f"--data-mode must be one of {', '.join(MODES)}; got {mode!r}")
    if mode != "auto":
        return mode, f"data mode {mode} (given)"
    procs = processes or world_size()
    avail = available_memory()
    budget = int(MEMORY_SHARE * avail / procs)
    chosen = "memory" if decoded_bytes <= budget else "stream"
    return chosen, (f"data mode auto -> {chosen}: {decoded_bytes / 1e6:,.1f} MB decoded vs a budget of "
                    f"{budget / 1e6:,.0f} MB ({MEMORY_SHARE:g} x {avail / 1e9:.1f} GB available / {procs} "
                    f"process{'es' if procs > 1 else ''})")


def _as_size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        size = (image_size, image_size)
    else:
        size = tuple(image_size)
    if len(size) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in size):
        raise CompressError(f"image_size must be a positive integer (or (H, W)), got {image_size!r}")
    return (int(size[0]), int(size[1]))


def load_data(spec: str, *, image_size=None, default_size: int | None = None, channels: int | None = None,
              splits=("train", "test"), mode: str = "memory", augment=None, family: str | None = None,
              skip_bad_images: bool = False, processes: int | None = None) -> DataBundle:
    """Load ``spec`` (``"demo"``, a CIFAR python dir or an ImageFolder root) -- see the module docstring.

    ``splits``: which of ``train``/``test`` to read (``compress eval`` reads only
    ``test``). ``augment``: the policy the splits are for (imagenet changes the
    test split's center crop); ``auto``/``None`` picks it from the chosen size and
    ``family`` (:func:`.transforms.resolve_policy`) and records it in ``bundle.augment``.
    """
    size = _as_size(image_size)
    if default_size is not None and (not isinstance(default_size, int) or default_size < 1):
        raise CompressError(f"default_size must be a positive integer, got {default_size!r}")
    if channels not in (None, 1, 3):
        raise CompressError(f"channels must be 1 or 3, got {channels!r}")
    splits = tuple(splits)
    if not splits or any(s not in ("train", "test") for s in splits):
        raise CompressError(f"splits must be a subset of ('train', 'test'), got {splits!r}")
    if mode not in MODES:
        raise CompressError(f"--data-mode must be one of {', '.join(MODES)}; got {mode!r}")
    kind, path = detect_format(str(spec))
    if kind == "imagefolder":
        return _load_imagefolder(path, size, default_size, channels, splits, mode, augment, family,
                                 skip_bad_images, processes)
    notes = [] if mode != "stream" else [f"{kind} data is small and always kept in memory (--data-mode stream "
                                         f"applies to ImageFolder data)"]
    if kind == "demo":
        arrays, class_names, source = decode_demo()
        # The decoded tensors are cached per process; hand out copies so callers may modify theirs.
        parts = {s: (x.clone(), y.clone()) for s, (x, y) in zip(("train", "test"), arrays) if s in splits}
        source = f"{DEMO_PATH} ({source})" if source else str(DEMO_PATH)
    else:
        parts, class_names = read_cifar(kind, path, splits)
        source = str(path)
    if size is not None and size != (32, 32):
        notes.append(f"images are 32x32, resized to {size[0]}x{size[1]}")
    policy, why = resolve_policy(augment, size or (32, 32), family)
    if why != "given":
        notes.append(f"augment: {policy} ({why})")
    view = eval_view(policy, size or (32, 32), NATIVE_ARRAYS)
    out = {s: _array_split(*parts[s], view, policy, s) for s in splits}
    return DataBundle(kind, out.get("train"), out.get("test"), list(class_names), source, "memory", 0, notes,
                      policy, view)


NATIVE_ARRAYS = (32, 32)  # demo and CIFAR: every image is 32x32


def _array_split(images: torch.Tensor, labels: torch.Tensor, view: EvalView, policy: str,
                 role: str) -> ImageSplit:
    """Demo/CIFAR images (32x32) as a ``train`` split (the source of augmentation, plus the
    crop of its evaluation view) or a ``test`` split (in the evaluation view)."""
    if policy != "imagenet":  # the fitted image is both the source and the view (crop 1.0)
        return resize_split(ImageSplit(images, labels), view.size)
    source = fit_images(images, view.store, 1.0)
    if role == "test":
        return ImageSplit(fit_images(source, view.size, view.crop), labels)
    if tuple(source.shape[-2:]) == view.size:
        return ImageSplit(source, labels, eval_crop=view.crop)
    return ImageSplit(None, labels, source=source, size=view.size, eval_crop=view.crop)


def _load_imagefolder(root: Path, size, default_size, channels, splits, mode, augment, family, skip, processes):
    scan = scan_imagefolder(root, splits)
    bad = BadFiles()
    probes = {}
    for s in splits:
        probes[s] = probe_files(scan.files[s])
        for f, p in zip(scan.files[s], probes[s]):
            if isinstance(p, str):
                bad.add(f, p)
    total = sum(len(scan.files[s]) for s in splits)
    good = [p for s in splits for p in probes[s] if not isinstance(p, str)]
    if not good:
        bad.check(False, total)
        raise CompressError(f"no image in {str(root)!r} can be decoded; check the files")
    notes = []
    shapes = Counter((h, w) for h, w, _ in good)
    if channels is None:
        channels = 1 if all(g for _, _, g in good) else 3
        notes.append(f"channels: {channels} ({'every image is grayscale' if channels == 1 else 'colour images'})")
    native = next(iter(shapes)) if len(shapes) == 1 else None
    if size is None:
        if native is not None:
            size = native
            notes.append(f"image size: {size[0]}x{size[1]} (the native size of every image)")
        else:
            d = default_size or 32
            size = (d, d)
            notes.append(f"image size: {d}x{d} (sizes vary, {len(shapes)} different; the model family's "
                         f"default; set --image-size to choose)")
    elif native is not None and native != size:
        notes.append(f"images are {native[0]}x{native[1]}, resized to {size[0]}x{size[1]} "
                     f"(covering it, then center crop)")
    elif native is None:
        notes.append(f"image size: {size[0]}x{size[1]} (images of other sizes are resized, then center-cropped)")
    augment, why = resolve_policy(augment, size, family, channels)
    if why != "given":
        notes.append(f"augment: {augment} ({why})")
    view = eval_view(augment, size)
    store = view.store if augment == "imagenet" else None
    if store is not None and "train" in splits:
        notes.append(f"imagenet policy: every training image is first brought to {store[0]}x{store[1]} (cover, "
                     f"center crop), the source of RandomResizedCrop in either data mode")
    stored = {"train": store or size, "test": size}
    decoded = sum(len(scan.files[s]) * channels * stored[s][0] * stored[s][1] for s in splits)
    chosen, why = choose_mode(mode, decoded, processes)
    notes.append(why)
    if chosen == "stream":
        bad.check(skip, total)  # streaming: headers are all that is read up front
    crops = {"train": 1.0, "test": view.crop}
    train_eval_crop = view.crop if view.crop != 1.0 else None
    out = {}
    for s in splits:
        keep = [i for i, p in enumerate(probes[s]) if not isinstance(p, str)]
        files = [scan.files[s][i] for i in keep]
        labels = torch.tensor([scan.labels[s][i] for i in keep], dtype=torch.int64)
        if chosen == "memory":
            if s == "train":  # the source: at the store size under the imagenet policy
                images, ok = decode_into(files, stored[s], channels, 1.0, bad)
            else:  # the evaluation view
                images, ok = decode_into(files, size, channels, crops[s], bad, store=store)
            if not bool(ok.all()):
                idx = ok.nonzero().flatten()
                images, labels = images.index_select(0, idx).contiguous(), labels.index_select(0, idx)
            if s == "train" and stored[s] != size:
                out[s] = ImageSplit(None, labels, source=images, size=size, eval_crop=train_eval_crop)
            else:
                out[s] = ImageSplit(images, labels, eval_crop=train_eval_crop if s == "train" else None)
        else:
            out[s] = FileSplit(files, labels, size, channels, crops[s], store,
                               train_eval_crop if s == "train" else None)
    bad.check(skip, total)  # memory: header and pixel failures together
    if len(bad):
        notes.append(f"skipped {len(bad)} undecodable image file{'s' if len(bad) > 1 else ''} (--skip-bad-images)")
    for s in splits:
        if len(out[s]) == 0:
            raise CompressError(f"no decodable images left in the {s} split of {str(root)!r}")
    return DataBundle("imagefolder", out.get("train"), out.get("test"), scan.classes, str(root), chosen,
                      len(bad), notes, augment, view)


def synthetic_data(num_classes: int = 10, input_size=(3, 32, 32), n_train: int = 64, n_test: int = 32,
                   seed: int = 0) -> DataBundle:
    """A tiny learnable data set for tests: one smooth random pattern per class plus noise.

    Labels are balanced (``i % num_classes``, then shuffled); everything is a
    function of ``seed``.
    """
    c, h, w = (int(v) for v in input_size)
    train, test = synthetic_split_pair(num_classes, (c, h, w), n_train, n_test, seed)
    return DataBundle("synthetic", train, test, [f"class{i}" for i in range(num_classes)],
                      f"synthetic(num_classes={num_classes}, input_size={(c, h, w)}, seed={seed})")


def sample_split(spec: str, split: str, n: int, seed: int, *, image_size=None, channels=None, augment=None,
                 family=None, skip_bad_images: bool = False) -> DataBundle:
    """:func:`.sampling.load_sample` (documented there): only the sampled files are read."""
    from .sampling import spread_indices

    if split not in ("train", "test"):
        raise CompressError(f"split must be 'train' or 'test', got {split!r}")
    size = _as_size(image_size)
    if channels not in (None, 1, 3):
        raise CompressError(f"channels must be 1 or 3, got {channels!r}")
    kind, path = detect_format(str(spec))
    if kind != "imagefolder":
        if kind == "demo":
            arrays, class_names, source = decode_demo()
            images, labels = dict(zip(("train", "test"), arrays))[split]
            source = f"{DEMO_PATH} ({source})" if source else str(DEMO_PATH)
        else:
            parts, class_names = read_cifar(kind, path, (split,))
            (images, labels), source = parts[split], str(path)
        idx = spread_indices(labels, n, seed)
        pick = torch.as_tensor(idx, dtype=torch.int64)
        size = size or NATIVE_ARRAYS
        policy, _ = resolve_policy(augment, size, family)
        view = eval_view(policy, size, NATIVE_ARRAYS)
        part = _array_split(images.index_select(0, pick).contiguous(), labels.index_select(0, pick), view,
                            policy, "test")
        return DataBundle(kind, part if split == "train" else None, part if split == "test" else None,
                          list(class_names), source, "memory", 0, [], policy, view, idx, 0)
    scan = scan_imagefolder(path, (split,))
    idx = spread_indices(scan.labels[split], n, seed)
    files = [scan.files[split][i] for i in idx]
    labels = torch.tensor([scan.labels[split][i] for i in idx], dtype=torch.int64)
    bad = BadFiles()
    probes = probe_files(files)
    keep = []
    for i, (f, p) in enumerate(zip(files, probes)):
        if isinstance(p, str):
            bad.add(f, p)
        else:
            keep.append(i)
    good = [probes[i] for i in keep]
    notes = []
    if channels is None:
        channels = 1 if good and all(g for _, _, g in good) else 3
    if size is None:
        shapes = {(h, w) for h, w, _ in good}
        size = next(iter(shapes)) if len(shapes) == 1 else (32, 32)
        notes.append(f"image size: {size[0]}x{size[1]} (from the sampled files' headers; pass the model's size)")
    policy, _ = resolve_policy(augment, size, family, channels)
    view = eval_view(policy, size)
    files, labels = [files[i] for i in keep], labels[keep] if keep else labels[:0]
    idx = [idx[i] for i in keep]
    images, ok = decode_into(files, size, channels, view.crop, bad, store=view.store)
    decoded = len(files)
    bad.check(skip_bad_images, len(probes))
    if not bool(ok.all()):
        sel = ok.nonzero().flatten()
        images, labels = images.index_select(0, sel).contiguous(), labels.index_select(0, sel)
        idx = [idx[i] for i in sel.tolist()]
    if len(bad):
        notes.append(f"skipped {len(bad)} undecodable image file{'s' if len(bad) > 1 else ''} of the sample "
                     f"(--skip-bad-images)")
    if not idx:
        raise CompressError(f"no decodable images in the sample of the {split} split of {str(path)!r}")
    part = ImageSplit(images, labels)
    return DataBundle("imagefolder", part if split == "train" else None, part if split == "test" else None,
                      scan.classes, str(path), "memory", len(bad), notes, policy, view, idx, decoded)
