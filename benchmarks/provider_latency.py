"""The deployment runtimes on this machine for the pretrained CIFAR-10 ResNet-20.

Exports the embedded pretrained resnet20 (compressor/assets), quantises it to
INT8 (MinMax, 512 demo training images), then runs ``compress bench --provider
all``'s table (``export.provider_table``): every available provider x fp32 / bf16
(OpenVINO hint) / int8 file x batch 1 and 64, parity vs onnxruntime CPU fp32 on
the demo test images (top-1 within 0.5 points for bf16/int8). Prints the table
and JSON with the goal check.

Goal (issue 13, for the AMX Xeon): the fastest runtime that passes parity gives
>= 2x lower batch-1 p50 and >= 4x batch-64 throughput than onnxruntime CPU fp32.
``--check`` exits 1 when it is missed.

    python benchmarks/provider_latency.py --threads 2 --seconds 2 --json providers.json
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_json_report.py, however the script is run
from _json_report import emit_report  # noqa: E402

GOAL = {"b1_p50_speedup": 2.0, "b64_throughput_ratio": 4.0}
TEACHER = Path(__file__).resolve().parents[1] / "compressor" / "assets" / "resnet20_cifar10_pretrained.safetensors"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=2.0, help="timing per row and batch size")
    ap.add_argument("--data", default="demo", help="parity images and INT8 calibration")
    ap.add_argument("--json", default=None)
    ap.add_argument("--check", action="store_true", help="exit 1 when the goal is missed")
    args = ap.parse_args(argv)

    from export import export_onnx, quantize_static_int8
    from export.provider_table import format_provider_table, provider_table
    from export.quantize import calibration_images, int8_path
    from export.runtime import load_bundle

    bundle = load_bundle(args.data)
    with tempfile.TemporaryDirectory(prefix="compress-providers-") as tmp:
        fp32 = export_onnx(TEACHER, Path(tmp) / "resnet20.onnx")
        quantize_static_int8(fp32, int8_path(fp32), calibration_images(bundle, 512))
        rep = provider_table(fp32, batch_sizes=(1, 64), threads=args.threads, seconds=args.seconds, data=bundle)
    print(format_provider_table(rep), file=sys.stderr)
    fastest = rep["fastest"]
    b1 = fastest.get("1", {}).get("p50_speedup_vs_cpu_fp32") or 0.0
    b64 = fastest.get("64", {}).get("throughput_vs_cpu_fp32") or 0.0
    rep["goal"] = {**GOAL, "b1_measured": round(b1, 2), "b64_measured": round(b64, 2),
                   "met": b1 >= GOAL["b1_p50_speedup"] and b64 >= GOAL["b64_throughput_ratio"]}
    return emit_report(rep, args.json, args.check)


if __name__ == "__main__":
    sys.exit(main())
