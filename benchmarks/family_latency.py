"""Batch-1 onnxruntime latency of small students of several families at one input size.

Prints JSON: per model, params, MACs and the median latency (ms) of each repeat,
plus each model's ratio to the first one. Random weights (latency does not
depend on them); the models are exported with compress's own exporter.

    python benchmarks/family_latency.py --size 32 --threads 2 \\
        --models resnet8 mobilenetv2_035:stem=cifar mobilenetv3_small_050:stem=cifar
"""
from __future__ import annotations

import argparse
import json
import os
import platform

from compressor.latency import onnx_latency_ms
from export.bench import onnx_model_latency_ms
from compressor.planning import profile_arch


def parse(spec: str) -> tuple[str, dict]:
    arch, _, opts = spec.partition(":")
    kwargs = dict(kv.split("=", 1) for kv in opts.split(",") if kv)
    return arch, kwargs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet8", "mobilenetv2_035:stem=cifar"])
    ap.add_argument("--size", type=int, default=32, help="input height = width, 3 channels")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats (shared machines are noisy)")
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    size = (3, args.size, args.size)
    rows = {spec: {"ms": []} for spec in args.models}
    for _ in range(args.repeats):
        for spec in args.models:
            arch, kwargs = parse(spec)
            rows[spec]["ms"].append(round(onnx_latency_ms(arch, model_kwargs=kwargs, threads=args.threads, warmup=20,
                                                          iters=args.iters, use_cache=False, input_size=size,
                                                          timer=onnx_model_latency_ms), 4))
    for spec in args.models:
        arch, kwargs = parse(spec)
        rows[spec]["params"], rows[spec]["macs"] = profile_arch(arch, 10, kwargs, size)
        rows[spec]["ratio_to_first"] = round(min(rows[spec]["ms"]) / min(rows[args.models[0]]["ms"]), 2)
    print(json.dumps({"input": list(size), "threads": args.threads, "cpu": platform.processor() or platform.machine(),
                      "load_average": os.getloadavg(), "models": rows}, indent=1))


if __name__ == "__main__":
    main()
