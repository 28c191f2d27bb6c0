"""Choices the ``compress`` options offer, kept free of heavy imports (no
onnxruntime, numpy or torch) so that building the CLI's help stays instant."""
from __future__ import annotations

GRAPH_OPT_LEVELS = ("disable", "basic", "extended", "all")
PROVIDERS = ("cpu", "openvino", "cuda")       # onnxruntime execution providers compress can drive
PRECISIONS = ("f32", "bf16")                  # OpenVINO's INFERENCE_PRECISION_HINT
