"""Does the interleaved latency gate hold on a noisy machine? (issue 20, "done when")

Exports resnet8 and resnet14 (CIFAR, random weights, seeded), starts ``--load``
CPU-bound background processes (python busy loops that end by themselves after
``--load-seconds`` and are stopped when the script ends), then runs the default
gate of ``compress bench NEW.onnx --baseline-model OLD.onnx`` (``export.gate.
compare_latency``: 15 interleaved rounds, 95% bootstrap CI, limit +10%)
``--runs`` times on resnet8 vs itself (it should pass) and ``--runs`` times on
resnet14 vs resnet8 (it should fail; ``--pair`` picks other models), alternating the two. For comparison, the
old way -- a ``bench --json`` baseline of resnet8 measured once, then
``bench --baseline`` of the same file -- runs ``--runs`` times too.

Goal: >= 19 of 20 passes for the same file and >= 19 of 20 fails for the
slower model. Prints JSON (counts, per-run slowdowns and intervals, seconds);
``--check`` exits 1 when the goal is missed.

    python benchmarks/gate_flakiness.py --runs 20 --load 2 --json gate_flakiness.json
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_json_report.py, however the script is run
from _json_report import emit_report  # noqa: E402

BUSY = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def _export(name: str, folder: Path) -> Path:
    import torch

    from compressor.checkpoint import meta_for
    from compressor.models import create_model
    from export import export_onnx

    torch.manual_seed(0)
    return export_onnx((create_model(name).eval(), meta_for(name, num_classes=10)), folder / f"{name}.onnx")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="gate runs per pair")
    ap.add_argument("--load", type=int, default=2, help="CPU-bound background processes")
    ap.add_argument("--load-seconds", type=float, default=600.0, help="the busy loops end by themselves after this")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime threads  [default: as compress bench]")
    ap.add_argument("--pair", default="resnet14:resnet8",
                    help="SLOWER:FASTER registry models; FASTER is also the same-file pair (e.g. resnet26:resnet20)")
    ap.add_argument("--no-json-baseline", action="store_true", help="skip the old --baseline JSON comparison")
    ap.add_argument("--json", default=None)
    ap.add_argument("--check", action="store_true", help="exit 1 when the goal is missed")
    args = ap.parse_args(argv)

    from export.bench import benchmark_onnx, check_baseline
    from export.gate import compare_latency

    started = time.perf_counter()
    busy = []
    with tempfile.TemporaryDirectory(prefix="compress-gate-") as tmp:
        slower, _, faster = args.pair.partition(":")
        small, big = _export(faster or "resnet8", Path(tmp)), _export(slower, Path(tmp))
        try:
            for _ in range(args.load):
                busy.append(subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=args.load_seconds)]))
            time.sleep(1.0)
            runs = {"same": [], "slower": []}
            for i in range(args.runs):
                for kind, cand in (("same", small), ("slower", big)) if i % 2 == 0 else (("slower", big),
                                                                                         ("same", small)):
                    t0 = time.perf_counter()
                    rep = compare_latency(cand, small, threads=args.threads)
                    d = rep["batches"][0]
                    runs[kind].append({"passed": d["passed"], "slowdown": round(d["ratio"], 3),
                                       "ci": [round(d["ci_low"], 3), round(d["ci_high"], 3)],
                                       "seconds": round(time.perf_counter() - t0, 2)})
                    print(f"{kind:<6} run {i + 1:>2}: {d['message']}", file=sys.stderr)
            old = None
            if not args.no_json_baseline:
                base = benchmark_onnx(small, threads=args.threads)
                old = []
                for _ in range(args.runs):
                    g = check_baseline(benchmark_onnx(small, threads=args.threads), base, "10%",
                                       raise_on_fail=False)[0]
                    old.append(round(g["ratio"], 3))
        finally:
            for p in busy:  # only the processes this script started
                p.terminate()
            for p in busy:
                p.wait(timeout=10)
    same_passes = sum(r["passed"] for r in runs["same"])
    slower_fails = sum(not r["passed"] for r in runs["slower"])
    need = args.runs - args.runs // 20
    out = {
        "runs": args.runs, "pair": {"slower": big.stem, "faster": small.stem}, "load_processes": args.load,
        "usable_cores": len(os.sched_getaffinity(0)),
        "threads": rep["threads"], "cpu": rep["machine"]["cpu"], "gate": {"rounds": rep["rounds"],
                                                                         "confidence": d["confidence"],
                                                                         "max_ratio": d["max_ratio"]},
        "same_file_passes": same_passes, "slower_model_fails": slower_fails,
        "slower_model_median_slowdown": sorted(r["slowdown"] for r in runs["slower"])[len(runs["slower"]) // 2],
        "gate_seconds_median": sorted(r["seconds"] for r in runs["same"] + runs["slower"])[args.runs],
        "goal": {"same_file_passes_at_least": need, "slower_model_fails_at_least": need,
                 "met": same_passes >= need and slower_fails >= need},
        "old_json_baseline": None if old is None else {
            "same_file_passes": sum(r <= 1.10 for r in old), "ratios": old},
        "seconds": round(time.perf_counter() - started, 1),
        "per_run": runs,
    }
    return emit_report(out, args.json, args.check)


if __name__ == "__main__":
    sys.exit(main())
