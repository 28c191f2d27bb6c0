"""How many images does ``compress export --data FOLDER`` decode? (issue 19, item 3)

Builds a stream-sized ImageFolder of tiny generated PNGs (default 20,000: half
train, half test, 10 class folders, 8x8 px) in a temporary folder, saves an
untrained ``cnn2`` checkpoint at 8x8, runs ``compress export --data FOLDER``
(and, unless ``--no-quantize``, ``--quantize int8``) in this process and counts
every call of the image decoder (``compressor.data.formats.decode_file``, as
bound in the modules that call it; counted through a file, so decodes in
DataLoader worker processes count too). Prints JSON::

    {"images": 20000, "limit": 600,
     "export": {"decoded": 32, "train_decoded": 0, "test_decoded": 32, "seconds": ...},
     "export_quantize": {"decoded": ..., "train_decoded": ..., ...}, "ok": true}

``ok``: plain export decodes at most ``limit`` images and no train image.
Run:  python benchmarks/export_decode_count.py [--images 20000] [--no-quantize]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

LIMIT = 600


def write_folder(root, images: int = 20000, classes: int = 10, size: int = 8) -> Path:
    """``images`` PNGs, half in train/, half in test/, ``classes`` folders each (class-sorted, as on disk)."""
    import numpy as np
    from PIL import Image

    root = Path(root)
    blobs = []
    rng = np.random.default_rng(0)
    for k in range(classes):  # one encoded PNG per class, written many times: fast to generate
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    per_split = images // 2
    for split in ("train", "test"):
        for k in range(classes):
            d = root / split / f"class{k:02d}"
            d.mkdir(parents=True, exist_ok=True)
            count = per_split // classes + (1 if k < per_split % classes else 0)
            for i in range(count):
                (d / f"{i:06d}.png").write_bytes(blobs[k])
    return root


def write_checkpoint(path, size: int = 8, classes: int = 10) -> Path:
    """An untrained ``cnn2`` at ``size`` x ``size`` whose class names match :func:`write_folder`'s."""
    import torch

    from compressor.checkpoint import meta_for, save_checkpoint
    from compressor.models import create_model

    torch.manual_seed(0)
    model = create_model("cnn2", num_classes=classes, input_hw=size).eval()
    meta = meta_for("cnn2", num_classes=classes, input_size=(3, size, size), model_kwargs={"input_hw": size},
                    class_names=[f"class{k:02d}" for k in range(classes)])
    return Path(save_checkpoint(path, model, meta))


@contextlib.contextmanager
def count_decodes(log: Path):
    """Wrap the decoder where it is called; each call appends its path to ``log`` (one line)."""
    from compressor.data import formats, memory, stream

    original = formats.decode_file

    def counted(path, *args, **kwargs):
        with open(log, "a") as f:  # append: atomic per line, also from worker processes
            f.write(f"{path}\n")
        return original(path, *args, **kwargs)

    modules = [m for m in (formats, memory, stream) if getattr(m, "decode_file", None) is original]
    for m in modules:
        m.decode_file = counted
    try:
        yield log
    finally:
        for m in modules:
            m.decode_file = original


def run_export(folder, ckpt, out, *, quantize: bool = False, calibration_size: int | None = None,
               eval_images: int | None = None, extra=()) -> dict:
    """``compress export CKPT --out OUT --data FOLDER [--quantize int8 ...] [extra]`` in this process;
    decode counts."""
    from compressor.cli import main

    args = ["export", str(ckpt), "--out", str(out), "--data", str(folder), "--threads", "1", *extra]
    if quantize:  # the defaults: 512 calibration (train) and 1,000 evaluation (test) images
        args += ["--quantize", "int8"]
        args += ["--calibration-size", str(calibration_size)] if calibration_size else []
        args += ["--eval-images", str(eval_images)] if eval_images else []
    with tempfile.TemporaryDirectory(prefix="decode-count-") as tmp:
        log = Path(tmp) / "decoded.txt"
        log.touch()
        t0 = time.perf_counter()
        stdout = io.StringIO()
        with count_decodes(log), contextlib.redirect_stdout(stdout):
            try:
                main(args)
                code = 0
            except SystemExit as exc:
                code = exc.code
        seconds = time.perf_counter() - t0
        paths = log.read_text().splitlines()
    if code != 0:
        raise RuntimeError(f"compress {' '.join(args)} exited {code}:\n{stdout.getvalue()}")
    train = sum(f"{os.sep}train{os.sep}" in p for p in paths)
    return {"decoded": len(paths), "train_decoded": train, "test_decoded": len(paths) - train,
            "seconds": round(seconds, 2)}


def measure(images: int = 20000, quantize: bool = True, workdir=None) -> dict:
    with tempfile.TemporaryDirectory(prefix="export-decode-count-", dir=workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        folder = write_folder(tmp / "data", images)
        ckpt = write_checkpoint(tmp / "m.safetensors")
        rep = {"images": images, "limit": LIMIT, "generate_seconds": round(time.perf_counter() - t0, 2),
               "export": run_export(folder, ckpt, tmp / "m.onnx")}
        if quantize:
            rep["export_quantize"] = run_export(folder, ckpt, tmp / "q.onnx", quantize=True)
    rep["ok"] = rep["export"]["decoded"] <= LIMIT and rep["export"]["train_decoded"] == 0
    return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20000, help="images in the generated folder (train + test)")
    ap.add_argument("--no-quantize", action="store_true", help="skip the --quantize int8 run")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    rep = measure(args.images, quantize=not args.no_quantize)
    print(json.dumps(rep, indent=2))
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
