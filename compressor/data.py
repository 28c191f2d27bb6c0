"""Image classification data: load once, keep uint8 tensors, augment whole batches.

Accepted ``DATA`` specs (:func:`load_data`)
-------------------------------------------
``demo``
    The data set embedded in the package (``compressor/assets/demo_cifar10.safetensors``):
    a class-balanced CIFAR-10 slice, 5,000 train / 1,000 test 32x32 images
    (500 / 100 per class), stored as the original JPEG bytes of the CIFAR-10
    JPEG copy (see ``compressor/assets/DEMO_DATA.md``). To load a *directory*
    named ``demo`` write ``./demo``.
CIFAR-10, python version
    A directory holding ``data_batch_1`` ... ``data_batch_5``, ``test_batch`` and
    ``batches.meta`` (``cifar-10-batches-py/`` from the official tarball), or the
    folder that contains ``cifar-10-batches-py/``.
CIFAR-100, python version
    A directory holding ``train``, ``test`` and ``meta`` (``cifar-100-python/``),
    or the folder that contains it. Fine labels (100 classes) are used.
ImageFolder
    A root with ``train/`` and ``val/`` or ``test/`` (``test/`` wins if both
    exist), each with one sub-folder per class (sorted names give the labels;
    train and test must have the same class folders). Files ending in .jpg,
    .jpeg, .png, .bmp or .webp (any case, searched recursively inside a class
    folder) are decoded to RGB. If ``image_size`` is given, or the images do not
    all have the same size, each is resized (shorter side to ``image_size``,
    antialiased) and center-cropped to ``image_size`` x ``image_size``; the
    default size is the shorter side of the first training image. Images that
    all share one size are kept as they are (even if not square).

Design
------
* **Decode once.** Every split is decoded a single time when loaded (JPEG
  decoding in a thread pool for folders) into one ``uint8`` tensor
  ``(N, C, H, W)``, contiguous, on the CPU -- 3 KB per 32x32 image, so all of
  CIFAR fits in 180 MB. No per-sample ``Dataset.__getitem__`` / PIL / collate in
  the training loop.
* **Batched loading.** :func:`make_loader` wraps a split in a dataset whose
  ``__getitems__`` gathers a whole batch with one indexing op; the
  ``DataLoader`` passes it through unchanged (identity collate). Order comes
  from :class:`EpochSampler`, a pure function of ``(seed, epoch)``, so it is the
  same in every process and after a resume. The loader survives
  ``accelerate.Accelerator.prepare``.
* **Batched augmentation on tensors.** :func:`augment_batch` does random crop
  with zero padding and horizontal flip for the whole batch with two gathers,
  on whatever device the batch lives on (move uint8 to the GPU first: 4x less
  traffic than float). :func:`normalize` then converts to float32.
* Errors in the input raise :class:`compressor.errors.CompressError` with one
  line naming the problem and the fix.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import CompressError

__all__ = [
    "ImageSplit", "DataBundle", "load_data", "synthetic_data", "augment_batch", "crop_flip",
    "normalize", "EpochSampler", "make_loader", "subset", "DEMO_PATH", "IMAGE_EXTENSIONS",
]

DEMO_PATH = Path(__file__).resolve().parent / "assets" / "demo_cifar10.safetensors"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                  "test_batch", "batches.meta")
_CIFAR100_FILES = ("train", "test", "meta")
_ACCEPTED = ("accepted: 'demo'; a CIFAR-10 python dir (data_batch_1..5, test_batch, batches.meta) "
             "or its parent with cifar-10-batches-py/; a CIFAR-100 python dir (train, test, meta) "
             "or its parent with cifar-100-python/; an ImageFolder root with train/ and val/ or test/")


# ----------------------------------------------------------------------------- containers
@dataclass
class ImageSplit:
    """One split: ``images`` uint8 ``(N, C, H, W)`` contiguous CPU, ``labels`` int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        if self.images.dim() != 4 or self.images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"labels must be (N,) with N={self.images.shape[0]}, got {tuple(self.labels.shape)}")
        if self.labels.dtype != torch.int64:
            self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class DataBundle:
    """A train and a test split plus what they mean."""

    name: str  # "demo", "cifar10", "cifar100", "imagefolder", "synthetic"
    train: ImageSplit
    test: ImageSplit
    class_names: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_size(self) -> tuple[int, int, int]:
        c, h, w = self.train.images.shape[1:]
        return (int(c), int(h), int(w))


def subset(split: ImageSplit, indices) -> ImageSplit:
    """A new split with the samples at ``indices`` (sequence, range, slice, index or bool tensor)."""
    if isinstance(indices, slice):
        return ImageSplit(split.images[indices].contiguous(), split.labels[indices].clone())
    idx = torch.as_tensor(indices if not isinstance(indices, range) else list(indices))
    if idx.dtype == torch.bool:
        idx = idx.nonzero().flatten()
    idx = idx.to(torch.int64).reshape(-1)
    return ImageSplit(split.images.index_select(0, idx).contiguous(), split.labels.index_select(0, idx))


# ----------------------------------------------------------------------------- load_data
def load_data(spec: str, *, image_size: int | None = None) -> DataBundle:
    """Load ``spec`` (``"demo"`` or a directory, see the module docstring) into memory.

    ``image_size`` resizes (shorter side, antialiased) and center-crops every image
    to ``image_size`` x ``image_size``; ``None`` keeps the stored size (for
    ImageFolder: the first image's shorter side when the sizes differ).
    """
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise CompressError(f"image_size must be a positive integer, got {image_size!r}")
    spec = str(spec)
    if spec == "demo":
        return _resize_bundle(_load_demo(), image_size)
    path = Path(spec).expanduser()
    if not path.exists():
        raise CompressError(f"data path {spec!r} does not exist; pass 'demo', a CIFAR-10/100 python "
                            f"directory or an ImageFolder root with train/ and val/ or test/")
    if not path.is_dir():
        raise CompressError(f"data path {spec!r} is a file, not a directory; pass the folder that holds "
                            f"the data (unpack archives first), or 'demo'")
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        raise CompressError(f"data directory {spec!r} is empty; put a CIFAR python-version dataset or an "
                            f"ImageFolder (train/ and val/ or test/) there, or pass 'demo'")
    names = set(entries)
    if "data_batch_1" in names or "batches.meta" in names:
        return _resize_bundle(_load_cifar10(path), image_size)
    if (path / "meta").is_file() or (path / "train").is_file() or "fine_label_names" in names:
        return _resize_bundle(_load_cifar100(path), image_size)
    sub10, sub100 = path / "cifar-10-batches-py", path / "cifar-100-python"
    if sub10.is_dir() and sub100.is_dir():
        raise CompressError(f"{spec!r} holds both cifar-10-batches-py/ and cifar-100-python/; "
                            f"pass the one you mean: {sub10} or {sub100}")
    if sub10.is_dir():
        return _resize_bundle(_load_cifar10(sub10), image_size)
    if sub100.is_dir():
        return _resize_bundle(_load_cifar100(sub100), image_size)
    if (path / "train").is_dir():
        return _load_imagefolder(path, image_size)
    if (path / "val").is_dir() or (path / "test").is_dir():
        raise CompressError(f"ImageFolder {spec!r} has no train/ folder; add train/<class>/ images next to "
                            f"{'test' if (path / 'test').is_dir() else 'val'}/")
    raise CompressError(f"unknown data layout in {spec!r} (found: {', '.join(entries[:6])}"
                        f"{', ...' if len(entries) > 6 else ''}); {_ACCEPTED}")


# ----------------------------------------------------------------------------- demo
@lru_cache(maxsize=1)
def _decode_demo() -> tuple:
    from safetensors import safe_open

    if not DEMO_PATH.is_file():
        raise CompressError(f"embedded demo data {DEMO_PATH} is missing; reinstall the package "
                            f"(or run tools/build_demo_data.py in a source checkout)")
    try:
        with safe_open(str(DEMO_PATH), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        class_names = json.loads(meta["class_names"])
        prefix = tensors.get("jpeg_prefix", torch.empty(0, dtype=torch.uint8))
        splits = []
        for split in ("train", "test"):
            blob, offsets = tensors[f"{split}_jpeg"], tensors[f"{split}_offsets"].tolist()
            files = [torch.cat([prefix, blob[offsets[i]:offsets[i + 1]]]) for i in range(len(offsets) - 1)]
            images = torch.stack(_decode_jpegs(files))
            splits.append((images, tensors[f"{split}_labels"].to(torch.int64)))
    except CompressError:
        raise
    except Exception as exc:  # a truncated or foreign file
        raise CompressError(f"embedded demo data {DEMO_PATH} is unreadable ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); reinstall the package") from exc
    return splits, class_names, meta.get("source", "")


def _load_demo() -> DataBundle:
    (tr_x, tr_y), (te_x, te_y) = _decode_demo()[0]
    class_names, source = _decode_demo()[1:]
    # The decoded tensors are cached per process; hand out copies so callers may modify theirs.
    return DataBundle("demo", ImageSplit(tr_x.clone(), tr_y.clone()), ImageSplit(te_x.clone(), te_y.clone()),
                      list(class_names), f"{DEMO_PATH} ({source})" if source else str(DEMO_PATH))


@contextlib.contextmanager
def _quiet_torchvision():
    # torchvision 0.29 marks its image codecs deprecated (in favour of torchcodec); they
    # still work and are what we depend on, so do not spam every load with the warning.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io.*")
        warnings.filterwarnings("ignore", message=r".*image decoding and encoding capabilities of TorchVision.*")
        yield


def _decode_jpegs(files: list[torch.Tensor]) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with _quiet_torchvision():
        return decode_jpeg(files, mode=ImageReadMode.RGB)


# ----------------------------------------------------------------------------- CIFAR python version
class _CifarUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR python-version files: only numpy arrays, nothing executable."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as exc:
        raise CompressError(f"cannot read CIFAR file {str(path)!r} ({type(exc).__name__}); re-download "
                            f"the python version of the data set") from exc
    if not isinstance(obj, dict):
        raise CompressError(f"CIFAR file {str(path)!r} does not hold a dict; re-download the python version")
    return obj


def _cifar_arrays(path: Path, label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    d = _unpickle(path)
    if b"data" not in d or label_key not in d:
        raise CompressError(f"CIFAR file {str(path)!r} lacks {b'data'!r} or {label_key!r}; "
                            f"re-download the python version of the data set")
    data = np.ascontiguousarray(np.asarray(d[b"data"], dtype=np.uint8))
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise CompressError(f"CIFAR file {str(path)!r} has data of shape {data.shape} and {labels.shape[0]} "
                            f"labels, expected (N, 3072) and N; re-download the python version")
    images = torch.from_numpy(data).reshape(-1, 3, 32, 32).clone()
    return images, torch.from_numpy(labels).clone()


def _require(path: Path, files: Sequence[str], what: str) -> None:
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise CompressError(f"{what} directory {str(path)!r} is missing {', '.join(missing)}; "
                            f"re-download or unpack the complete python version of the data set")


def _names(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _load_cifar10(path: Path) -> DataBundle:
    _require(path, _CIFAR10_FILES, "CIFAR-10")
    parts = [_cifar_arrays(path / f"data_batch_{i}", b"labels") for i in range(1, 6)]
    train = ImageSplit(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    test = ImageSplit(*_cifar_arrays(path / "test_batch", b"labels"))
    meta = _unpickle(path / "batches.meta")
    class_names = _names(meta.get(b"label_names", [])) or [str(i) for i in range(10)]
    _check_labels(train, test, len(class_names), path)
    return DataBundle("cifar10", train, test, class_names, str(path))


def _load_cifar100(path: Path) -> DataBundle:
    _require(path, _CIFAR100_FILES, "CIFAR-100")
    train = ImageSplit(*_cifar_arrays(path / "train", b"fine_labels"))
    test = ImageSplit(*_cifar_arrays(path / "test", b"fine_labels"))
    meta = _unpickle(path / "meta")
    class_names = _names(meta.get(b"fine_label_names", [])) or [str(i) for i in range(100)]
    _check_labels(train, test, len(class_names), path)
    return DataBundle("cifar100", train, test, class_names, str(path))


def _check_labels(train: ImageSplit, test: ImageSplit, n: int, path: Path) -> None:
    for s in (train, test):
        if len(s) and (int(s.labels.min()) < 0 or int(s.labels.max()) >= n):
            raise CompressError(f"labels in {str(path)!r} fall outside 0..{n - 1} (the class-name list has {n}); "
                                f"re-download the data set")


# ----------------------------------------------------------------------------- ImageFolder
def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: Path) -> list[str]:
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames.sort()
        out += [os.path.join(dirpath, f) for f in sorted(filenames)
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return out


def _scan_split(split_dir: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    files: list[str] = []
    labels: list[int] = []
    for i, c in enumerate(classes):
        found = _image_files(split_dir / c)
        files += found
        labels += [i] * len(found)
    return files, labels


def _decode_file(path: str, rgb=None) -> torch.Tensor:
    """One image file -> uint8 (3, H, W) RGB; torchvision first, PIL as fallback.

    Call it inside :func:`_quiet_torchvision` (entered once by the caller: the
    warnings filters are process-global and not thread-safe to toggle).
    """
    from torchvision.io import ImageReadMode, decode_image

    with open(path, "rb") as fh:
        data = fh.read()
    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                           mode=rgb if rgb is not None else ImageReadMode.RGB)
        if img.dim() == 3 and img.shape[0] == 3:
            return img
    except Exception:
        pass
    try:
        import numpy as np
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    except Exception as exc:
        raise CompressError(f"cannot decode image file {str(path)!r} ({type(exc).__name__}); "
                            f"remove or replace it") from exc


def _fit(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (antialiased) then center-crop ``size`` x ``size``."""
    h, w = img.shape[-2:]
    if (h, w) == (size, size):
        return img
    from torchvision.transforms.v2 import functional as TF

    if min(h, w) != size:
        img = TF.resize(img, [size], antialias=True)  # shorter side -> size
    return TF.center_crop(img, [size, size]).contiguous()


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _decode_files(files: list[str], size: int | None, keep: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """Decode ``files`` in a thread pool; fit each to ``size`` unless its (H, W) equals ``keep``."""
    from torchvision.io import ImageReadMode

    rgb = ImageReadMode.RGB  # enum attribute access is slow; look it up once

    def work(chunk):
        out = [_decode_file(p, rgb) for p in chunk]
        if size is None:
            return out
        return [x if keep is not None and tuple(x.shape[-2:]) == keep else _fit(x, size) for x in out]

    workers = _workers()
    step = max(1, min(1024, -(-len(files) // (4 * workers))))
    chunks = [files[i:i + step] for i in range(0, len(files), step)]
    with _quiet_torchvision():
        if workers == 1 or len(chunks) == 1:
            return [img for c in chunks for img in work(c)]
        with ThreadPoolExecutor(max_workers=workers) as ex:
            return [img for part in ex.map(work, chunks) for img in part]


def _load_imagefolder(root: Path, image_size: int | None) -> DataBundle:
    test_name = "test" if (root / "test").is_dir() else "val" if (root / "val").is_dir() else None
    if test_name is None:
        raise CompressError(f"ImageFolder {str(root)!r} has train/ but no val/ or test/ folder; "
                            f"add a held-out split as val/<class>/ or test/<class>/")
    train_dir, test_dir = root / "train", root / test_name
    classes, test_classes = _class_dirs(train_dir), _class_dirs(test_dir)
    if not classes:
        raise CompressError(f"ImageFolder {str(train_dir)!r} has no class folders; put images in "
                            f"train/<class>/ and {test_name}/<class>/")
    if classes != test_classes:
        only_tr = sorted(set(classes) - set(test_classes))
        only_te = sorted(set(test_classes) - set(classes))
        raise CompressError(f"class folders differ between train/ and {test_name}/ in {str(root)!r} "
                            f"(only in train: {only_tr or 'none'}; only in {test_name}: {only_te or 'none'}); "
                            f"make both splits have the same class folders")
    tr_files, tr_labels = _scan_split(train_dir, classes)
    te_files, te_labels = _scan_split(test_dir, classes)
    for split_dir, files in ((train_dir, tr_files), (test_dir, te_files)):
        if not files:
            raise CompressError(f"ImageFolder split {str(split_dir)!r} has no images "
                                f"({'/'.join(IMAGE_EXTENSIONS)}); put images in its class folders")
    present = set(tr_labels)
    empty = [c for i, c in enumerate(classes) if i not in present]
    if empty:
        raise CompressError(f"class folder(s) {empty} in {str(train_dir)!r} have no images; "
                            f"add images or remove the folder(s) from train/ and {test_name}/")

    if image_size is not None:
        tr = _decode_files(tr_files, image_size)
        te = _decode_files(te_files, image_size)
    else:
        # Keep images of the first image's size as they are (a uniform non-square set stays
        # non-square); fit the others to its shorter side, and if there were any, fit all.
        with _quiet_torchvision():
            first = _decode_file(tr_files[0])
        keep = (int(first.shape[-2]), int(first.shape[-1]))
        size = min(keep)
        tr = _decode_files(tr_files, size, keep)
        te = _decode_files(te_files, size, keep)
        if any(tuple(x.shape[-2:]) != keep for x in tr + te) and keep != (size, size):
            tr = [_fit(x, size) for x in tr]
            te = [_fit(x, size) for x in te]
    train = ImageSplit(torch.stack(tr), torch.tensor(tr_labels, dtype=torch.int64))
    test = ImageSplit(torch.stack(te), torch.tensor(te_labels, dtype=torch.int64))
    return DataBundle("imagefolder", train, test, classes, str(root))


def _resize_bundle(bundle: DataBundle, image_size: int | None) -> DataBundle:
    if image_size is None or bundle.train.images.shape[-2:] == (image_size, image_size):
        return bundle
    for split in (bundle.train, bundle.test):
        chunks = [_fit(split.images[i:i + 1024], image_size) for i in range(0, len(split), 1024)]
        split.images = torch.cat(chunks).contiguous()
    return bundle


# ----------------------------------------------------------------------------- synthetic
def synthetic_data(num_classes: int = 10, input_size=(3, 32, 32), n_train: int = 64, n_test: int = 32,
                   seed: int = 0) -> DataBundle:
    """A tiny learnable data set for tests: one smooth random pattern per class plus noise.

    Labels are balanced (``i % num_classes``, then shuffled); everything is a
    function of ``seed``.
    """
    c, h, w = (int(v) for v in input_size)
    g = torch.Generator().manual_seed(int(seed))
    base = torch.rand(num_classes, c, max(1, h // 8), max(1, w // 8), generator=g)
    base = F.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)

    def make(n: int) -> ImageSplit:
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        noise = torch.rand(n, c, h, w, generator=g)
        x = (0.7 * base[labels] + 0.3 * noise) * 255.0
        return ImageSplit(x.round().clamp_(0, 255).to(torch.uint8).contiguous(), labels.to(torch.int64))

    train, test = make(n_train), make(n_test)
    return DataBundle("synthetic", train, test, [f"class{i}" for i in range(num_classes)],
                      f"synthetic(num_classes={num_classes}, input_size={(c, h, w)}, seed={seed})")


# ----------------------------------------------------------------------------- augmentation
def crop_flip(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor | None,
              *, pad: int) -> torch.Tensor:
    """Deterministic core of :func:`augment_batch`.

    Zero-pads ``images`` (N, C, H, W) by ``pad`` on every side, then for sample i
    takes rows ``top[i] .. top[i]+H-1`` and columns ``left[i] .. left[i]+W-1`` of
    the padded image (``top``/``left`` in ``0..2*pad``; ``pad, pad`` is the
    identity), mirrored horizontally where ``flip[i]`` is true. Two gathers, no
    loop over images.
    """
    n, c, h, w = images.shape
    dev = images.device
    x = F.pad(images, (pad, pad, pad, pad)) if pad > 0 else images
    rows = top.to(dev, torch.int64).view(n, 1) + torch.arange(h, device=dev).view(1, h)  # (N, H)
    cols = left.to(dev, torch.int64).view(n, 1) + torch.arange(w, device=dev).view(1, w)  # (N, W)
    if flip is not None:
        cols = torch.where(flip.to(dev).view(n, 1), cols.flip(1), cols)
    wp = x.shape[-1]
    x = torch.gather(x, 2, rows.view(n, 1, h, 1).expand(n, c, h, wp))  # (N, C, H, Wp)
    x = torch.gather(x, 3, cols.view(n, 1, 1, w).expand(n, c, h, w))  # (N, C, H, W)
    return x


def augment_batch(images: torch.Tensor, generator: torch.Generator, *, pad: int = 4,
                  flip: bool = True) -> torch.Tensor:
    """Random crop (zero padding ``pad``, same output size) and random horizontal flip (p=0.5).

    ``images``: uint8 (N, C, H, W) on any device; returns uint8 of the same
    shape on the same device. Random numbers come from ``generator`` (a CPU
    ``torch.Generator``) in this order: ``top = randint(0, 2*pad+1, (N,))``,
    ``left = randint(0, 2*pad+1, (N,))``, then (if ``flip``) ``rand(N) < 0.5``;
    so a seeded generator reproduces the batch on CPU and GPU alike.
    """
    if images.dim() != 4:
        raise ValueError(f"augment_batch expects (N, C, H, W), got shape {tuple(images.shape)}")
    n = images.shape[0]
    pad = int(pad)
    if pad > 0:
        top = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        left = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    else:
        top = left = torch.zeros(n, dtype=torch.int64)
    mask = (torch.rand(n, generator=generator) < 0.5) if flip else None
    if pad == 0 and mask is None:
        return images
    return crop_flip(images, top, left, mask, pad=pad)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 ``(x/255 - mean) / std`` per channel, on the same device."""
    c = images.shape[-3]
    if len(mean) != c or len(std) != c:
        raise CompressError(f"normalisation mean/std have {len(mean)}/{len(std)} values but the images have "
                            f"{c} channels; give one value per channel")
    mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32, device=images.device).view(c, 1, 1)
    std_t = torch.tensor([float(s) for s in std], dtype=torch.float32, device=images.device).view(c, 1, 1)
    x = images.to(torch.float32)
    return x.div_(255.0).sub_(mean_t).div_(std_t)


# ----------------------------------------------------------------------------- sampling / loading
class EpochSampler(torch.utils.data.Sampler[int]):
    """Indices ``0..n-1``: a permutation seeded by ``seed * 1_000_003 + epoch`` when ``shuffle``.

    The order is a pure function of (n, seed, epoch), identical in every process
    and after a resume; call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int):
        self.n = int(n)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class _BatchedSplit(torch.utils.data.Dataset):
    """Map-style dataset over an :class:`ImageSplit` that gathers whole batches at once."""

    def __init__(self, split: ImageSplit):
        self.images = split.images
        self.labels = split.labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self.images.index_select(0, idx), self.labels.index_select(0, idx)


def _identity(batch):
    return batch


def make_loader(split: ImageSplit, batch_size: int, *, shuffle: bool, seed: int = 0,
                drop_last: bool = False) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` yielding ``(images_uint8, labels_int64)`` batches, already collated.

    ``loader.sampler`` is the :class:`EpochSampler`; call ``loader.sampler.set_epoch(e)``
    (or ``set_epoch`` on the loader returned by ``accelerator.prepare``) each epoch.
    """
    return torch.utils.data.DataLoader(
        _BatchedSplit(split),
        batch_size=int(batch_size),
        sampler=EpochSampler(len(split), shuffle=shuffle, seed=seed),
        num_workers=0,
        collate_fn=_identity,
        drop_last=drop_last,
    )
