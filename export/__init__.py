"""Deployment: ONNX export, parity validation, onnxruntime inference and
benchmarks, static INT8 quantisation and the CI gates.

Public API::

    from export import export_onnx, validate_onnx, OnnxModel, evaluate_onnx
    from export import benchmark_onnx, check_budget, check_baseline, check_accuracy_floor
    from export import quantize_static_int8, int8_report

The Click commands ``export_cmd`` / ``bench_cmd`` live in :mod:`export.commands`.
Names are imported on first use (PEP 562 ``__getattr__``): ``import export``
loads neither torch, onnx, onnxruntime nor numpy, so ``compress --help`` stays instant.
"""
from __future__ import annotations

import importlib

# public name -> submodule that defines it
_LAZY = {
    **dict.fromkeys(["benchmark_onnx", "check_accuracy_floor", "check_baseline", "check_budget", "format_table",
                     "load_baseline", "onnx_model_latency_ms", "parse_ratio", "write_report"], "bench"),
    **dict.fromkeys(["default_threads", "machine_info"], "machine"),
    **dict.fromkeys(["INPUT_NAME", "METADATA_KEYS", "OUTPUT_NAME", "NormalizedModel", "default_onnx_path",
                     "export_onnx", "invalid_path", "resolve_checkpoint"], "onnx_export"),
    **dict.fromkeys(["calibration_images", "format_int8_report", "int8_path", "int8_report",
                     "quantize_static_int8"], "quantize"),
    **dict.fromkeys(["OnnxModel", "evaluate_onnx"], "runtime"),
    **dict.fromkeys(["resolve_providers"], "providers"),
    **dict.fromkeys(["ValidationReport", "validate_onnx"], "validate"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'export' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
