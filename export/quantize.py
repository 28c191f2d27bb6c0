"""Static INT8 quantisation of an exported model with onnxruntime.quantization.

QDQ format, per-channel weights (int8), uint8 activations (the U8S8 layout
onnxruntime's x86 kernels - VNNI included - run fastest), calibrated with
MinMax on real images. On an x86 CPU without VNNI, onnxruntime runs U8S8 with
VPMADDUBSW, whose 16-bit sums can saturate; there the weights are quantised to 7
bits (``reduce_range``), as onnxruntime's quantisation guide advises (see
:func:`saturating_cpu`). The fp32 graph is first pre-processed with
``quant_pre_process`` (shape inference + graph optimisation), which folds
BatchNorm into the convolutions so the quantised graph has fewer, fused ops.
The compress metadata of the fp32 file is carried over, plus
``quantization``, ``calibration_images``, ``calibration_method`` and ``float_nodes``.

:func:`quantize_accuracy_aware` (``compress export --quantize int8
--max-accuracy-drop P``) tries the calibration methods and keeps the sensitive
layers in float until the top-1 drop is within budget, and keeps the INT8 file
only when it is also faster than fp32 (timed interleaved; see its docstring).
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np

from compressor.errors import CompressError
from compressor.fileio import atomic_write, check_output_path

from .onnx_export import read_metadata, set_metadata
from .runtime import OnnxModel, load_bundle

QUANTIZATION_TAG = "int8-static-qdq-per-channel-u8s8"
REDUCE_RANGE_SUFFIX = "-reduce-range"  # appended to the tag when the weights use 7 bits
# CPU flags with 8-bit dot products that accumulate in 32 bits (no saturation): AVX512-VNNI, AVX-VNNI, AMX-INT8
VNNI_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
DEFAULT_CALIBRATION_SIZE = 512
DEFAULT_EVAL_IMAGES = 1000  # fp32 vs INT8 top-1: one image is 0.1 point, fine enough for a 0.5-point budget
CALIBRATION_BATCH = 32
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# Layers kept in float by the accuracy-aware search: the first convolution sees the raw
# input distribution, the last Gemm/MatMul produces the logits; both are the usual
# INT8 error hot spots and cost little time in float.
SENSITIVE_LAYERS = ("first_conv", "last_layer")


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


def calibration_images(data, n: int = DEFAULT_CALIBRATION_SIZE, seed: int = 0, *, meta=None) -> np.ndarray:
    """``n`` images of the data's *train* split (test split if there is none), uint8 NCHW.

    Seeded and spread over the classes; only those images are decoded. A spec is
    loaded at ``meta``'s size and channels with its evaluation view (what the model
    sees when deployed); a loaded bundle is sampled as it is.
    """
    from compressor.evaluation import sample_arrays

    if int(n) < 1:
        raise CompressError(f"the calibration size must be >= 1, got {n}")
    bundle = load_bundle(data, meta, splits=("train",), sample=int(n), seed=seed)
    split = getattr(bundle, "train", None)
    if split is None or len(split) == 0:
        if getattr(bundle, "test", None) is None:
            bundle = load_bundle(data, meta, splits=("test",), sample=int(n), seed=seed)
        split = bundle.test
    images, _ = sample_arrays(split, int(n), seed)
    if len(images) == 0:
        raise CompressError("no images to calibrate INT8 quantisation with")
    return images


def eval_sample(data, n: int | None = DEFAULT_EVAL_IMAGES, seed: int = 0, *, meta=None):
    """``(bundle, images, labels)``: ``n`` test images (seeded, spread over the classes; all when
    ``n`` is ``None``) on which fp32 and INT8 are compared; only those are decoded."""
    from compressor.evaluation import sample_arrays

    if n is not None and int(n) < 1:
        raise CompressError(f"--eval-images must be >= 1, got {n}")
    bundle = load_bundle(data, meta, splits=("test",), sample=n, seed=seed)
    images, labels = sample_arrays(bundle.test, n, seed)
    return bundle, images, labels


def sensitive_node_names(model, layers=SENSITIVE_LAYERS) -> list[str]:
    """Names of the ``layers`` (``first_conv``, ``last_layer``) in an ONNX graph (topologically sorted)."""
    nodes = list(model.graph.node)
    found = []
    for layer in layers:
        if layer == "first_conv":
            pick = next((n for n in nodes if n.op_type == "Conv"), None)
        elif layer == "last_layer":
            pick = next((n for n in reversed(nodes) if n.op_type in ("Gemm", "MatMul")), None)
        else:
            raise CompressError(f"unknown layer {layer!r}; use one of {', '.join(SENSITIVE_LAYERS)}")
        if pick is not None and pick.name not in found:
            found.append(pick.name)
    return found


def _name_unnamed_nodes(model) -> bool:
    """``nodes_to_exclude`` works by node name: give unnamed nodes one."""
    changed = False
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
            changed = True
    return changed


def saturating_cpu(flags=None, machine: str | None = None) -> bool:
    """True on an x86 CPU without VNNI (AVX2/AVX-512 only), where onnxruntime's U8S8 kernels
    multiply with VPMADDUBSW and can saturate its 16-bit pairwise sums. Measured on a 2-core
    AMD EPYC without AVX-512 (demo test split, 1,000 images, minmax, 512 calibration images):
    pretrained resnet20 fp32 80.4 %, INT8 80.2 %, INT8 with 7-bit weights 80.6 %; the demo's
    resnet8 student 53.8 / 52.0 / 53.0 %. ``flags``: CPU flags (default: this machine's)."""
    import platform

    from compressor.precision import cpu_flags

    arch = (machine or platform.machine()).lower()
    if arch not in ("x86_64", "amd64", "i386", "i686"):
        return False  # ARM's int8 dot products do not saturate
    flags = cpu_flags() if flags is None else set(flags)
    return not any(f in flags for f in VNNI_CPU_FLAGS)


def quantize_static_int8(onnx_path, out_path, calibration, *, per_channel: bool = True,
                         preprocess: bool = True, calibration_batch: int = CALIBRATION_BATCH,
                         method: str = "minmax", float_layers=(), metadata_dir=None,
                         reduce_range: bool | None = None) -> Path:
    """Quantise ``onnx_path`` to INT8 at ``out_path`` (written atomically).

    ``calibration``: uint8 images ``(N, C, H, W)`` (prepared as the model
    expects: normalised, or [0, 1] when the normalisation is in the graph),
    float arrays already in the model's input space, or a data spec/bundle.
    ``method``: the activation-range calibration, ``minmax | entropy | percentile``
    (percentile: the 99.999th). ``float_layers``: layers of :data:`SENSITIVE_LAYERS`
    kept in float. ``metadata_dir``: the folder the file will be used from (default: ``out_path``'s);
    the paths in its metadata (``source_checkpoint``, ``fp32_source``) are written relative to it,
    so a file quantised in a scratch folder and copied elsewhere still finds its sources.
    ``reduce_range``: 7-bit weights; ``None`` (default) turns it on where this CPU's U8S8
    kernels saturate (:func:`saturating_cpu`). The file's metadata says which (``quantization``
    ends in ``-reduce-range``; ``reduce_range`` true/false). 7-bit weights run everywhere at the
    same speed; on a CPU with VNNI they only cost a little weight precision.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIBRATION_METHODS:
        raise CompressError(f"unknown calibration method {method!r}; use one of {', '.join(CALIBRATION_METHODS)}")
    fp32 = OnnxModel(onnx_path, threads=1)
    out = check_output_path(out_path, inputs=[fp32.path])
    if isinstance(calibration, (str, os.PathLike)) or hasattr(calibration, "test"):
        calibration = calibration_images(calibration, meta=fp32.meta)
    calib = np.asarray(calibration)
    if calib.ndim != 4 or len(calib) == 0:
        raise CompressError(f"calibration images must be a non-empty (N, C, H, W) array, got shape {calib.shape}")
    if tuple(calib.shape[1:]) != tuple(fp32.chw):
        raise CompressError(f"calibration images (C,H,W)={tuple(calib.shape[1:])} do not fit the model "
                            f"input {tuple(fp32.chw)}")
    x = fp32.prepare(calib) if calib.dtype == np.uint8 else calib.astype(np.float32)
    reduce_range = saturating_cpu() if reduce_range is None else bool(reduce_range)
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
        exclude = []
        if float_layers:
            graph = onnx.load(str(src))
            if _name_unnamed_nodes(graph):
                src = Path(tmpdir) / "named.onnx"
                onnx.save_model(graph, str(src))
            exclude = sensitive_node_names(graph, tuple(float_layers))
        q = Path(tmpdir) / "int8.onnx"
        calibrate_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                            "percentile": CalibrationMethod.Percentile}[method]
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress
                quantize_static(
                    str(src), str(q), _Reader(fp32.input_name, batches),
                    quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=calibrate_method, nodes_to_exclude=exclude, reduce_range=reduce_range,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
                )
        except Exception as exc:
            raise CompressError(f"INT8 quantisation failed: {type(exc).__name__}: {exc}") from exc
        model = onnx.load(str(q))
        home = os.path.abspath(metadata_dir if metadata_dir is not None else Path(out).parent)
        src_ckpt = props.get("source_checkpoint", "")
        if src_ckpt and not os.path.isabs(src_ckpt):  # keep it relative to the *new* file's folder
            absolute = os.path.abspath(os.path.join(fp32.path.parent, src_ckpt))
            props["source_checkpoint"] = os.path.relpath(absolute, home)
        props.update({"quantization": QUANTIZATION_TAG + (REDUCE_RANGE_SUFFIX if reduce_range else ""),
                      "reduce_range": str(reduce_range).lower(), "calibration_images": str(len(x)),
                      "calibration_method": method, "float_nodes": ",".join(exclude),
                      "fp32_source": os.path.relpath(os.path.abspath(fp32.path), home)})
        set_metadata(model, props)
        with atomic_write(out, suffix=".onnx") as tmp:
            onnx.save_model(model, str(tmp))
    return Path(out)


def int8_report(fp32_path, int8_path_, data, *, threads: int | None = None, batch_sizes=(1,),
                iters: int | None = None, seconds: float | None = 1.0, warmup: int = 10,
                batch_size: int = 256, eval_images: int | None = DEFAULT_EVAL_IMAGES, seed: int = 0) -> dict:
    """Side-by-side accuracy and latency of fp32 vs int8. Accuracy: the same ``eval_images``
    test images of ``data`` for both (seeded, spread over the classes; ``None``: all)."""
    from .bench import benchmark_onnx
    from .runtime import check_fits_data, evaluate_arrays

    fp32, int8 = OnnxModel(fp32_path, threads=threads), OnnxModel(int8_path_, threads=threads)
    bundle, images, labels = eval_sample(data, eval_images, seed, meta=fp32.meta)
    check_fits_data(fp32, bundle, images)
    fp32_acc = evaluate_arrays(fp32, images, labels, batch_size=batch_size)
    int8_acc = evaluate_arrays(int8, images, labels, batch_size=batch_size)
    bench = benchmark_onnx(int8, compare=fp32, batch_sizes=batch_sizes, threads=threads,  # the sessions above
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


# ------------------------------------------------------ accuracy-aware search
def int8_candidates(methods=CALIBRATION_METHODS) -> list[dict]:
    """The search order: every calibration method fully quantised, then each with the
    sensitive layers in float (a little slower, usually closer to fp32)."""
    return ([{"method": m, "float_layers": ()} for m in methods]
            + [{"method": m, "float_layers": SENSITIVE_LAYERS} for m in methods])


def _candidate_label(c: dict) -> str:
    return c["method"] + (" + float " + "/".join(c["float_layers"]) if c["float_layers"] else "")


def interleaved_b1_p50(candidate, fp32_path, *, threads: int | None = None, seconds: float = 0.5,
                       warmup: int = 5) -> tuple[float, float]:
    """Batch-1 p50 latency (ms) of ``candidate`` and of ``fp32_path``, timed interleaved in this
    process (:func:`export.bench.benchmark_onnx` with ``compare``): same runtime, threads and input.
    Either may be an :class:`OnnxModel` session already built (used as it is)."""
    from .bench import benchmark_onnx

    rep = benchmark_onnx(candidate, compare=fp32_path, batch_sizes=(1,), threads=threads, seconds=seconds,
                         warmup=warmup)
    p50 = {r["role"]: r["p50_ms"] for r in rep["results"]}
    return p50["model"], p50["compare"]


def quantize_accuracy_aware(fp32_path, out_path, data, max_drop: float, *, calibration_size: int = DEFAULT_CALIBRATION_SIZE,
                            eval_images: int | None = None, threads: int | None = None, candidates=None,
                            latency_seconds: float = 0.5, echo=print, speed_timer=None) -> dict:
    """Search INT8 settings until the top-1 drop vs fp32 is at most ``max_drop`` points;
    keep the INT8 file only when it is also faster than fp32.

    Accuracy: top-1 on ``eval_images`` test images of ``data`` (default
    :data:`DEFAULT_EVAL_IMAGES`; seeded and spread over the classes, never the first
    N of a class-sorted split), fp32 and every candidate on the same images;
    calibration: ``calibration_size`` train images, sampled the same way. Candidates
    (:func:`int8_candidates`) are tried in order and the search stops at the first
    within budget. Speed: every candidate's batch-1 p50 is timed interleaved with the
    fp32 file's, in this process on the same runtime (onnxruntime CPU, ``threads``):
    ``speed_timer(candidate, fp32) -> (candidate_p50_ms, fp32_p50_ms)`` (both :class:`OnnxModel`
    sessions), default :func:`interleaved_b1_p50` (``latency_seconds`` each).
    The best candidate so far (highest top-1, then lowest batch-1 latency) is written
    to ``out_path`` atomically each time it improves, so an interrupted or failed search
    still leaves the best file. When the candidate within budget is not faster than
    fp32 it is not kept: ``out_path`` is removed and ``reason`` says why in one line
    (the later candidates keep more layers in float, so they would not be faster).
    Every candidate is printed with ``echo`` (accuracy, drop, size, batch-1 p50, speed
    vs fp32). Returns ``{"fp32": {...}, "candidates": [...], "best": index, "passed": bool,
    "kept": bool, "reason": str, "path": out_path, ...}`` (``passed``: within the
    accuracy budget; ``kept``: an INT8 file is left at ``path``).
    """
    import shutil

    from .runtime import check_fits_data, evaluate_arrays

    if max_drop < 0:
        raise CompressError(f"--max-accuracy-drop is in top-1 points and must be >= 0, got {max_drop:g}")
    out = check_output_path(out_path, inputs=[fp32_path])
    fp32 = OnnxModel(fp32_path, threads=threads)
    bundle, images, labels = eval_sample(data, DEFAULT_EVAL_IMAGES if eval_images is None else eval_images,
                                         meta=fp32.meta)
    check_fits_data(fp32, bundle, images)
    calib = calibration_images(data if isinstance(data, (str, os.PathLike)) else bundle, calibration_size,
                               meta=fp32.meta)
    if speed_timer is None:
        def speed_timer(path, ref):
            return interleaved_b1_p50(path, ref, threads=threads, seconds=latency_seconds)
    reduce_range = saturating_cpu()  # one decision (one /proc/cpuinfo read) for every candidate
    runtime = {"engine": "onnxruntime", "provider": "cpu", "threads": fp32.threads, "batch_size": 1,
               "statistic": "p50", "timing": "interleaved with fp32, same process"}

    base = {"top1": evaluate_arrays(fp32, images, labels)["top1"], "size_bytes": fp32.path.stat().st_size,
            "p50_ms": None}
    echo(f"INT8 search: budget {max_drop:g} top-1 points on {len(labels)} test images of {getattr(bundle, 'name', data)}, "
         f"{len(calib)} calibration images; kept only if faster than fp32 (batch 1, onnxruntime CPU, "
         f"{fp32.threads} threads, timed interleaved)"
         + ("; weights in 7 bits (reduce_range: this x86 CPU has no VNNI, 8-bit weights can saturate)"
            if reduce_range else ""))
    header = (f"{'#':>2}  {'candidate':40} {'top-1 %':>8} {'drop':>6} {'size KB':>8} {'b1 p50 ms':>9} "
              f"{'vs fp32':>7}  verdict")
    echo(header)
    echo(f"{'':>2}  {'fp32':40} {base['top1']:>8.2f} {'':>6} {base['size_bytes'] / 1024:>8.0f} {'':>9} {'1.00x':>7}")
    results, best = [], None
    with tempfile.TemporaryDirectory(prefix="compress-int8-search-") as tmpdir:
        for i, cand in enumerate(candidates if candidates is not None else int8_candidates()):
            path = Path(tmpdir) / f"candidate{i}.onnx"
            # metadata paths relative to where the kept file will live, not to the scratch folder
            quantize_static_int8(fp32.path, path, calib, method=cand["method"], float_layers=cand["float_layers"],
                                 metadata_dir=Path(out).parent, reduce_range=reduce_range)
            q = OnnxModel(path, threads=threads)
            row = {"candidate": _candidate_label(cand), "method": cand["method"],
                   "float_layers": list(cand["float_layers"]), "float_nodes": q.metadata.get("float_nodes", ""),
                   "top1": evaluate_arrays(q, images, labels)["top1"], "size_bytes": path.stat().st_size}
            p50, ref = speed_timer(q, fp32)
            row.update({"p50_ms": float(p50), "fp32_p50_ms": float(ref), "speedup": float(ref) / float(p50)})
            row["faster"] = row["speedup"] > 1.0
            row["drop"] = base["top1"] - row["top1"]
            row["within_budget"] = row["drop"] <= max_drop + 1e-9
            improved = best is None or (row["top1"], -row["p50_ms"]) > (results[best]["top1"], -results[best]["p50_ms"])
            results.append(row)
            if improved:
                best = i
                with atomic_write(out, suffix=".onnx") as tmp:
                    shutil.copyfile(path, tmp)
            verdict = "within budget" if row["within_budget"] else "over budget"
            if row["within_budget"] and not row["faster"]:
                verdict += ", not faster than fp32: not kept"
            elif improved:
                verdict += ", kept"
            echo(f"{i + 1:>2}  {row['candidate']:40} {row['top1']:>8.2f} {row['drop']:>+6.2f} "
                 f"{row['size_bytes'] / 1024:>8.0f} {row['p50_ms']:>9.3f} {row['speedup']:>6.2f}x  {verdict}")
            if row["within_budget"]:
                break
    chosen = results[best]
    base["p50_ms"] = chosen["fp32_p50_ms"]
    kept, reason = True, ""
    if chosen["within_budget"] and not chosen["faster"]:
        kept = False
        out.unlink(missing_ok=True)
        reason = (f"INT8 not kept: {chosen['candidate']} is within {max_drop:g} top-1 points but not faster than fp32 "
                  f"(batch-1 p50 {chosen['p50_ms']:.3f} vs {chosen['fp32_p50_ms']:.3f} ms, {chosen['speedup']:.2f}x, "
                  f"onnxruntime CPU, {fp32.threads} threads, timed interleaved); deploy {fp32.path.name}")
        echo(reason)
    return {"fp32": base, "candidates": results, "best": best, "passed": chosen["within_budget"], "kept": kept,
            "reason": reason, "runtime": runtime, "path": str(out), "max_drop": max_drop,
            "eval_images": int(len(labels)), "calibration_images": int(len(calib))}
