"""What is on disk: the embedded demo set, CIFAR python pickles, ImageFolder trees, image files.

Nothing here keeps a data set in memory; :mod:`.memory` and :mod:`.stream`
build splits from what these functions find.

Image files (:func:`decode_file`) decode to uint8 ``(C, H, W)`` with ``C`` the
channels asked for: 1 (grayscale) or 3 (RGB). Palette PNGs are expanded, an
alpha channel is dropped, CMYK JPEGs are converted to RGB, 16-bit PNGs are
scaled to 8 bits (``value >> 8``), grayscale images are repeated to RGB when 3
channels are asked for and RGB images are converted to luminance when 1 is.
torchvision.io decodes JPEG and 8-bit PNG (faster than Pillow here, see
``benchmarks/data_loader.py``); Pillow does everything else.
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

from ..errors import CompressError

DEMO_PATH = Path(__file__).resolve().parent.parent / "assets" / "demo_cifar10.safetensors"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta")
CIFAR100_FILES = ("train", "test", "meta")
ACCEPTED = ("accepted: 'demo'; a CIFAR-10 python dir (data_batch_1..5, test_batch, batches.meta) "
            "or its parent with cifar-10-batches-py/; a CIFAR-100 python dir (train, test, meta) "
            "or its parent with cifar-100-python/; an ImageFolder root with train/ and val/ or test/")
MAX_LISTED_BAD = 20  # bad files named in the report; the rest are counted
# The image formats decoded (by content, whatever the extension says). Anything else -- PostScript/EPS
# (Pillow would run Ghostscript on it), PDF, ICNS, ... -- is a bad file.
PIL_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def detect_format(spec: str) -> tuple[str, Path | None]:
    """``(kind, path)`` with kind ``demo``, ``cifar10``, ``cifar100`` or ``imagefolder``."""
    spec = str(spec)
    if spec == "demo":
        return "demo", None
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
        return "cifar10", path
    if (path / "meta").is_file() or (path / "train").is_file() or "fine_label_names" in names:
        return "cifar100", path
    sub10, sub100 = path / "cifar-10-batches-py", path / "cifar-100-python"
    if sub10.is_dir() and sub100.is_dir():
        raise CompressError(f"{spec!r} holds both cifar-10-batches-py/ and cifar-100-python/; "
                            f"pass the one you mean: {sub10} or {sub100}")
    if sub10.is_dir():
        return "cifar10", sub10
    if sub100.is_dir():
        return "cifar100", sub100
    if (path / "train").is_dir() or (path / "val").is_dir() or (path / "test").is_dir():
        return "imagefolder", path  # test/ alone serves eval and export; training asks for train/ (scan_imagefolder)
    raise CompressError(f"unknown data layout in {spec!r} (found: {', '.join(entries[:6])}"
                        f"{', ...' if len(entries) > 6 else ''}); {ACCEPTED}")


# ----------------------------------------------------------------------------- demo
@contextlib.contextmanager
def quiet_torchvision():
    # torchvision 0.29 marks its image codecs deprecated (in favour of torchcodec); they
    # still work and are what we depend on, so do not spam every load with the warning.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io.*")
        warnings.filterwarnings("ignore", message=r".*image decoding and encoding capabilities of TorchVision.*")
        yield


def _decode_jpegs(files: list[torch.Tensor]) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with quiet_torchvision():
        return decode_jpeg(files, mode=ImageReadMode.RGB)


@lru_cache(maxsize=1)
def decode_demo() -> tuple:
    """``([(train_x, train_y), (test_x, test_y)], class_names, source)``, cached per process."""
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


def read_cifar(kind: str, path: Path, splits: Sequence[str]) -> tuple[dict, list[str]]:
    """``({split: (images, labels)}, class_names)`` for the requested splits only."""
    if kind == "cifar10":
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        meta_file, label_key, names_key, what = "batches.meta", b"labels", b"label_names", "CIFAR-10"
    else:
        files = {"train": ["train"], "test": ["test"]}
        meta_file, label_key, names_key, what = "meta", b"fine_labels", b"fine_label_names", "CIFAR-100"
    _require(path, [f for s in splits for f in files[s]] + [meta_file], what)
    out = {}
    for s in splits:
        parts = [_cifar_arrays(path / f, label_key) for f in files[s]]
        out[s] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    meta = _unpickle(path / meta_file)
    n = 10 if kind == "cifar10" else 100
    class_names = _names(meta.get(names_key, [])) or [str(i) for i in range(n)]
    for _, labels in out.values():
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(class_names)):
            raise CompressError(f"labels in {str(path)!r} fall outside 0..{len(class_names) - 1} (the class-name "
                                f"list has {len(class_names)}); re-download the data set")
    return out, class_names


# ----------------------------------------------------------------------------- ImageFolder scanning
@dataclass
class FolderScan:
    """The files of the requested splits of an ImageFolder root (labels from sorted class folders)."""

    root: Path
    classes: list[str]
    files: dict  # split -> list[str]
    labels: dict  # split -> list[int]
    test_name: str


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: Path) -> list[str]:
    """Regular image files under ``class_dir`` (sub-folders included), in sorted order.

    Symlinks are followed, but each real folder is visited once (a link back to a
    parent does not loop, nor count the images again), each real file is listed
    once, and anything that is not a regular file (a FIFO or a device named
    ``x.png`` would block the reader forever) is left out."""
    out: list[str] = []
    seen_dirs: set = set()
    seen_files: set = set()
    stack = [str(class_dir)]
    while stack:
        folder = stack.pop()
        try:
            real = os.path.realpath(folder)
            if real in seen_dirs:
                continue
            seen_dirs.add(real)
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:  # unreadable, vanished, or a symlink loop
            continue
        subdirs = []
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=True):
                    subdirs.append(e.path)
                elif (e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith(".")
                      and e.is_file(follow_symlinks=True)):
                    # a plain entry's real path is its real folder's plus its name: one realpath per folder
                    key = os.path.realpath(e.path) if e.is_symlink() else os.path.join(real, e.name)
                    if key not in seen_files:
                        seen_files.add(key)
                        out.append(e.path)
            except OSError:
                continue
        stack.extend(reversed(subdirs))  # depth first, sorted: the order os.walk gave
    return out


def scan_imagefolder(root: Path, splits: Sequence[str]) -> FolderScan:
    """List ``splits`` (``train``/``test``) of ``root``; class folders must agree between train and test."""
    test_name = "test" if (root / "test").is_dir() else "val" if (root / "val").is_dir() else None
    if test_name is None:
        raise CompressError(f"ImageFolder {str(root)!r} has train/ but no val/ or test/ folder; "
                            f"add a held-out split as val/<class>/ or test/<class>/")
    train_dir, test_dir = root / "train", root / test_name
    has_train = train_dir.is_dir()
    if "train" in splits and not has_train:
        raise CompressError(f"ImageFolder {str(root)!r} has no train/ folder; add train/<class>/ images next to "
                            f"{test_name}/ (eval and export read {test_name}/ alone)")
    test_classes = _class_dirs(test_dir)
    classes = _class_dirs(train_dir) if has_train else test_classes  # without train/: the test split's classes
    if not classes:
        raise CompressError(f"ImageFolder {str(train_dir if has_train else test_dir)!r} has no class folders; "
                            f"put images in train/<class>/ and {test_name}/<class>/")
    if classes != test_classes:
        only_tr = sorted(set(classes) - set(test_classes))
        only_te = sorted(set(test_classes) - set(classes))
        raise CompressError(f"class folders differ between train/ and {test_name}/ in {str(root)!r} "
                            f"(only in train: {only_tr or 'none'}; only in {test_name}: {only_te or 'none'}); "
                            f"make both splits have the same class folders")
    files, labels = {}, {}
    for s in splits:
        split_dir = train_dir if s == "train" else test_dir
        fs, ls = [], []
        for i, c in enumerate(classes):
            found = _image_files(split_dir / c)
            fs += found
            ls += [i] * len(found)
        if not fs:
            raise CompressError(f"ImageFolder split {str(split_dir)!r} has no images "
                                f"({'/'.join(IMAGE_EXTENSIONS)}); put images in its class folders")
        if s == "train":
            empty = [c for i, c in enumerate(classes) if i not in set(ls)]
            if empty:
                raise CompressError(f"class folder(s) {empty} in {str(train_dir)!r} have no images; "
                                    f"add images or remove the folder(s) from train/ and {test_name}/")
        files[s], labels[s] = fs, ls
    return FolderScan(root, classes, files, labels, test_name)


# ----------------------------------------------------------------------------- image files
def probe_file(path: str) -> tuple[int, int, bool] | str:
    """``(height, width, grayscale)`` from the file header, or the reason it cannot be read."""
    from PIL import Image

    try:
        if not os.path.isfile(path):
            return "not a regular file"
        with Image.open(path, formats=PIL_FORMATS) as im:
            w, h = im.size
            gray = im.mode in GRAY_MODES
        return int(h), int(w), gray
    except Exception as exc:  # noqa: BLE001 -- any reader error means "cannot decode"
        return f"{type(exc).__name__}"


PROBE_CHUNK = 1024  # files per thread-pool task


def _probe_chunk(files: list[str]) -> list:
    return [probe_file(f) for f in files]


def probe_files(files: list[str]) -> list:
    """:func:`probe_file` over ``files`` in a thread pool (header reads only).

    The pool gets chunks of :data:`PROBE_CHUNK` files: ``ThreadPoolExecutor.map`` ignores
    ``chunksize`` and makes a future per item up front: +1.8 MB peak RSS per 1,000 files, 2.3 GB
    at ImageNet-1k's 1.28 million; +0.25 MB in chunks (docs/data.md, benchmarks/data_loader.py)."""
    if len(files) < 64:
        return _probe_chunk(files)
    chunks = [files[i:i + PROBE_CHUNK] for i in range(0, len(files), PROBE_CHUNK)]
    with ThreadPoolExecutor(max_workers=io_threads()) as ex:
        return [r for part in ex.map(_probe_chunk, chunks) for r in part]


def io_threads() -> int:
    """Threads for header reads and decoding: the usable cores, 1..8."""
    from ..machine import usable_cores

    return max(1, min(8, usable_cores()))


@contextlib.contextmanager
def one_intra_op_thread():
    """Per-image decode/resize ops with several intra-op threads are many times slower (measured
    6-16x on 2 busy cores): the parallelism is across images (threads or worker processes)."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def _from_pil(im, channels: int) -> torch.Tensor:
    import numpy as np

    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(im).astype(np.int64)
        if arr.max(initial=0) > 255 or im.mode != "I":
            arr = arr >> 8  # 16-bit samples -> 8-bit
        arr = arr.clip(0, 255).astype(np.uint8)
        if channels == 3:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
    else:
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    arr = arr.reshape(arr.shape[0], arr.shape[1], -1)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def decode_file(path: str, channels: int = 3) -> torch.Tensor:
    """One image file -> uint8 ``(channels, H, W)``; torchvision for JPEG/8-bit PNG, else Pillow.

    Call inside :func:`quiet_torchvision`. Raises ``ValueError`` naming the reason
    when the file does not decode (callers collect these, see :class:`BadFiles`).
    """
    from torchvision.io import ImageReadMode, decode_image

    if not os.path.isfile(path):  # a FIFO would block the read forever
        raise ValueError("not a regular file")
    with open(path, "rb") as fh:
        data = fh.read()
    head = data[:4]
    if head[:3] == b"\xff\xd8\xff" or head == b"\x89PNG":
        try:
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                               mode=ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB)
            if img.dtype == torch.uint8 and img.dim() == 3 and img.shape[0] == channels:
                return img
        except Exception:  # noqa: BLE001 -- 16-bit PNG, CMYK JPEG, ...: Pillow below
            pass
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
            im.load()
            return _from_pil(im, channels)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(type(exc).__name__) from None


class BadFiles:
    """Undecodable files found in one pass; :meth:`check` reports them all at once."""

    def __init__(self):
        self.items: list[tuple[str, str]] = []

    def add(self, path: str, reason: str) -> None:
        self.items.append((str(path), str(reason)))

    def __len__(self) -> int:
        return len(self.items)

    def check(self, skip: bool, total: int) -> None:
        if not self.items or skip:
            return
        listed = "; ".join(f"{p} ({r})" for p, r in self.items[:MAX_LISTED_BAD])
        more = f"; and {len(self.items) - MAX_LISTED_BAD} more" if len(self.items) > MAX_LISTED_BAD else ""
        n = len(self.items)
        raise CompressError(f"cannot decode image file{'s' if n > 1 else ''} ({n} of {total}): {listed}{more}; "
                            f"remove or replace {'them' if n > 1 else 'it'}, or pass --skip-bad-images "
                            f"to leave {'them' if n > 1 else 'it'} out")
