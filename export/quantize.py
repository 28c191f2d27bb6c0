"""Static INT8 quantisation of an exported model with onnxruntime.quantization.

QDQ format, per-channel weights (int8), uint8 activations (the U8S8 layout
onnxruntime's x86 kernels - VNNI included - run fastest), calibrated with
MinMax on real images. The fp32 graph is first pre-processed with
``quant_pre_process`` (shape inference + graph optimisation), which folds
BatchNorm into the convolutions so the quantised graph has fewer, fused ops.
The compress metadata of the fp32 file is carried over, plus
``quantization`` and ``calibration_images``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from compressor.errors import CompressError
from compressor.fileio import atomic_write, check_output_path

from .onnx_export import read_metadata, set_metadata
from .runtime import OnnxModel, _split_arrays, load_bundle

QUANTIZATION_TAG = "int8-static-qdq-per-channel-u8s8"
DEFAULT_CALIBRATION_SIZE = 512
CALIBRATION_BATCH = 32


def int8_path(fp32_path) -> Path:
    """``student.onnx`` -> ``student.int8.onnx``."""
    p = Path(fp32_path)
    stem = p.name[: -len(".onnx")] if p.name.endswith(".onnx") else p.name
    return p.with_name(stem + ".int8.onnx")


class _Reader:
    """A CalibrationDataReader over a float array, in batches."""

    def __init__(self, input_name: str, batches):
        self.input_name = input_name
        self._batches = list(batches)
        self._it = iter(self._batches)

    def get_next(self):
        x = next(self._it, None)
        return None if x is None else {self.input_name: x}

    def rewind(self):
        self._it = iter(self._batches)


def calibration_images(data, n: int = DEFAULT_CALIBRATION_SIZE, seed: int = 0) -> np.ndarray:
    """``n`` images from the data's *train* split (test split if there is none), uint8 NCHW."""
    bundle = load_bundle(data)
    split = getattr(bundle, "train", None)
    if split is None or len(getattr(split, "labels", [])) == 0:
        split = bundle.test
    images, _ = _split_arrays(split)
    if len(images) == 0:
        raise CompressError("no images to calibrate INT8 quantisation with")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(images))[: max(1, int(n))]
    return images[np.sort(idx)]


def quantize_static_int8(onnx_path, out_path, calibration, *, per_channel: bool = True,
                         preprocess: bool = True, calibration_batch: int = CALIBRATION_BATCH) -> Path:
    """Quantise ``onnx_path`` to INT8 at ``out_path`` (written atomically).

    ``calibration``: uint8 images ``(N, C, H, W)`` (prepared as the model
    expects: normalised, or [0, 1] when the normalisation is in the graph),
    float arrays already in the model's input space, or a data spec/bundle.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    fp32 = OnnxModel(onnx_path, threads=1)
    out = check_output_path(out_path)
    if Path(out).resolve() == fp32.path.resolve():
        raise CompressError("the INT8 output path must differ from the fp32 model")
    if isinstance(calibration, (str, os.PathLike)) or hasattr(calibration, "test"):
        calibration = calibration_images(calibration)
    calib = np.asarray(calibration)
    if calib.ndim != 4 or len(calib) == 0:
        raise CompressError(f"calibration images must be a non-empty (N, C, H, W) array, got shape {calib.shape}")
    if tuple(calib.shape[1:]) != tuple(fp32.chw):
        raise CompressError(f"calibration images (C,H,W)={tuple(calib.shape[1:])} do not fit the model "
                            f"input {tuple(fp32.chw)}")
    x = fp32.prepare(calib) if calib.dtype == np.uint8 else calib.astype(np.float32)
    batches = [np.ascontiguousarray(x[i:i + calibration_batch]) for i in range(0, len(x), calibration_batch)]
    props = read_metadata(onnx.load(str(fp32.path), load_external_data=False))

    with tempfile.TemporaryDirectory(prefix="compress-int8-") as tmpdir:
        src = Path(tmpdir) / "fp32.onnx"
        if preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            try:
                quant_pre_process(str(fp32.path), str(src), skip_symbolic_shape=False)
            except Exception:
                src = fp32.path  # pre-processing is an optimisation only
        else:
            src = fp32.path
        q = Path(tmpdir) / "int8.onnx"
        try:
            quantize_static(
                str(src), str(q), _Reader(fp32.input_name, batches),
                quant_format=QuantFormat.QDQ, per_channel=per_channel,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        except Exception as exc:
            raise CompressError(f"INT8 quantisation failed: {type(exc).__name__}: {exc}") from exc
        model = onnx.load(str(q))
        src_ckpt = props.get("source_checkpoint", "")
        if src_ckpt and not os.path.isabs(src_ckpt):  # keep it relative to the *new* file's folder
            absolute = os.path.abspath(os.path.join(fp32.path.parent, src_ckpt))
            props["source_checkpoint"] = os.path.relpath(absolute, os.path.abspath(Path(out).parent))
        props.update({"quantization": QUANTIZATION_TAG, "calibration_images": str(len(x)),
                      "fp32_source": os.path.relpath(os.path.abspath(fp32.path), os.path.abspath(Path(out).parent))})
        set_metadata(model, props)
        with atomic_write(out, suffix=".onnx") as tmp:
            onnx.save_model(model, str(tmp))
    return Path(out)


def int8_report(fp32_path, int8_path_, data, *, threads: int | None = None, batch_sizes=(1,),
                iters: int | None = None, seconds: float | None = 1.0, warmup: int = 10,
                batch_size: int = 256) -> dict:
    """Side-by-side accuracy (test split of ``data``) and latency of fp32 vs int8."""
    from .bench import benchmark_onnx
    from .runtime import evaluate_onnx

    bundle = load_bundle(data)
    fp32_acc = evaluate_onnx(fp32_path, bundle, batch_size=batch_size, threads=threads)
    int8_acc = evaluate_onnx(int8_path_, bundle, batch_size=batch_size, threads=threads)
    bench = benchmark_onnx(int8_path_, compare=fp32_path, batch_sizes=batch_sizes, threads=threads,
                           iters=iters, seconds=seconds, warmup=warmup)
    lat = {}
    for r in bench["results"]:
        key = "int8" if r["role"] == "model" else "fp32"
        lat.setdefault(key, {})[str(r["batch_size"])] = {"p50_ms": r["p50_ms"], "throughput_ips": r["throughput_ips"]}
    sizes = {"fp32": Path(fp32_path).stat().st_size, "int8": Path(int8_path_).stat().st_size}
    return {
        "fp32": {"path": str(fp32_path), **fp32_acc, "latency": lat.get("fp32", {}), "size_bytes": sizes["fp32"]},
        "int8": {"path": str(int8_path_), **int8_acc, "latency": lat.get("int8", {}), "size_bytes": sizes["int8"]},
        "top1_drop": fp32_acc["top1"] - int8_acc["top1"],
        "speedup": {str(c["batch_size"]): c["p50_speedup"] for c in bench["comparisons"]},
        "threads": bench["threads"],
    }


def format_int8_report(rep: dict) -> str:
    lines = [f"{'':6} {'top-1 %':>8} {'top-5 %':>8} {'loss':>8} {'size KB':>9}   latency p50 (ms) by batch"]
    for key in ("fp32", "int8"):
        r = rep[key]
        lat = ", ".join(f"b{b}: {v['p50_ms']:.3f}" for b, v in r["latency"].items())
        lines.append(f"{key:6} {r['top1']:>8.2f} {r['top5']:>8.2f} {r['loss']:>8.4f} {r['size_bytes'] / 1024:>9.1f}   {lat}")
    sp = ", ".join(f"b{b}: {v:.2f}x" for b, v in rep["speedup"].items())
    lines.append(f"int8 vs fp32: top-1 {-rep['top1_drop']:+.2f} points, speed {sp} "
                 f"({rep['int8']['n']} test images, {rep['threads']} threads)")
    return "\n".join(lines)
