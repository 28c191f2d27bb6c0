"""ONNX Runtime vs PyTorch eager latency for the CIFAR ResNets (random weights).

Exports each model with ``export.export_onnx`` (torch.export / dynamo), then
times onnxruntime and torch eager on the same inputs in one interleaved run
(``export.benchmark_onnx`` with ``torch_model``), both pinned to the same
number of intra-op threads. Prints a table and, with ``--json``, writes every
figure plus the ORT speedups.

Goal (DESIGN.md section 6): ORT >= 4x faster than eager at batch 1 for
resnet8 on 2 cores (measured there: 0.19 vs 1.05 ms, 5.6x). ``--check``
exits 1 when the goal is missed.

    python benchmarks/export_latency.py --threads 2 --iters 200 --json latency.json
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from compressor.checkpoint import meta_for
from compressor.models import create_model, model_stats
from export import benchmark_onnx, export_onnx
from export.bench import machine_info, versions

GOAL = {"arch": "resnet8", "batch_size": 1, "min_speedup": 4.0}


def run(models, batch_sizes, threads, iters, seconds, warmup, large_iters):
    rows, reports = [], {}
    with tempfile.TemporaryDirectory(prefix="compress-bench-") as tmpdir:
        for arch in models:
            torch.manual_seed(0)
            model = create_model(arch, num_classes=10).eval()
            path = export_onnx((model, meta_for(arch, num_classes=10)), Path(tmpdir) / f"{arch}.onnx")
            for b in batch_sizes:
                if b == 1:
                    n = iters
                else:
                    n = large_iters or (max(5, iters // 4) if iters else None)
                rep = benchmark_onnx(path, batch_sizes=(b,), threads=threads, warmup=warmup, iters=n,
                                     seconds=None if n else seconds, torch_model=model)
                reports.setdefault(arch, []).append(rep)
                ort_r = next(r for r in rep["results"] if r["engine"] == "onnxruntime")
                tch_r = next(r for r in rep["results"] if r["engine"] == "torch")
                cmp = rep["comparisons"][0]
                rows.append({
                    "arch": arch, "macs": model_stats(arch)["macs"], "batch_size": b,
                    "ort_p50_ms": ort_r["p50_ms"], "ort_p90_ms": ort_r["p90_ms"], "ort_cv": ort_r["cv"],
                    "ort_ips": ort_r["throughput_ips"], "ort_iterations": ort_r["iterations"],
                    "torch_p50_ms": tch_r["p50_ms"], "torch_p90_ms": tch_r["p90_ms"], "torch_cv": tch_r["cv"],
                    "torch_ips": tch_r["throughput_ips"], "torch_iterations": tch_r["iterations"],
                    "ort_speedup_p50": cmp["p50_speedup"], "ort_speedup_mean": cmp["mean_speedup"],
                    "ort_gflops": 2 * model_stats(arch)["macs"] * b / (ort_r["p50_ms"] * 1e6),
                })
                print(_row(rows[-1]), flush=True)
    return rows, reports


HEADER = (f"{'model':<10} {'MMACs':>7} {'batch':>5} {'ORT p50 ms':>11} {'torch p50 ms':>13} {'ORT speedup':>12} "
          f"{'ORT img/s':>10} {'torch img/s':>12} {'ORT GFLOP/s':>12}")


def _row(r) -> str:
    return (f"{r['arch']:<10} {r['macs'] / 1e6:>7.1f} {r['batch_size']:>5} {r['ort_p50_ms']:>11.3f} "
            f"{r['torch_p50_ms']:>13.3f} {r['ort_speedup_p50']:>11.2f}x {r['ort_ips']:>10.1f} "
            f"{r['torch_ips']:>12.1f} {r['ort_gflops']:>12.1f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet8,resnet20,resnet56,resnet110")
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads for both engines [default: cores, max 8]")
    ap.add_argument("--iters", type=int, default=None,
                    help="timed runs per engine at batch 1 (larger batches: a quarter, at least 5); "
                         "default: --seconds of timing")
    ap.add_argument("--large-iters", type=int, default=None, help="timed runs per engine at batch > 1")
    ap.add_argument("--seconds", type=float, default=2.0, help="timing per engine and batch when --iters is not given")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--check", action="store_true", help="exit 1 if the resnet8 batch-1 goal (>= 4x) is missed")
    args = ap.parse_args(argv)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    machine = machine_info()
    from export.runtime import default_threads

    threads = args.threads or default_threads()
    print(f"{machine['cpu']} ({machine['usable_cores']} usable cores), {threads} threads, "
          f"onnxruntime {versions()['onnxruntime']}, torch {versions()['torch']}")
    print(HEADER)
    print("-" * len(HEADER))
    rows, reports = run(models, sizes, threads, args.iters, args.seconds, args.warmup, args.large_iters)

    goal_row = next((r for r in rows if r["arch"] == GOAL["arch"] and r["batch_size"] == GOAL["batch_size"]), None)
    goal = dict(GOAL)
    if goal_row is not None:
        goal.update(measured_speedup=goal_row["ort_speedup_p50"],
                    met=goal_row["ort_speedup_p50"] >= GOAL["min_speedup"])
        print(f"goal: ORT >= {GOAL['min_speedup']:g}x eager for resnet8 at batch 1 -> "
              f"{goal_row['ort_speedup_p50']:.2f}x ({'met' if goal['met'] else 'MISSED'})")
    if args.json:
        from compressor.fileio import write_json

        first = next(iter(reports.values()))[0]
        write_json(args.json, {
            "schema": "compress.export_latency/1", "timestamp": first["timestamp"], "machine": machine,
            "versions": versions(), "threads": threads, "warmup": args.warmup, "iters": args.iters,
            "seconds": args.seconds if args.iters is None else None, "batch_sizes": sizes,
            "rows": rows, "goal": goal,
            "reports": {arch: reps for arch, reps in reports.items()},
        })
        print(f"wrote {args.json}")
    if args.check and goal_row is not None and not goal["met"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
