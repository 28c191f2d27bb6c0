"""The DGKD paper's CIFAR-10 chain (ResNet-26 -> 20 -> 14 -> 8, option-B shortcuts), every column of its table.

Trains the teacher with the paper's settings (the commands in the header of
``recipes/cifar10_resnet_26-20-14-8.yaml``), then runs ``compress distill`` with that
recipe for each method (``dgkd``, ``takd``, ``kd``, ``ce`` = NOKD) *in parallel*
processes (they only share the teacher), and prints one JSON object: the accuracy of
every model of every chain, the wall time of each phase and the settings.

The paper trains on all 50,000 training images and reports the test accuracy of
the last epoch, so ``--val-fraction 0`` is passed to every command (the per-epoch
evaluation then runs on test, which does not steer anything).

Usage (a GPU machine; on 2 CPU cores one epoch of the chain takes minutes)::

    python tools/build_datasets.py ...            # or any CIFAR-10 ImageFolder / python-version folder
    python benchmarks/paper_chain.py --data cifar10-jpeg --out paper-run --epochs 160

``--epochs`` shorter than the paper's 160 keeps every other setting (the step
schedule's milestones are fractions of the run); the JSON says how many ran.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "cifar10_resnet_26-20-14-8.yaml"
PAPER = {"ce": 86.02, "kd": 86.66, "takd": 88.01, "dgkd": 89.02}  # paper's Table (student ResNet-8)
MEAN, STD = "0.507,0.487,0.441", "0.267,0.256,0.276"  # the official code's normalisation


def compress_cmd() -> list[str]:
    """The CLI, runnable from a checkout without installation (``PYTHONPATH`` = the repo)."""
    return [sys.executable, "-m", "compressor.cli"]


def teacher_command(data: str, out: Path, epochs: int, extra: list[str]) -> list[str]:
    return compress_cmd() + [
        "train", "--arch", "resnet26", "--option", "shortcut=B", "--data", data,
        "--epochs", str(epochs), "--batch-size", "128", "--lr", "0.1", "--schedule", "step",
        "--milestones", "0.5,0.75", "--gamma", "0.1", "--momentum", "0.9", "--weight-decay", "1e-4",
        "--warmup-epochs", "0", "--label-smoothing", "0", "--grad-clip", "0", "--augment", "cifar",
        "--seed", "20", "--mean", MEAN, "--std", STD, "--val-fraction", "0", "--out", str(out)] + extra


def distill_command(data: str, teacher: Path, out: Path, method: str, epochs: int, extra: list[str]) -> list[str]:
    return compress_cmd() + [
        "distill", "--recipe", str(RECIPE), "--teacher", str(teacher), "--data", data,
        "--method", method, "--epochs", str(epochs), "--val-fraction", "0",
        "--latency-backend", "none", "--out", str(out)] + extra


def run_logged(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "w")
    fh.write(" ".join(cmd) + "\n")
    fh.flush()
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))


def chain_of(summary: dict) -> list[dict]:
    return [{"role": m["role"], "arch": m["arch"], "final_test_top1": m.get("final_test_top1"),
             "guides": m.get("guides"), "train_seconds": m.get("train_seconds")}
            for m in summary.get("chain", [])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="CIFAR-10 ImageFolder root or python-version folder")
    ap.add_argument("--out", required=True, help="output folder (teacher, one run per method, paper_chain.json)")
    ap.add_argument("--epochs", type=int, default=160, help="epochs per model (paper: 160)")
    ap.add_argument("--methods", default="dgkd,takd,kd,ce")
    ap.add_argument("--teacher", default=None, help="an already trained ResNet-26 (option B): skip step 1")
    ap.add_argument("--threads", type=int, default=None, help="OMP threads per process (default: cores / runs)")
    ap.add_argument("--extra", default="", help="more flags for every command, e.g. '--compile'")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    extra = args.extra.split()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    threads = args.threads or max(1, (os.cpu_count() or 2) // max(len(methods), 1))
    env["OMP_NUM_THREADS"] = str(threads)
    report = {"schema": "compress.paper_chain/1", "recipe": RECIPE.relative_to(REPO).as_posix(),
              "epochs": args.epochs, "paper_epochs": 160, "methods": methods, "paper_student_top1": PAPER,
              "phases": {}}

    teacher = Path(args.teacher) if args.teacher else out / "teacher_resnet26.safetensors"
    if not args.teacher:
        t0 = time.perf_counter()
        proc = run_logged(teacher_command(args.data, teacher, args.epochs, extra), out / "teacher.log", env)
        if proc.wait() != 0:
            print(f"teacher training failed: see {out / 'teacher.log'}", file=sys.stderr)
            return 1
        report["phases"]["teacher_seconds"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    procs = {m: run_logged(distill_command(args.data, teacher, out / m, m, args.epochs, extra),
                           out / f"{m}.log", env) for m in methods}
    codes = {m: p.wait() for m, p in procs.items()}
    report["phases"]["distill_parallel_seconds"] = round(time.perf_counter() - t0, 1)
    report["exit_codes"] = codes
    results = {}
    for m in methods:
        path = out / m / "summary.json"
        if path.exists():
            summary = json.loads(path.read_text())
            chain = chain_of(summary)
            results[m] = {"student_top1": chain[-1]["final_test_top1"] if chain else None,
                          "teacher_top1": chain[0]["final_test_top1"] if chain else None,
                          "chain": chain, "total_seconds": summary.get("total_seconds"),
                          "precision": summary.get("precision")}
    report["results"] = results
    text = json.dumps(report, indent=2)
    (out / "paper_chain.json").write_text(text + "\n")
    print(text)
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
