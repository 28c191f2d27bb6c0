#!/usr/bin/env python
"""Accuracy study: does DGKD beat CE, KD and TAKD for one teacher -> student pair?

Trains the student (default resnet8) with every method in ``--methods`` and
every seed in ``--seeds`` under identical settings, and reports the mean ± std
of the student's test top-1:

* ``ce``           the student alone (cross-entropy; "NOKD" in the paper);
* ``kd``           Hinton KD from the teacher only;
* ``takd``         the chain teacher -> assistants -> student, each model taught
                   by the one before it;
* ``dgkd``         the same chain, each model taught by all models before it,
                   with stochastic teaching (one guide dropped per batch);
* ``dgkd-nodrop``  DGKD without stochastic teaching (``drop_guides 0``).

Every run goes through the library (``resolve_config`` + ``run_distillation``)
on one in-memory copy of the data, loaded once. A run trains its own
assistants, as ``compress distill`` does; every model of every method gets the
same epochs, batch size, optimiser and schedule. Within one seed all methods
share the train/val split, the student's initialisation and its data order, so
per-seed differences between methods are paired.

Choices never see the test split: ``--val-fraction`` holds out part of the
training images for the per-epoch evaluation ("best val"), the test split is
scored once per trained model at the end and only reported. The reported
student is the one after the last epoch (no checkpoint picking).

Output (resumable: a finished ``OUT/<method>-s<seed>/`` run, i.e. one with a
``summary.json``, is skipped; an interrupted one resumes where it stopped)::

    OUT/<method>-s<seed>/   a normal compress run directory
    OUT/study.json          per run and per method (mean, std, n)
    OUT/study.md            the table, the settings and the exact command
    OUT/study.png           mean ± std bar chart with the per-seed points

Usage::

    python benchmarks/accuracy_study.py --data data/cifar10-jpeg \\
        --teacher compressor/assets/resnet20_cifar10_pretrained.safetensors \\
        --target resnet8 --methods ce,kd,takd,dgkd,dgkd-nodrop --seeds 0,1,2 --out runs/study

Defaults come from ``recipes/cpu_study.yaml``; every flag overrides it.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

DEFAULT_RECIPE = REPO / "recipes" / "cpu_study.yaml"
DEFAULT_TEACHER = REPO / "compressor" / "assets" / "resnet20_cifar10_pretrained.safetensors"

# study name -> (library method, drop_guides or None = the recipe's value)
METHODS = {
    "ce": ("ce", None),
    "kd": ("kd", None),
    "takd": ("takd", None),
    "dgkd": ("dgkd", 1),
    "dgkd-nodrop": ("dgkd", 0),
}
CONFIG_KEYS_IGNORED = ("log_with", "out", "name")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None,
                    help="ImageFolder root with train/ and test/ (e.g. the unpacked cifar10-jpeg/), "
                         "a CIFAR python dir, or 'demo' [default: the recipe's]")
    ap.add_argument("--teacher", default=str(DEFAULT_TEACHER), help="teacher checkpoint [default: %(default)s]")
    ap.add_argument("--target", default=None, help="student model [default: the recipe's, resnet8]")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated, of {', '.join(METHODS)} [default: %(default)s]")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated integers [default: %(default)s]")
    ap.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="base settings [default: %(default)s]")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of every trained model")
    ap.add_argument("--train-subset", type=int, default=None,
                    help="train on N images of the training split (0 = all of it)")
    ap.add_argument("--val-fraction", type=float, default=None,
                    help="share of the training split held out for per-epoch evaluation")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--temperature", type=float, default=None, help="KD temperature T")
    ap.add_argument("--kd-weight", type=float, default=None, help="λ in (1-λ)·CE + λ·Σ KD")
    ap.add_argument("--assistants", default=None, help="auto | N | name,name [default: the recipe's]")
    ap.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"])
    ap.add_argument("--out", default="runs/accuracy-study", help="study folder [default: %(default)s]")
    ap.add_argument("--progress", action="store_true", help="print a line per epoch while training")
    args = ap.parse_args(argv)
    args.methods = _csv(args.methods)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        ap.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if len(set(args.methods)) != len(args.methods):
        ap.error("a method is named twice in --methods")
    try:
        args.seeds = [int(s) for s in _csv(args.seeds)]
    except ValueError:
        ap.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        ap.error("--seeds needs distinct integers, e.g. 0,1,2")
    if args.train_subset is not None and args.train_subset < 0:
        ap.error("--train-subset must be >= 0 (0 = the whole training split)")
    return args


def make_config(args, method: str, seed: int, out: Path):
    """The resolved DistillConfig of one run: recipe < study flags < (method, seed)."""
    from compressor.config import DistillConfig, resolve_config

    lib_method, drop = METHODS[method]
    overrides = {
        "data": args.data, "teacher": args.teacher, "target": args.target, "epochs": args.epochs,
        "train_subset": args.train_subset or None, "val_fraction": args.val_fraction,
        "batch_size": args.batch_size, "lr": args.lr, "temperature": args.temperature,
        "kd_weight": args.kd_weight, "assistants": args.assistants, "mixed_precision": args.mixed_precision,
        "method": lib_method, "drop_guides": drop, "seed": seed, "out": str(out / f"{method}-s{seed}"),
    }
    if args.epochs is not None:
        overrides["assistant_epochs"] = args.epochs  # identical budgets for every trained model
    cfg = resolve_config(DistillConfig, args.recipe, overrides)
    if args.train_subset == 0:  # None on the command line means "not given", so clear it here
        cfg.train_subset = None
        cfg.validate()
    return cfg


def _check_same_config(run_dir: Path, cfg) -> None:
    """A finished run is reused only when it was made with the same settings."""
    import yaml

    from compressor.config import RUN_RECORD_KEYS, config_to_dict
    from compressor.errors import CompressError
    from compressor.models import get_entry

    path = run_dir / "config.yaml"
    if not path.exists():
        return
    old = yaml.safe_load(path.read_text()) or {}
    new = {**config_to_dict(cfg), "target": get_entry(cfg.target).name}
    # What the run recorded beside its settings (the rules' words, the precision `auto` resolved to,
    # per-model defaults, the teacher's sha256): a freshly resolved config has none of them.
    ignored = (*CONFIG_KEYS_IGNORED, *RUN_RECORD_KEYS)
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
             if k not in ignored and old.get(k) != new.get(k)]
    if diffs:
        raise CompressError(f"{run_dir} was made with other settings ({'; '.join(diffs)}); "
                            f"use another --out for a study with new settings")


def run_one(cfg, bundle, method: str, seed: int, command: str, progress: bool) -> dict:
    """Train (or reuse) one (method, seed) run; return its study record."""
    from compressor.pipeline import run_distillation

    run_dir = Path(cfg.out)
    summary_path = run_dir / "summary.json"
    timing_path = run_dir / "study_timing.json"
    if summary_path.exists():
        _check_same_config(run_dir, cfg)
        summary = json.loads(summary_path.read_text())
        print(f"[{method} seed {seed}] finished earlier: {run_dir}")
    else:
        resume = (run_dir / "config.yaml").exists()
        print(f"\n[{method} seed {seed}] {'resuming' if resume else 'starting'} {run_dir}", flush=True)
        t0 = time.perf_counter()
        summary = run_distillation(cfg, resume=resume, command=f"{command}  # run {method}-s{seed}",
                                   show_progress=progress, data=bundle)
        wall = time.perf_counter() - t0
        if not resume:  # a resumed run's wall time covers only part of it
            from compressor.fileio import write_json

            write_json(timing_path, {"wall_seconds": round(wall, 1), "device": _device()})
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    wall = timing.get("wall_seconds")
    chain = summary["chain"]
    student = chain[-1]
    return {
        "method": method, "seed": seed, "library_method": summary["method"],
        "drop_guides": summary["drop_guides"],
        "test_top1": student["final_test_top1"],
        "best_val_top1": student["best_val_top1"],
        "eval_split": summary.get("per_epoch_split"),
        "chain": [m["arch"] for m in chain],
        "assistant_test_top1": [m["final_test_top1"] for m in chain[1:-1]],
        "teacher_test_top1": chain[0]["final_test_top1"],
        "seconds": summary["total_seconds"],  # training time of every stage of the run
        "wall_seconds": wall,
        "relative_cost": summary.get("relative_cost"),
        "run_dir": run_dir.name,
        "device": timing.get("device"),  # where it trained: a reused run may come from another machine
    }


def aggregate(runs: list[dict], methods: list[str]) -> dict:
    out = {}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        acc = [r["test_top1"] for r in rs]
        val = [r["best_val_top1"] for r in rs if r["best_val_top1"] is not None]
        out[m] = {
            "n": len(acc), "mean": statistics.fmean(acc),
            "std": statistics.stdev(acc) if len(acc) > 1 else None,
            "min": min(acc), "max": max(acc),
            "per_seed": {str(r["seed"]): r["test_top1"] for r in rs},
            "best_val_mean": statistics.fmean(val) if val else None,
            "seconds_mean": statistics.fmean(r["seconds"] for r in rs),
            "chain": rs[0]["chain"],
        }
    return out


def paired(runs: list[dict], methods: list[str], reference: str) -> dict:
    """reference − other on the seeds both have (same split, student init and data order)."""
    by = {(r["method"], r["seed"]): r["test_top1"] for r in runs}
    out = {}
    for m in methods:
        if m == reference:
            continue
        seeds = sorted(s for (mm, s) in by if mm == m and (reference, s) in by)
        if not seeds:
            continue
        d = [by[(reference, s)] - by[(m, s)] for s in seeds]
        out[m] = {"n": len(d), "mean": statistics.fmean(d), "std": statistics.stdev(d) if len(d) > 1 else None,
                  "wins": sum(x > 0 for x in d), "per_seed": {str(s): x for s, x in zip(seeds, d)}}
    return out


def _pm(mean, std, digits=2) -> str:
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else " (n=1)")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 60:.1f} min"


def markdown_table(stats: dict) -> str:
    lines = ["| method | student test top-1 % (mean ± std) | per-seed values | chain | train time per run |",
             "|---|---|---|---|---|"]
    for m, s in stats.items():
        seeds = ", ".join(f"s{k}: {v:.2f}" for k, v in s["per_seed"].items())
        lines.append(f"| {m} | {_pm(s['mean'], s['std'])} | {seeds} | {' → '.join(s['chain'])} | "
                     f"{_duration(s['seconds_mean'])} |")
    return "\n".join(lines)


def paired_table(diffs: dict, reference: str) -> str:
    if not diffs:
        return ""
    lines = [f"| {reference} minus | mean ± std (points) | {reference} better on | per seed |", "|---|---|---|---|"]
    for m, d in diffs.items():
        seeds = ", ".join(f"s{k}: {v:+.2f}" for k, v in d["per_seed"].items())
        lines.append(f"| {m} | {_pm(d['mean'], d['std'])} | {d['wins']}/{d['n']} seeds | {seeds} |")
    return "\n".join(lines)


def plot(stats: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compressor.fileio import atomic_write

    names = list(stats)
    means = [stats[m]["mean"] for m in names]
    errs = [stats[m]["std"] or 0.0 for m in names]
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2.5, 4))
    ax.bar(range(len(names)), means, yerr=errs, capsize=6, color="#8fb3d9", edgecolor="#2b5d8a")
    for i, m in enumerate(names):
        vals = list(stats[m]["per_seed"].values())
        ax.scatter([i] * len(vals), vals, color="black", s=14, zorder=3)
    lo = min(min(stats[m]["per_seed"].values()) for m in names)
    hi = max(max(stats[m]["per_seed"].values()) for m in names)
    pad = max(1.0, 0.25 * (hi - lo))
    ax.set_ylim(max(0.0, lo - 2 * pad), min(100.0, hi + pad))
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("student test top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def study_device(runs: list[dict]) -> str:
    """Where the study's runs trained ("; "-joined when several machines), not where this process
    combines them; a run that does not say (trained before runs recorded it) counts as unknown."""
    return "; ".join(sorted({r.get("device") or "unknown (not recorded)" for r in runs}))


def display_path(path: str) -> str:
    """A data path as the study's files show it: relative to the working folder, or just its name
    (the plot title and study.md are published; one machine's absolute path means nothing elsewhere)."""
    p = Path(path)
    if not p.is_absolute():
        return str(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return p.name


def write_outputs(out: Path, args, cfg0, runs: list[dict], command: str, data_name: str, load_s: float) -> dict:
    from compressor.fileio import write_json, write_text

    data_name = display_path(data_name)

    methods = [m for m in args.methods if any(r["method"] == m for r in runs)]
    stats = aggregate(runs, methods)
    reference = "dgkd" if "dgkd" in stats else methods[-1]
    diffs = paired(runs, methods, reference)
    teacher_top1 = runs[0]["teacher_test_top1"] if runs else None
    settings = {k: getattr(cfg0, k) for k in (
        "data", "teacher", "target", "assistants", "epochs", "assistant_epochs", "batch_size", "lr", "schedule",
        "milestones", "momentum", "weight_decay", "augment", "temperature", "kd_weight", "val_fraction",
        "train_subset", "mixed_precision", "channels_last")}
    study = {
        "command": command, "recipe": args.recipe, "data": data_name, "device": study_device(runs),
        "seeds": args.seeds, "methods": args.methods, "settings": settings,
        "teacher_test_top1": teacher_top1, "data_load_seconds": round(load_s, 1),
        "runs": runs, "per_method": stats, "paired_reference": reference, "paired": diffs,
        "complete": len(runs) == len(args.methods) * len(args.seeds),
    }
    write_json(out / "study.json", study)
    table = markdown_table(stats)
    ev = runs[0]["eval_split"] if runs else "val"
    if ev == "val":
        split_note = (f"per-epoch evaluation on {cfg0.val_fraction:g} of the training split held out; "
                      "the test split is scored once at the end and never used for a choice")
    else:
        split_note = "no validation split (val_fraction 0): the per-epoch 'best' figures are on the TEST split"
    lines = [
        "# Accuracy study: " + ", ".join(methods) + f" -> {cfg0.target}", "",
        f"- data: `{data_name}` ({split_note})",
        f"- teacher: `{cfg0.teacher}` (test top-1 {teacher_top1:.2f}%)" if teacher_top1 is not None else
        f"- teacher: `{cfg0.teacher}`",
        f"- student: {cfg0.target}; assistants: {cfg0.assistants} (chain per method in the table)",
        f"- every trained model: {cfg0.epochs} epochs, batch {cfg0.batch_size}, SGD lr {cfg0.lr} "
        f"({cfg0.schedule}), momentum {cfg0.momentum}, weight decay {cfg0.weight_decay}, "
        f"augment {cfg0.augment}, T {cfg0.temperature}, λ {cfg0.kd_weight}, "
        f"train subset {cfg0.train_subset or 'all'}, mixed precision {cfg0.mixed_precision}",
        f"- seeds: {', '.join(map(str, args.seeds))}; device: {study['device']}",
        f"- runs finished: {len(runs)} of {len(args.methods) * len(args.seeds)}", "",
        table, "",
    ]
    if diffs:
        lines += ["Paired differences (same seed = same split, student initialisation and data order):", "",
                  paired_table(diffs, reference), ""]
    lines += ["Train time per run is the sum over the run's trained models (assistants included).", "",
              "![study](study.png)", "", "Command:", "", "```", command, "```", ""]
    write_text(out / "study.md", "\n".join(lines))
    if stats:
        plot(stats, out / "study.png",
             f"{cfg0.target} on {data_name}: mean ± std over seeds {','.join(map(str, args.seeds))}")
    return study


def main(argv=None) -> int:
    args = parse_args(argv)
    from compressor.data import load_data
    from compressor.errors import CompressError

    out = Path(args.out)
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]) if argv is None else \
        " ".join(shlex.quote(a) for a in ["python", "benchmarks/accuracy_study.py", *argv])
    try:
        configs = {(m, s): make_config(args, m, s, out) for s in args.seeds for m in args.methods}
        cfg0 = configs[(args.methods[0], args.seeds[0])]
        t0 = time.perf_counter()
        bundle = load_data(cfg0.data)  # once, shared by every run
        load_s = time.perf_counter() - t0
        print(f"data {cfg0.data}: {len(bundle.train)} train / {len(bundle.test)} test images, "
              f"{bundle.num_classes} classes, loaded in {load_s:.1f} s")
        out.mkdir(parents=True, exist_ok=True)
        runs = []
        for seed in args.seeds:
            for method in args.methods:
                runs.append(run_one(configs[(method, seed)], bundle, method, seed, command, args.progress))
                write_outputs(out, args, cfg0, runs, command, str(cfg0.data), load_s)
    except CompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    study = write_outputs(out, args, cfg0, runs, command, str(cfg0.data), load_s)
    print()
    print(markdown_table(study["per_method"]))
    if study["paired"]:
        print()
        print(paired_table(study["paired"], study["paired_reference"]))
    print(f"\nwrote {out / 'study.json'}, {out / 'study.md'}, {out / 'study.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
