"""Deployment: ONNX export, parity validation, onnxruntime inference and
benchmarks, static INT8 quantisation and the CI gates.

Public API::

    from export import export_onnx, validate_onnx, OnnxModel, evaluate_onnx
    from export import benchmark_onnx, check_budget, check_baseline, check_accuracy_floor
    from export import quantize_static_int8, int8_report

The Click commands ``export_cmd`` / ``bench_cmd`` live in :mod:`export.commands`
(imported lazily: importing :mod:`export` does not import Click).
"""
from .bench import (benchmark_onnx, check_accuracy_floor, check_baseline, check_budget, format_table,
                    load_baseline, machine_info, parse_ratio, write_report)
from .onnx_export import (INPUT_NAME, METADATA_KEYS, OUTPUT_NAME, NormalizedModel, default_onnx_path, export_onnx,
                          invalid_path, resolve_checkpoint)
from .quantize import calibration_images, format_int8_report, int8_path, int8_report, quantize_static_int8
from .runtime import OnnxModel, default_threads, evaluate_onnx, resolve_providers
from .validate import ValidationReport, validate_onnx

__all__ = [
    "export_onnx", "resolve_checkpoint", "default_onnx_path", "invalid_path", "NormalizedModel",
    "INPUT_NAME", "OUTPUT_NAME", "METADATA_KEYS",
    "validate_onnx", "ValidationReport",
    "OnnxModel", "evaluate_onnx", "default_threads", "resolve_providers",
    "benchmark_onnx", "format_table", "machine_info", "write_report",
    "check_budget", "check_baseline", "check_accuracy_floor", "load_baseline", "parse_ratio",
    "quantize_static_int8", "int8_report", "format_int8_report", "calibration_images", "int8_path",
]
