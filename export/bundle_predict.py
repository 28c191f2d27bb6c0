#!/usr/bin/env python3
"""Predict with a compress deploy bundle: ``python predict.py IMAGE_OR_FOLDER [IMAGE ...]``.

Written by ``compress export --target cpu``, next to ``model.onnx`` and
``deploy.json``; everything (runtime, threads, precision, preprocessing,
class names) is read from ``deploy.json``. Needs numpy, Pillow and
onnxruntime only (plus ``onnxruntime-ep-openvino`` when deploy.json names the
OpenVINO provider; without it the CPU provider is used and a note printed).

* an image file: prints its top-5 classes;
* several image files: prints one line per image (file, class, probability);
* a folder of images: prints one line per image (file, class, probability);
* an ImageFolder layout (``FOLDER/<class>/*`` or a data root with ``test/``
  or ``val/``): prints top-1 accuracy over every image, the number
  ``compress eval`` reports for the same files.

Exit codes: 0 ok, 2 bad input (a message, no traceback).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# ---- preprocessing: the recipe of docs/preprocessing.md, verbatim (a test keeps the two equal) ----
# preprocessing-begin
from functools import lru_cache

import numpy as np
from PIL import Image


@lru_cache(maxsize=64)
def resize_weights(n_in, n_out):
    """(n_out, n_in) integer weights of antialiased bilinear resizing, and their fixed-point bits."""
    scale = n_in / n_out
    support = scale if scale >= 1.0 else 1.0       # the triangle filter widens when shrinking
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        k = np.maximum(1.0 - np.abs((np.arange(lo, hi) - center + 0.5) * invscale), 0.0)
        w[i, lo:hi] = k / k.sum() if k.sum() != 0 else k
    bits = 0
    while bits < 22 and int(0.5 + w.max() * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    return np.floor(0.5 + w * (1 << bits)).astype(np.int64), bits


def resize(img, h, w):
    """uint8 (H, W, C) -> (h, w, C): width first, then height, rounded to uint8 after each pass."""
    out = img.astype(np.int64)
    if w != out.shape[1]:
        k, bits = resize_weights(out.shape[1], w)
        out = np.tensordot(k, out, axes=([1], [1])).transpose(1, 0, 2)   # (w, H, C) -> (H, w, C)
        out = np.clip((out + (1 << (bits - 1))) >> bits, 0, 255)
    if h != out.shape[0]:
        k, bits = resize_weights(out.shape[0], h)
        out = np.tensordot(k, out, axes=([1], [0]))                      # (h, w, C)
        out = np.clip((out + (1 << (bits - 1))) >> bits, 0, 255)
    return out.astype(np.uint8)


def fit(img, size, crop=1.0):
    """Resize (aspect ratio kept) to just cover size / crop, then center-crop size (H, W)."""
    h, w = img.shape[:2]
    if (h, w) == tuple(size) and crop == 1.0:
        return img
    bh, bw = (size[0], size[1]) if crop == 1.0 else (int(round(size[0] / crop)), int(round(size[1] / crop)))
    nh, nw = (bh, max(bw, int(bh * w / h))) if bh * w >= bw * h else (max(bh, int(bw * h / w)), bw)
    if (nh, nw) != (h, w):
        img = resize(img, nh, nw)
    top, left = int(round((nh - size[0]) / 2.0)), int(round((nw - size[1]) / 2.0))
    return img[top:top + size[0], left:left + size[1]]


def load_image(path, channels=3):
    """An image file -> uint8 (H, W, C) in RGB order (luminance when the model takes 1 channel)."""
    with Image.open(path) as im:
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    return arr.reshape(arr.shape[0], arr.shape[1], -1)


def preprocess(path, p):
    """An image file -> float32 (1, C, H, W), what the model takes; p: deploy.json's "preprocessing"."""
    img = load_image(path, p["channels"])
    img = fit(img, p["store"])                     # the source size every view starts from
    img = fit(img, p["size"], p["crop"])           # center crop: 0.875 (imagenet policy) or 1.0
    x = img.astype(np.float32) / 255.0             # RGB, [0, 1]
    if not p["normalize_in_graph"]:
        x = (x - np.asarray(p["mean"], np.float32)) / np.asarray(p["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])   # HWC -> NCHW
# preprocessing-end

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
BATCH = 64


class BadInput(Exception):
    """A message for the user (exit 2)."""


def read_deploy(folder: Path) -> dict:
    path = folder / "deploy.json"
    try:
        deploy = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BadInput(f"{path}: not readable ({exc}); keep predict.py inside its bundle folder") from None
    if deploy.get("schema") != "compress.deploy/1":
        raise BadInput(f"{path}: schema {deploy.get('schema')!r} is not compress.deploy/1; "
                       f"re-create the bundle with 'compress export --target cpu'")
    return deploy


def _openvino(opts, runtime: dict) -> str | None:
    """Add the OpenVINO EP to ``opts``; None when done, else why not."""
    import onnxruntime as ort

    try:
        import onnxruntime_ep_openvino as ov_ep
    except ImportError:
        return "onnxruntime-ep-openvino is not installed"
    try:
        ort.register_execution_provider_library(ov_ep.get_ep_name(), ov_ep.get_library_path())
    except Exception as exc:  # noqa: BLE001 -- registered already is fine
        if "already" not in str(exc).lower():
            return f"the OpenVINO plugin does not load ({str(exc).splitlines()[0][:200] if str(exc) else exc!r})"
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "OpenVINOExecutionProvider"]
    cpu = [d for d in devices if d.device.type == ort.OrtHardwareDeviceType.CPU]
    if not cpu:
        return "the OpenVINO plugin offers no CPU device here"
    props = {"INFERENCE_PRECISION_HINT": runtime["precision_hint"], "INFERENCE_NUM_THREADS": int(runtime["threads"])}
    opts.add_provider_for_devices([cpu[0]], {"load_config": json.dumps({"CPU": props})})
    return None


def make_session(folder: Path, deploy: dict):
    import onnxruntime as ort

    runtime = deploy["runtime"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(runtime["threads"])
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[runtime["graph_optimization"]]
    opts.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if runtime["provider"] == "openvino":
        why = _openvino(opts, runtime)
        if why:
            print(f"note: deploy.json asks for OpenVINO but {why}; running on the CPU provider "
                  f"(same predictions up to rounding, other latency)", file=sys.stderr)
        else:
            providers = None
    model = folder / deploy["model"]["file"]
    try:
        return ort.InferenceSession(str(model), sess_options=opts, providers=providers)
    except Exception as exc:  # noqa: BLE001 -- onnxruntime's own exception types
        raise BadInput(f"{model}: not loadable ({str(exc).splitlines()[0][:300] if str(exc) else exc!r})") from None


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (sub-folders included), sorted, as compress lists them."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(root) / f for f in sorted(files)
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return out


def labelled_folder(folder: Path, class_names: list) -> tuple[list, list] | None:
    """``(files, labels)`` of an ImageFolder layout (FOLDER/<class>/*, or FOLDER/test|val/<class>/*)."""
    for split in ("test", "val"):
        if (folder / split).is_dir():
            folder = folder / split
            break
    entries = sorted(e for e in folder.iterdir() if not e.name.startswith("."))
    classes = [e.name for e in entries if e.is_dir()]
    if not classes or any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries):
        return None  # loose images: no labels
    unknown = [c for c in classes if c not in class_names]
    if unknown and len(classes) != len(class_names):
        raise BadInput(f"{folder}: class folders {unknown[:5]} are not classes of the model "
                       f"({', '.join(class_names[:10])}...)")
    index = {c: (class_names.index(c) if not unknown else i) for i, c in enumerate(classes)}
    files, labels = [], []
    for c in classes:
        found = image_files(folder / c)
        files += found
        labels += [index[c]] * len(found)
    return files, labels


def predict_files(session, files: list, prep: dict) -> np.ndarray:
    """Logits (N, classes) of ``files``, BATCH at a time."""
    name = session.get_inputs()[0].name
    out = []
    for start in range(0, len(files), BATCH):
        try:
            x = np.concatenate([preprocess(f, prep) for f in files[start:start + BATCH]])
        except (OSError, ValueError) as exc:
            raise BadInput(f"an image in {files[start]}..{files[min(start + BATCH, len(files)) - 1]} does not "
                           f"decode ({exc})") from None
        out.append(session.run(None, {name: x})[0])
    return np.concatenate(out)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def main(argv: list) -> int:
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip().splitlines()[0] + "\nusage: python predict.py IMAGE_OR_FOLDER [IMAGE ...]")
        return 0 if argv else 2
    folder = Path(__file__).resolve().parent
    deploy = read_deploy(folder)
    names = list(deploy["class_names"])
    targets = [Path(a) for a in argv]
    for target in targets:
        if not target.exists():
            raise BadInput(f"{target}: no such file or folder; give image files or one folder of images")
    if len(targets) > 1 and not all(t.is_file() for t in targets):
        raise BadInput("give one folder, or image files only (not a folder among several arguments)")
    target = targets[0]
    session = make_session(folder, deploy)
    prep = deploy["preprocessing"]
    if len(targets) > 1:
        files, labels = targets, None
    elif target.is_file():
        probs = softmax(predict_files(session, [target], prep))[0]
        for k in np.argsort(-probs, kind="stable")[:5]:
            print(f"{names[k]:<20} {100 * probs[k]:6.2f}%")
        return 0
    else:
        labelled = labelled_folder(target, names)
        files, labels = labelled if labelled else (image_files(target), None)
    if not files:
        raise BadInput(f"{target}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    logits = predict_files(session, files, prep)
    pred = np.argsort(-logits.astype(np.float64), axis=1, kind="stable")[:, 0]  # ties: lowest index, as compress
    if labels is None:
        probs = softmax(logits)
        for f, k, p in zip(files, pred, probs):
            print(f"{f}\t{names[k]}\t{100 * p[k]:.2f}%")
        return 0
    hits = int((pred == np.asarray(labels)).sum())
    print(f"top-1 {100.0 * hits / len(files):.2f}% ({hits}/{len(files)}) on {target}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
