"""Parity validation of an exported ONNX file against the PyTorch model.

Steps: ``onnx.checker.check_model``; then the same inputs go through
onnxruntime and through the PyTorch model, at batch sizes that differ from the
export's example batch (so the dynamic batch axis is exercised). Inputs are
real test images when data is given, else random ones.

Pass criterion (numpy ``allclose`` semantics): every logit satisfies
``|ort - torch| <= atol + rtol * |torch|`` *and* the top-1 agreement is at
least ``min_agreement``. A sample whose two candidate classes are tied within
that same tolerance in the PyTorch logits counts as agreeing: a tie cannot be
broken reliably by either runtime.

The same inputs, in the same batches, then go through every other installed
runtime (OpenVINO f32, OpenCV DNN: :mod:`export.parity`), compared with PyTorch
by the same rule with a 10x looser logit tolerance (their kernels sum in another
order); the report lists each with its max|diff| and top-1 agreement, and one
that disagrees fails the check too (``runtimes=`` narrows the list).

On failure the file is renamed to ``NAME.invalid.onnx`` (so nothing downstream
picks it up by its usual name) and :class:`CheckFailed` carries the numbers.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor.checkpoint import CheckpointMeta
from compressor.errors import CheckFailed, CompressError

from .onnx_export import invalid_path
from .parity import TOLERANCE_FACTOR, RuntimeResult, first_error_line, resolve_runtimes, run_runtime, runtime_version
from .runtime import OnnxModel, load_bundle, normalize_float

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
DEFAULT_MIN_AGREEMENT = 1.0
DEFAULT_BATCH_SIZES = (1, 7, 24)
VALIDATION_IMAGES = sum(DEFAULT_BATCH_SIZES)  # test images a validation with data decodes


@dataclass
class ValidationReport:
    path: str
    passed: bool
    max_abs_diff: float
    max_rel_diff: float          # max over logits of |ort - torch| / max(|torch|, 1e-6)
    tolerance_ratio: float       # max of |ort - torch| / (atol + rtol |torch|); <= 1 passes
    top1_agreement: float        # fraction of samples, ties within tolerance count as agreeing
    n: int
    batch_sizes: list
    inputs: str                  # "random" or "data:<spec>"
    preprocessing: str
    atol: float
    rtol: float
    min_agreement: float
    checker: str = "ok"
    failures: list = field(default_factory=list)
    exporter: str = ""           # the file's ``exporter`` metadata (which path wrote it)
    runtimes: list = field(default_factory=list)  # per other runtime: export.parity.RuntimeResult.to_dict()

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        text = (f"parity {status}: max|diff| {self.max_abs_diff:.2e}, max rel {self.max_rel_diff:.2e}, "
                f"top-1 agreement {100 * self.top1_agreement:.2f}% on {self.n} {self.inputs} inputs "
                f"(batches {', '.join(map(str, self.batch_sizes))}; atol {self.atol:g}, rtol {self.rtol:g}, "
                f"min agreement {100 * self.min_agreement:g}%)")
        if self.runtimes:
            text += "; vs PyTorch in " + "; ".join(RuntimeResult(**r).summary() for r in self.runtimes)
        return text

    @property
    def agreed_runtimes(self) -> list[str]:
        """onnxruntime (when the check passed) and every other runtime that agreed."""
        ok = ["onnxruntime"] if not [f for f in self.failures if not f.startswith("runtime ")] else []
        return ok + [r["runtime"] for r in self.runtimes if r["passed"]]


def _mark_invalid(path: Path) -> Path:
    bad = invalid_path(path)
    os.replace(path, bad)
    return bad


def _inputs(model: OnnxModel, meta: CheckpointMeta, data, total: int, seed: int):
    """``(onnx_inputs, torch_inputs, label)`` for ``total`` samples.

    The PyTorch model always gets normalised inputs; onnxruntime gets the same
    ones, or the raw [0, 1] images when the normalisation is inside the graph.
    """
    chw = tuple(int(v) for v in meta.input_size)
    if data is not None:
        from compressor.evaluation import check_data_fits, sample_arrays

        # ``total`` test images spread over the classes (test sets are often sorted by class),
        # decoded alone: a spec loads only those files, a loaded bundle is sampled
        bundle = load_bundle(data, meta, splits=("test",), sample=total, seed=seed)
        images, _ = sample_arrays(bundle.test, total, seed)
        if len(images) == 0:
            raise CompressError("the data's test split is empty; cannot validate on it")
        check_data_fits(bundle, what="the model", chw=chw, data_chw=images.shape[1:], fixed_size=True)
        if len(images) < total:  # a small split: repeat it to fill the batches
            images = images[np.arange(total) % len(images)]
        raw = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
        label = f"data:{data}" if isinstance(data, (str, os.PathLike)) else "data"
    else:
        rng = np.random.default_rng(seed)
        shape = (total, *chw)
        if model.preprocessing == "normalize":
            raw = rng.random(shape, dtype=np.float32)
        else:
            raw = None
            normed = rng.standard_normal(shape, dtype=np.float32)
        label = "random"
    if raw is not None:
        normed = normalize_float(raw, meta.mean, meta.std)
    onnx_in = raw if model.preprocessing == "normalize" else normed
    return onnx_in, normed, label


def _tolerance_ratio(diff: np.ndarray, tol: np.ndarray) -> float:
    """max of diff / tol, with 0/0 = 0 and x/0 = inf (atol = rtol = 0 means bit-exact)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(diff == 0, 0.0, diff / tol)
    return float(np.max(ratio, initial=0.0))


def compare_logits(ort_out: np.ndarray, ref: np.ndarray, *, atol: float, rtol: float) -> dict:
    a = ort_out.astype(np.float64)
    b = ref.astype(np.float64)
    diff = np.abs(a - b)
    tol = atol + rtol * np.abs(b)
    from compressor.evaluation import predictions  # one tie rule: the lowest class index wins

    ref_top = predictions(b)
    ort_top = predictions(a)
    rows = np.arange(len(b))
    gap = np.abs(b[rows, ref_top] - b[rows, ort_top])
    tied = gap <= atol + rtol * np.abs(b[rows, ref_top])
    agree = (ref_top == ort_top) | tied
    return {
        "max_abs_diff": float(diff.max(initial=0.0)),
        "max_rel_diff": float((diff / np.maximum(np.abs(b), 1e-6)).max(initial=0.0)),
        "tolerance_ratio": _tolerance_ratio(diff, tol),
        "agree": agree,
        "allclose": bool(np.all(diff <= tol)),
        "finite": bool(np.isfinite(a).all()),
    }


def check_runtime(runtime: str, path, batches, reference: np.ndarray, *, atol: float, rtol: float,
                  min_agreement: float, threads: int | None = None) -> RuntimeResult:
    """Run ``path`` in ``runtime`` on ``batches`` and compare with ``reference`` (PyTorch logits)."""
    version = runtime_version(runtime)
    n = int(len(reference))
    try:
        out = run_runtime(runtime, path, batches, threads=threads)
    except CompressError:
        raise
    except Exception as exc:  # the runtime cannot load or run this graph: a result, not a crash
        return RuntimeResult(runtime, version, False, float("inf"), 0.0, n, error=first_error_line(exc))
    if out.shape != reference.shape:
        return RuntimeResult(runtime, version, False, float("inf"), 0.0, n,
                             error=f"output shape {out.shape} vs PyTorch {reference.shape}")
    # their kernels sum in another order: logits within TOLERANCE_FACTOR x the onnxruntime tolerance
    cmp = compare_logits(out, reference, atol=TOLERANCE_FACTOR * atol, rtol=TOLERANCE_FACTOR * rtol)
    agreement = float(np.mean(cmp["agree"])) if n else 0.0
    passed = cmp["finite"] and cmp["allclose"] and agreement >= min_agreement
    return RuntimeResult(runtime, version, bool(passed), cmp["max_abs_diff"], agreement, n)


def validate_onnx(onnx_path, model: nn.Module, meta: CheckpointMeta, *, data=None,
                  atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                  min_agreement: float = DEFAULT_MIN_AGREEMENT, batch_sizes=DEFAULT_BATCH_SIZES,
                  seed: int = 0, threads: int | None = None, rename_invalid: bool = True,
                  data_label: str | None = None, runtimes="installed") -> ValidationReport:
    """Check ``onnx_path`` against ``model`` (the PyTorch model it was exported from).

    ``data``: a data spec or a loaded bundle (32 test images spread over the classes, seeded by
    ``seed``, are used and only those are decoded;
    ``data_label`` names it in the report), else random inputs. ``runtimes``: the other runtimes
    checked on the same inputs (``"installed"``: every installed one of :data:`export.parity.RUNTIMES`;
    a list or comma string; ``()`` for onnxruntime only). Raises
    :class:`CheckFailed` (after renaming the file to ``*.invalid.onnx`` when
    ``rename_invalid``) if the checker or the parity check fails.
    """
    import onnx

    path = Path(onnx_path)
    if atol < 0 or rtol < 0:
        raise CompressError(f"tolerances must be >= 0 (atol {atol}, rtol {rtol})")
    if not 0.0 <= min_agreement <= 1.0:
        raise CompressError(f"min_agreement is a fraction in [0, 1], got {min_agreement}")
    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or min(batch_sizes) < 1:
        raise CompressError(f"batch sizes must be >= 1, got {batch_sizes}")
    others = resolve_runtimes(runtimes)

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        where = _mark_invalid(path) if rename_invalid else path
        raise CheckFailed(f"{path}: onnx.checker rejected the file ({str(exc).splitlines()[0]}); "
                          f"moved to {where}") from None

    sess = OnnxModel(path, threads=threads)
    onnx_in, torch_in, label = _inputs(sess, meta, data, sum(batch_sizes), seed)
    if data is not None and data_label:
        label = f"data:{data_label}"

    model = model.eval()
    outs, refs, chunks = [], [], []
    start = 0
    with torch.inference_mode():
        for b in batch_sizes:
            chunks.append(onnx_in[start:start + b])
            outs.append(sess.predict(chunks[-1]))
            refs.append(model(torch.from_numpy(np.ascontiguousarray(torch_in[start:start + b]))).float().numpy())
            start += b
    ort_out, ref = np.concatenate(outs), np.concatenate(refs)
    preprocessing = sess.preprocessing
    exporter = sess.metadata.get("exporter", "")
    del sess  # release the file (it may be renamed below)
    results = [check_runtime(r, path, chunks, ref, atol=atol, rtol=rtol, min_agreement=min_agreement,
                             threads=threads) for r in others]

    failures = []
    if ort_out.shape != ref.shape:
        failures.append(f"output shape {ort_out.shape} vs PyTorch {ref.shape}")
        cmp = {"max_abs_diff": float("inf"), "max_rel_diff": float("inf"), "tolerance_ratio": float("inf"),
               "agree": np.zeros(len(ref), bool), "allclose": False, "finite": False}
    else:
        cmp = compare_logits(ort_out, ref, atol=atol, rtol=rtol)
    agreement = float(np.mean(cmp["agree"])) if len(cmp["agree"]) else 0.0
    if not cmp["finite"] and not failures:
        failures.append("onnxruntime produced non-finite logits")
    if not cmp["allclose"] and not failures:
        failures.append(f"logits differ beyond atol {atol:g} + rtol {rtol:g}*|ref| "
                        f"(worst element {cmp['tolerance_ratio']:.3g}x the tolerance)")
    if agreement < min_agreement:
        failures.append(f"top-1 agreement {100 * agreement:.2f}% < {100 * min_agreement:g}%")
    failures += [f"runtime {r.summary()}" for r in results if not r.passed]

    report = ValidationReport(
        path=str(path), passed=not failures, max_abs_diff=cmp["max_abs_diff"], max_rel_diff=cmp["max_rel_diff"],
        tolerance_ratio=cmp["tolerance_ratio"], top1_agreement=agreement, n=int(len(ref)),
        batch_sizes=batch_sizes, inputs=label, preprocessing=preprocessing, atol=atol, rtol=rtol,
        min_agreement=min_agreement, failures=failures, exporter=exporter,
        runtimes=[r.to_dict() for r in results],
    )
    if failures:
        where = _mark_invalid(path) if rename_invalid else path
        report.path = str(where)
        hint = ("re-export (e.g. --legacy or another --opset) or loosen --atol/--rtol if the difference is "
                "acceptable")
        if all(f.startswith("runtime ") for f in failures):  # onnxruntime agrees; another runtime does not
            hint = ("re-export with the other exporter (--legacy, or without it), or check only the runtimes you "
                    "deploy with (--runtimes onnxruntime,openvino)")
        raise CheckFailed(f"ONNX parity check failed for {path}: {'; '.join(failures)}. {report.summary()}. "
                          f"File moved to {where}; {hint}")
    return report
