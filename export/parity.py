"""Run an exported ONNX file in the other runtimes people deploy with, and compare.

onnxruntime is the reference runtime (:mod:`export.validate` checks it against
PyTorch). The runtimes here are optional (``pip install 'compress[runtimes]'``)
and each is checked only when its package is installed:

* ``openvino``: ``ov.Core().read_model(path)`` compiled for ``CPU`` with
  ``INFERENCE_PRECISION_HINT=f32`` (OpenVINO would otherwise run bf16 on CPUs
  that have it);
* ``opencv``: ``cv2.dnn.readNetFromONNX(path)`` with OpenCV's default engine
  (``ENGINE_AUTO``: OpenCV 5's new engine, the classic one as its fallback);
* ``opencv-classic``: the same with ``ENGINE_CLASSIC`` (the OpenCV 4.x importer,
  still the one many deployments use).

``ENGINE_ORT`` is not a separate row: in the OpenCV 5.0 wheels it gives the
same results as the default engine. Each runtime gets the same inputs, in the
same batches, as onnxruntime; :mod:`export.validate` compares its logits with
the PyTorch ones (``compare_logits``): top-1 agreement of at least
``min_agreement`` and every logit within :data:`TOLERANCE_FACTOR` times the
onnxruntime tolerance ``atol + rtol * |ref|``. Their kernels sum in another
order (OpenCV's classic engine differs from PyTorch by 3.7e-4 on a MobileNetV2
whose onnxruntime difference is 9e-5, with the same top-1), while a wrongly
computed graph is off by whole logits (the dynamo MobileNetV3 in OpenCV: 36).
A runtime that cannot load or run the file fails with its first error line.
"""
from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import asdict, dataclass

import numpy as np

from compressor.errors import CompressError

#: Optional runtimes, in report order; "onnxruntime" is always checked (by validate.py).
RUNTIMES = ("openvino", "opencv", "opencv-classic")
ALL_RUNTIMES = ("onnxruntime", *RUNTIMES)
TOLERANCE_FACTOR = 10  # other runtimes: logits within 10x the onnxruntime check's atol + rtol * |ref|
_PACKAGE = {"openvino": "openvino", "opencv": "cv2", "opencv-classic": "cv2"}
_INSTALL_HINT = "pip install 'compress[runtimes]' (openvino, opencv-python-headless)"


@dataclass
class RuntimeResult:
    runtime: str
    version: str
    passed: bool
    max_abs_diff: float
    top1_agreement: float
    n: int
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        if self.error:
            return f"{self.runtime} {self.version}: FAIL ({self.error})"
        return (f"{self.runtime} {self.version}: {'agrees' if self.passed else 'DISAGREES'} "
                f"(max|diff| {self.max_abs_diff:.2e}, top-1 {100 * self.top1_agreement:.2f}%)")


def is_installed(runtime: str) -> bool:
    if runtime == "onnxruntime":
        return True
    if runtime not in _PACKAGE:
        raise CompressError(f"unknown runtime {runtime!r}; choose from {', '.join(ALL_RUNTIMES)}")
    if importlib.util.find_spec(_PACKAGE[runtime]) is None:
        return False
    if runtime.startswith("opencv"):
        import cv2

        return hasattr(cv2, "dnn") and hasattr(cv2.dnn, "readNetFromONNX")
    return True


def installed_runtimes() -> list[str]:
    """The optional runtimes (of :data:`RUNTIMES`) whose package is importable."""
    return [r for r in RUNTIMES if is_installed(r)]


def resolve_runtimes(spec) -> list[str]:
    """``"installed"`` (or ``None``) -> every installed optional runtime; ``"onnxruntime"`` or ``""`` -> none;
    a comma list or sequence -> those (each must be installed)."""
    if spec is None or spec == "installed":
        return installed_runtimes()
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    out = []
    for name in names:
        if not name or name == "onnxruntime":
            continue
        if not is_installed(name):  # raises on an unknown name
            raise CompressError(f"runtime {name!r} is not installed; {_INSTALL_HINT}, or leave it out of --runtimes")
        if name not in out:
            out.append(name)
    return out


def runtime_version(runtime: str) -> str:
    if runtime == "onnxruntime":
        import onnxruntime

        return onnxruntime.__version__
    if runtime == "openvino":
        import openvino

        return openvino.__version__.split("-")[0]
    import cv2

    return cv2.__version__


@contextlib.contextmanager
def _cv2_threads(threads: int | None):
    import cv2

    before = cv2.getNumThreads()
    if threads:
        cv2.setNumThreads(int(threads))
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def run_runtime(runtime: str, path, batches, *, threads: int | None = None) -> np.ndarray:
    """Logits of ``path`` in ``runtime`` for each array in ``batches`` (float32 NCHW), concatenated."""
    path = str(path)
    batches = [np.ascontiguousarray(b, dtype=np.float32) for b in batches]
    if runtime == "openvino":
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        compiled = core.compile_model(core.read_model(path), "CPU", config)
        request = compiled.create_infer_request()
        return np.concatenate([np.array(request.infer({0: b})[compiled.output(0)]) for b in batches])
    if runtime in ("opencv", "opencv-classic"):
        import cv2

        engine = cv2.dnn.ENGINE_CLASSIC if runtime == "opencv-classic" else cv2.dnn.ENGINE_AUTO
        with _cv2_threads(threads):
            net = cv2.dnn.readNetFromONNX(path, engine)
            outs = []
            for b in batches:
                net.setInput(b)
                outs.append(np.array(net.forward(), dtype=np.float32).reshape(len(b), -1))
        return np.concatenate(outs)
    raise CompressError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")


def first_error_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    # OpenCV puts the useful part (file:line: error: ...) on the last line
    text = lines[-1] if lines and type(exc).__module__.startswith("cv2") else (lines[0] if lines else "")
    return f"{type(exc).__name__}: {text[:200]}"
