#!/usr/bin/env python
"""Defaults matrix: does the DEFAULT ``dgkd`` (and ``kd``) beat the student alone everywhere?

Runs ``compress distill --method ce|kd|dgkd`` with every setting at its default except the
data, the chain, the epochs, the train subset and the seed, over

* data sets (built by ``tools/build_datasets.py`` under ``--data-root``): ``cifar10`` (32 px),
  ``gray28`` (28 px grayscale), ``photo96`` (96 px), ``small`` (<= 100 images per class);
* chains (``--assistants auto``, the default, picks the assistants): ``resnet`` (resnet20 ->
  resnet8), ``resnet-mbv2`` (resnet20 -> mobilenetv2_035), ``mbv2`` (mobilenetv2_100 ->
  mobilenetv2_035, a MobileNet ladder); their gaps (3.3x, 2.6x, 5.6x MACs) are under the default
  ``--spacing`` (6x), so the default dgkd plans no assistant and trains as kd: the matrix then records
  the kd run for dgkd instead of training it again (``--run-identical`` trains it; a ``--methods dgkd``
  call copies kd's record of an earlier call, and trains dgkd only when kd was never recorded); ``--extra-args
  "--spacing 2.5"`` measures the chains with one;
* budgets: ``short`` (``--short-epochs``, 3, per stage) everywhere; ``cpu`` (epochs and train
  subset of recipes/cpu_study.yaml) on cifar10 and photo96;
* plus two extra cells: ``cifar10-labels10.resnet.*.labels10`` (10 % labels; ``kd+unl`` and
  ``dgkd+unl`` add the other 90 % as ``--unlabeled``; skipped with a note while the CLI has no
  ``--unlabeled``) and ``gray28.resnet.short.pretrained`` (every method's student starts from a
  resnet8 pretrained here on cifar10, ``--init-student``; compared with the scratch cell).

Teachers: the embedded pretrained ResNet-20 for the CIFAR-10 sets; the others are trained once
with ``compress train`` (``--teacher-epochs``) and cached in ``OUT/teachers/``. The ``small`` set
uses the ``cifar10`` teachers (a teacher from plentiful data, as in practice).

Seeds are paired: within one seed every method shares the split, the student's initialisation and
the data order, so ``dgkd - ce`` per seed is a paired difference.

Output (resumable: a run whose JSON exists is skipped, an interrupted run resumes)::

    OUT/cells/<cell>/<method>-s<seed>.json  one per run: config, seed, accuracy of every model, times
    OUT/runs/<cell>/<method>-s<seed>/       the compress run directory
    OUT/logs/...                            each subprocess's output
    OUT/summary.json, OUT/matrix.md         the table and the "Done when" checks (issue 18)
    OUT/matrix.png                          paired gains per cell (if matplotlib is installed)

Usage::

    python tools/build_datasets.py --cifar-tar ../shared/data/cifar10-jpeg.tar.gz --out data/matrix
    python benchmarks/defaults_matrix.py --data-root data/matrix --out runs/matrix --jobs 12
    python benchmarks/defaults_matrix.py --data-root data/matrix-quick --out runs/matrix-quick --quick

``--quick``: one seed, the short budget only, 15-epoch teachers, 7 of the 14 short cells
(``QUICK_CELLS``: every data set and chain, the two extra cells; ``--only`` picks from all 14);
build the data with ``--quick`` too. 18 min on 2 cores with ``--jobs 2`` once its teachers are
cached in ``OUT/teachers/`` (2026-11-30; the first run also trains 4 models, the two slowest 43 and
45 min of one core each on a loaded machine). ``--list`` prints the runs without running them;
``--table-only`` rebuilds the table from the JSON files; ``--combine SOURCE ...`` writes OUT's table,
checks and plot from matrix summaries and folders of run records made in several sessions (each cell whole
from the last source that has it: docs/results.md's table of the whole matrix). ``--methods dgkd`` runs only those methods
(start the longest runs first on a machine with few cores; a later call without it runs the rest). Works without installing the package (it
runs ``python -m compressor.cli`` with this checkout on ``PYTHONPATH``).

Threads: each of the ``--jobs`` processes gets ``cores / jobs`` CPU threads; the teachers (and the
pretrained model) are trained first, and when fewer of them than ``--jobs`` are to train they share
every core (one teacher on a 2-job matrix gets both). An interrupted run or teacher resumes where its
saved state is: Ctrl-C or SIGTERM saves after the running step.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

PRETRAINED_TEACHER = REPO / "compressor" / "assets" / "resnet20_cifar10_pretrained.safetensors"
CPU_RECIPE = REPO / "recipes" / "cpu_study.yaml"

DATASETS = ("cifar10", "gray28", "photo96", "small")
# chain -> (teacher arch, student arch); assistants: the default (auto)
CHAINS = {
    "resnet": ("resnet20", "resnet8"),
    "resnet-mbv2": ("resnet20", "mobilenetv2_035"),
    "mbv2": ("mobilenetv2_100", "mobilenetv2_035"),
}
CPU_BUDGET_DATASETS = ("cifar10", "photo96")
# the data set a teacher is trained on (small: the cifar10 teachers; labels10: the pretrained one)
TEACHER_DATA = {"small": "cifar10", "cifar10-labels10": "cifar10"}
LABELS10 = "cifar10-labels10"
PRETRAINED_CELL = ("gray28", "resnet")   # data set, chain of the pretrained-student cell
PRETRAIN_DATA = "cifar10"                # what that student is pretrained on (another domain: no leak)
BASE_METHODS = ("ce", "kd", "dgkd")
UNL_METHODS = ("kd+unl", "dgkd+unl")
DONE_MIN_CELL_GAIN = -0.5    # issue 18 "Done when": every cell dgkd - ce >= -0.5 points
DONE_MEAN_GAIN = 1.5         # mean over the cells >= +1.5
DONE_CHANCE_MARGIN = 2.0     # no student within 2 points of chance
DONE_UNLABELED_GAIN = 2.0    # unlabeled images at 10 % labels add >= +2 points
# Quick teachers train 15 epochs: with several passes per epoch on the small sets the students alone
# (3 epochs) came within 1-4 points of 5-epoch teachers (CIFAR-10 MobileNetV2-1.0 34.2 % vs its student
# alone 33.4 %), a teacher no user distills from; at 15 epochs it scores 49.4 %, the digits' 95.4-95.6 %.
QUICK_TEACHER_EPOCHS, FULL_TEACHER_EPOCHS = 15, 30
# --quick runs these 7 of the 14 short cells (--only picks from all 14 instead): every data set and every
# chain at least once, each chain on its cheapest data set, and the two extra cells (the pretrained cell
# with its scratch cell). All 14 took ~100 min a seed on 2 cores (2026-11-30: every run trains >= 2,048
# images an epoch, small sets also on mixes; the MobileNet cells cost 5-10x a ResNet cell), over issue
# 18's 30 min; these 7 took 18 min on 2 jobs once the teachers exist (docs/results.md §6, session 10).
QUICK_CELLS = ("cifar10.resnet.short", "gray28.resnet.short", "gray28.resnet-mbv2.short", "small.mbv2.short",
               "photo96.resnet.short", "cifar10-labels10.resnet.short.labels10", "gray28.resnet.short.pretrained")


# ----------------------------------------------------------------------------- the runs
@dataclass(frozen=True)
class Cell:
    dataset: str
    chain: str
    budget: str
    variant: str = ""          # "" | labels10 | pretrained

    @property
    def id(self) -> str:
        return ".".join([self.dataset, self.chain, self.budget] + ([self.variant] if self.variant else []))

    @property
    def methods(self) -> tuple:
        return BASE_METHODS + (UNL_METHODS if self.variant == "labels10" else ())


@dataclass(frozen=True)
class Run:
    cell: Cell
    method: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.cell.id}/{self.method}-s{self.seed}"


@dataclass(frozen=True)
class Prereq:
    """A model trained once and cached: a teacher, or the pretrained student."""
    kind: str       # teacher | pretrained
    dataset: str
    arch: str
    epochs: int

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.dataset}-{self.arch}-e{self.epochs}"

    def path(self, out: Path) -> Path:
        folder = "teachers" if self.kind == "teacher" else "pretrained"
        return out / folder / f"{self.dataset}-{self.arch}-e{self.epochs}.safetensors"


class StaleCacheError(Exception):
    """A cached teacher or pretrained model was trained under other defaults (:func:`stale_prereq`)."""


@dataclass
class Budget:
    name: str
    epochs: int
    train_subset: int | None


def cpu_budget() -> Budget:
    """The CPU study's budget (epochs and train subset of recipes/cpu_study.yaml), not its settings."""
    import yaml

    recipe = yaml.safe_load(CPU_RECIPE.read_text())
    return Budget("cpu", int(recipe["epochs"]), recipe.get("train_subset"))


def enumerate_cells(budgets: list[str], datasets=DATASETS, chains=tuple(CHAINS)) -> list[Cell]:
    """Every matrix cell, in a stable order: data set x chain x budget, then the two extra cells."""
    cells = []
    for budget in budgets:
        for d in datasets:
            if budget == "cpu" and d not in CPU_BUDGET_DATASETS:
                continue
            cells += [Cell(d, c, budget) for c in chains]
        if "cifar10" in datasets and "resnet" in chains:
            cells.append(Cell(LABELS10, "resnet", budget, "labels10"))
        if budget == "short" and PRETRAINED_CELL[0] in datasets and PRETRAINED_CELL[1] in chains:
            cells.append(Cell(*PRETRAINED_CELL, budget, "pretrained"))
    return cells


def enumerate_runs(cells: list[Cell], seeds: list[int]) -> list[Run]:
    """Seed-major: every cell's seed 0 comes before any seed 1 (a partial matrix stays paired)."""
    return [Run(c, m, s) for s in seeds for c in cells for m in c.methods]


def teacher_for(cell: Cell, teacher_epochs: int) -> Prereq | None:
    """None: the embedded pretrained ResNet-20 (CIFAR-10 sets, resnet teacher)."""
    arch = CHAINS[cell.chain][0]
    data = TEACHER_DATA.get(cell.dataset, cell.dataset)
    if data == "cifar10" and arch == "resnet20":
        return None
    return Prereq("teacher", data, arch, teacher_epochs)


def pretrained_for(cell: Cell, teacher_epochs: int) -> Prereq | None:
    if cell.variant != "pretrained":
        return None
    return Prereq("pretrained", PRETRAIN_DATA, CHAINS[cell.chain][1], teacher_epochs)


# ----------------------------------------------------------------------------- commands
def cli_base() -> list[str]:
    return [sys.executable, "-m", "compressor.cli"]


def stale_prereq(p: Prereq, out: Path, extra: list[str]) -> str | None:
    """Why the cached ``p`` was trained under other defaults than ``compress train`` uses now, or None.

    A teacher cached before 2026-12-02 was trained with its family's label smoothing (0.1 for the
    MobileNets); ``compress train`` now trains teachers without it, and a smoothed teacher teaches
    1-2.7 points less (docs/results.md §6). Reusing it would mix two teachers in one table, so the
    matrix stops and names the files to delete. ``--extra-args "--label-smoothing X"`` sets it for
    every command, so then the recorded value must be X. The same for how it started
    (:func:`stale_start`)."""
    path = p.path(out)
    if not path.is_file():
        return None
    from compressor.checkpoint import read_checkpoint
    from compressor.errors import CompressError
    from compressor.training_defaults import TEACHER_LABEL_SMOOTHING, recorded_label_smoothing

    try:
        metrics = read_checkpoint(path)[1].metrics
    except CompressError as exc:  # a damaged cache is stale: the reader says what is wrong with it
        return f"{path} is not a readable checkpoint ({exc})"
    recorded = recorded_label_smoothing(metrics)
    flag = extra.index("--label-smoothing") if "--label-smoothing" in extra else None
    wanted = float(extra[flag + 1]) if flag is not None and flag + 1 < len(extra) else TEACHER_LABEL_SMOOTHING
    if recorded != wanted:
        return f"{path} was trained with label smoothing {recorded:g}, compress train now uses {wanted:g}"
    return stale_start(p.arch, path, metrics, extra)


def stale_start(arch: str, path: Path, metrics: dict, extra: list[str]) -> str | None:
    """Why a cached ``arch`` started from other weights than ``compress train`` starts it from now.

    Since 2026-12-02 the MobileNets and EfficientNet start with zero-initialised residual branches
    (builder option ``zero_init_last``, default true; their students alone gain 1-8 points in short
    runs, docs/results.md §6). A checkpoint records the options it was built with
    (``metrics.model_options``); one that records none predates that record, and so the change."""
    from compressor.cli import _parse_options
    from compressor.models import get_entry
    from compressor.models.torchvision_families import ZERO_INIT_FAMILIES

    if get_entry(arch).family not in ZERO_INIT_FAMILIES:  # the family has no such option: nothing to compare
        return None
    # --extra-args "--option zero_init_last=false" sets it for every command, as the CLI parses it
    given = _parse_options([pair for word, pair in zip(extra, extra[1:]) if word == "--option"])
    wanted = True if given.get("zero_init_last") is None else bool(given["zero_init_last"])  # none: the default
    options = metrics.get("model_options")
    if not isinstance(options, dict) or "zero_init_last" not in options:
        return (f"{path} records no zero_init_last (trained before 2026-12-02, with torchvision's "
                f"initialisation), compress train now uses zero_init_last={wanted}")
    if bool(options["zero_init_last"]) != wanted:
        return f"{path} was trained with zero_init_last={options['zero_init_last']}, compress train now uses {wanted}"
    return None


def prereq_command(p: Prereq, data_root: Path, out: Path, extra: list[str], train_subset: int | None) -> list[str]:
    path = p.path(out)
    cmd = cli_base() + ["train", "--arch", p.arch, "--data", str(data_root / p.dataset), "--out", str(path),
                        "--epochs", str(p.epochs), "--seed", "0"]
    if train_subset:
        cmd += ["--train-subset", str(train_subset)]
    if Path(str(path) + ".train-state").is_dir():
        cmd.append("--resume")
    return cmd + extra


def run_dir(out: Path, run: Run) -> Path:
    return out / "runs" / run.cell.id / f"{run.method}-s{run.seed}"


def record_path(out: Path, run: Run) -> Path:
    return out / "cells" / run.cell.id / f"{run.method}-s{run.seed}.json"


def run_command(run: Run, *, data_root: Path, out: Path, budget: Budget, teacher: Path, init: Path | None,
                extra: list[str]) -> list[str]:
    cell = run.cell
    method, _, unl = run.method.partition("+")
    student = CHAINS[cell.chain][1]
    rd = run_dir(out, run)
    cmd = cli_base() + ["distill", "--teacher", str(teacher), "--target", student, "--method", method,
                        "--data", str(data_root / cell.dataset), "--out", str(rd), "--seed", str(run.seed),
                        "--epochs", str(budget.epochs), "--latency-backend", "none", "--test-every-epoch"]
    if budget.train_subset:
        cmd += ["--train-subset", str(budget.train_subset)]
    if unl:
        cmd += ["--unlabeled", str(data_root / f"{cell.dataset}-unlabeled")]
    if init is not None:
        cmd += ["--init-student", str(init)]
    if (rd / "config.yaml").exists() and not (rd / "summary.json").exists():
        cmd.append("--resume")
    return cmd + extra


_UNLABELED_SUPPORT: dict = {}


def cli_has_unlabeled() -> bool:
    """Whether this checkout's ``compress distill`` takes ``--unlabeled`` (asked once)."""
    if "ok" not in _UNLABELED_SUPPORT:
        try:
            res = subprocess.run(cli_base() + ["distill", "--help"], capture_output=True, text=True,
                                 env=child_env(None, 1), cwd=REPO, timeout=300)
            _UNLABELED_SUPPORT["ok"] = "--unlabeled" in res.stdout
        except (OSError, subprocess.SubprocessError):
            _UNLABELED_SUPPORT["ok"] = False
    return _UNLABELED_SUPPORT["ok"]


# flags of --extra-args that change the plan in ways planned_assistants() does not follow: the runs then run
_PLAN_FLAGS_NOT_FOLLOWED = ("--recipe", "--option", "--target-latency", "--assistant-epochs")


def planned_assistants(teacher: Path, student: str, extra: list[str]) -> int | None:
    """How many assistants ``compress distill --method dgkd`` plans for ``teacher -> student`` with the
    ``--extra-args`` given (``--assistants``, ``--spacing``, ``--by``, ``--max-assistants`` followed);
    None where this cannot be told without running (a recipe, model options, latency planning)."""
    from compressor.config import DistillConfig

    if any(a.split("=", 1)[0] in _PLAN_FLAGS_NOT_FOLLOWED for a in extra):
        return None
    d = DistillConfig()
    ap = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    ap.add_argument("--assistants", default=d.assistants)
    ap.add_argument("--spacing", type=float, default=d.spacing)
    ap.add_argument("--by", default=d.by)
    ap.add_argument("--max-assistants", type=int, default=d.max_assistants)
    try:
        ns, _ = ap.parse_known_args(extra)
    except SystemExit:
        return None
    if ns.by == "latency":
        return None
    try:
        from compressor.checkpoint import read_checkpoint
        from compressor.planning import plan_chain

        _, meta = read_checkpoint(str(teacher))
        plan = plan_chain(meta.arch, meta.num_classes, student, teacher_kwargs=meta.model_kwargs,
                          assistants=ns.assistants, by=ns.by, max_assistants=ns.max_assistants, spacing=ns.spacing,
                          method="dgkd", latency_backend="none", measure_latency=False, input_size=meta.input_size)
    except Exception:  # noqa: BLE001 - whatever the planner refuses, the run itself reports
        return None
    return len(plan.assistants)


def kd_twin(run: Run) -> Run:
    """The kd run that a dgkd run equals when its plan has no assistant (kd+unl for dgkd+unl)."""
    return Run(run.cell, "kd" + run.method[len("dgkd"):], run.seed)


def derived_record(run: Run, kd_record: dict) -> dict:
    """dgkd's record copied from its kd twin: with no assistant the teacher is DGKD's only guide, which is
    KD -- the same command but for ``--method``, and the same student to the digit (69 of 69 pairs, 3 seeds of
    the quick mode, docs/results.md §6)."""
    return {**kd_record, "id": run.id, "method": run.method, "derived_from": kd_record["id"],
            "wall_seconds": None, "train_seconds": None, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "notes": kd_record.get("notes", []) + [f"no assistant planned: dgkd trains as kd; {kd_record['id']}'s "
                                                   "run recorded, not run again (--run-identical runs it)"]}


def child_env(gpu: str | None, threads: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


# ----------------------------------------------------------------------------- records
def chance(num_classes: int) -> float:
    return 100.0 / num_classes


def _first_epoch_top1(rd: Path, stage_dir: str | None) -> tuple[float | None, str | None]:
    """The student's top-1 after its first epoch and the split it was scored on: the test split
    (``--test-every-epoch``; hundreds of images) where the run has it, else the validation split
    (runs from before, where a 50-image split made the check +-7 points)."""
    if not stage_dir:
        return None, None
    path = rd / stage_dir / "metrics.jsonl"
    if not path.is_file():
        return None, None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        for split in ("test", "val"):
            if row.get(f"{split}_top1") is not None:
                return float(row[f"{split}_top1"]), split
    return None, None


def make_record(run: Run, summary: dict, *, command: list[str], budget: Budget, wall: float | None,
                num_classes: int, notes: list[str]) -> dict:
    """One run's JSON: what ran, and the test top-1 of every model of its chain."""
    chain = summary["chain"]
    student = chain[-1]
    top1 = student.get("final_test_top1")
    first, first_split = _first_epoch_top1(Path(command[command.index("--out") + 1]), student.get("stage_dir"))
    return {
        "id": run.id, "cell": run.cell.id, **asdict(run.cell), "method": run.method, "seed": run.seed,
        "status": "done",
        "config": {"teacher": summary.get("teacher"), "student": student["arch"], "epochs": budget.epochs,
                   "train_subset": budget.train_subset, "library_method": summary.get("method"),
                   "kd_weight": summary.get("kd_weight"), "temperature": summary.get("temperature"),
                   "kd_reduction": summary.get("kd_reduction"), "precision": summary.get("precision")},
        "command": " ".join(shlex.quote(c) for c in command),
        "num_classes": num_classes, "chance_top1": round(chance(num_classes), 3),
        "teacher_top1": chain[0].get("final_test_top1"),
        "student_top1": top1,
        "student_epoch1_top1": first, "epoch1_split": first_split,
        "models": [{"role": m.get("role"), "arch": m.get("arch"), "test_top1": m.get("final_test_top1"),
                    "train_seconds": m.get("train_seconds")} for m in chain],
        "dropped_assistants": summary.get("dropped_assistants", []),
        "teacher_dropped": summary.get("teacher_dropped"),  # the gate record when an assistant surpassed it
        "near_chance": top1 is not None and top1 <= chance(num_classes) + DONE_CHANCE_MARGIN,
        "warnings": summary.get("warnings", []),
        "train_seconds": summary.get("total_seconds"), "wall_seconds": None if wall is None else round(wall, 1),
        "notes": notes, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def num_classes_of(folder: Path) -> int:
    train = folder / "train"
    n = len([p for p in train.iterdir() if p.is_dir() and not p.name.startswith(".")]) if train.is_dir() else 0
    return n or 10


def read_records(folder: Path, pattern: str) -> list[dict]:
    """The run records (JSON objects with ``cell`` and ``status``) among ``folder.glob(pattern)``;
    unreadable files and other JSON are passed over."""
    recs = []
    for p in sorted(folder.glob(pattern)):
        try:
            rec = json.loads(p.read_text())
        except ValueError:
            continue
        if isinstance(rec, dict) and "cell" in rec and "status" in rec:
            recs.append(rec)
    return recs


def load_records(out: Path) -> list[dict]:
    return read_records(out / "cells", "*/*.json")


# ----------------------------------------------------------------------------- the table
def _mean(xs):
    return statistics.fmean(xs) if xs else None


def _std(xs):
    return statistics.stdev(xs) if len(xs) > 1 else None


def paired_gain(by_seed: dict, a: str, b: str) -> dict | None:
    """Paired a - b over the seeds both have: {n, mean, std, per_seed}."""
    seeds = sorted(s for s in by_seed.get(a, {}) if s in by_seed.get(b, {}))
    if not seeds:
        return None
    d = [by_seed[a][s] - by_seed[b][s] for s in seeds]
    return {"n": len(d), "mean": statistics.fmean(d), "std": _std(d), "per_seed": dict(zip(map(str, seeds), d))}


def cell_sort_key(cell_id: str) -> tuple:
    """The order of :func:`enumerate_cells`: budget, then data set, chain, variant (unknown ids last)."""
    parts = cell_id.split(".")
    order = {"budget": ("short", "cpu"), "dataset": DATASETS + (LABELS10,), "chain": tuple(CHAINS)}
    if len(parts) < 3:
        return (9, cell_id)
    data, chain, budget = parts[:3]

    def rank(kind, value):
        return order[kind].index(value) if value in order[kind] else len(order[kind])

    return (rank("budget", budget), rank("dataset", data), rank("chain", chain), len(parts), cell_id)


def headline_methods(cell_id: str) -> tuple[str, str]:
    """(kd, dgkd) of a cell for the checks: with 10 % labels, the ones that use the unlabeled images."""
    return ("kd+unl", "dgkd+unl") if cell_id.endswith(".labels10") else ("kd", "dgkd")


def aggregate(records: list[dict]) -> dict:
    """Per cell: per-method mean, paired gains over ce, teacher, times; plus the extra comparisons."""
    cells: dict = {}
    for r in records:
        if r.get("status") != "done" or r.get("student_top1") is None:
            continue
        c = cells.setdefault(r["cell"], {"by_seed": {}, "teacher": [], "wall": [], "min_student": None,
                                         "epoch1": [], "chance": r["chance_top1"], "records": 0})
        c["by_seed"].setdefault(r["method"], {})[r["seed"]] = r["student_top1"]
        if r.get("teacher_top1") is not None:
            c["teacher"].append(r["teacher_top1"])
        if r.get("wall_seconds") is not None:
            c["wall"].append(r["wall_seconds"])
        if r.get("student_epoch1_top1") is not None:
            c["epoch1"].append(r["student_epoch1_top1"])
        c["min_student"] = r["student_top1"] if c["min_student"] is None else min(c["min_student"], r["student_top1"])
        c["records"] += 1
    out = {}
    for cid, c in sorted(cells.items(), key=lambda kv: cell_sort_key(kv[0])):
        kd, dgkd = headline_methods(cid)
        row = {
            "cell": cid, "chance_top1": c["chance"], "runs": c["records"],
            "seeds": sorted({s for m in c["by_seed"].values() for s in m}),
            "teacher_top1": _mean(c["teacher"]),
            "mean_top1": {m: _mean(list(v.values())) for m, v in c["by_seed"].items()},
            "kd_minus_ce": paired_gain(c["by_seed"], kd, "ce"),
            "dgkd_minus_ce": paired_gain(c["by_seed"], dgkd, "ce"),
            "min_student_top1": c["min_student"],
            "min_epoch1_top1": min(c["epoch1"]) if c["epoch1"] else None,
            "wall_seconds_per_run": _mean(c["wall"]),
            "per_seed": {m: {str(s): v for s, v in sorted(d.items())} for m, d in c["by_seed"].items()},
        }
        if cid.endswith(".labels10"):
            row["unlabeled_gain"] = paired_gain(c["by_seed"], "dgkd+unl", "dgkd")
        out[cid] = row
    for cid, row in out.items():  # the pretrained student against the same cell from scratch
        if cid.endswith(".pretrained"):
            scratch = out.get(cid[: -len(".pretrained")])
            if scratch:
                row["init_gain"] = {m: _cross_gain(row, scratch, m) for m in BASE_METHODS}
    return out


def _cross_gain(row: dict, other: dict, method: str) -> dict | None:
    a, b = row["per_seed"].get(method, {}), other["per_seed"].get(method, {})
    seeds = sorted(s for s in a if s in b)
    if not seeds:
        return None
    d = [a[s] - b[s] for s in seeds]
    return {"n": len(d), "mean": statistics.fmean(d), "std": _std(d)}


def checks(cells: dict) -> dict:
    """The issue-18 "Done when" checks on the finished cells (None: nothing to judge yet)."""
    gains = {cid: r["dgkd_minus_ce"]["mean"] for cid, r in cells.items() if r["dgkd_minus_ce"]}
    failing = sorted(cid for cid, g in gains.items() if g < DONE_MIN_CELL_GAIN)
    near = sorted(cid for cid, r in cells.items()
                  if r["min_student_top1"] is not None and r["min_student_top1"] <= r["chance_top1"] + DONE_CHANCE_MARGIN)
    near1 = sorted(cid for cid, r in cells.items()
                   if r["min_epoch1_top1"] is not None and r["min_epoch1_top1"] <= r["chance_top1"] + DONE_CHANCE_MARGIN)
    unl = {cid: r["unlabeled_gain"]["mean"] for cid, r in cells.items() if r.get("unlabeled_gain")}
    mean_gain = _mean(list(gains.values()))
    return {
        "every_cell_dgkd_ge_ce_minus_0.5": {"pass": not failing if gains else None, "failing": failing},
        "mean_gain_ge_1.5": {"pass": None if mean_gain is None else mean_gain >= DONE_MEAN_GAIN,
                             "mean": mean_gain, "cells": len(gains)},
        "no_student_near_chance_final": {"pass": not near if cells else None, "cells": near},
        "no_student_near_chance_epoch1": {"pass": not near1 if any(r["min_epoch1_top1"] is not None
                                                                   for r in cells.values()) else None,
                                          "cells": near1},
        "unlabeled_gain_ge_2": {"pass": None if not unl else all(v >= DONE_UNLABELED_GAIN for v in unl.values()),
                                "gains": unl},
    }


def _f(v, digits=2, sign=False) -> str:
    if v is None:
        return "–"
    v = 0.0 if v == 0 else v  # never "-0.00"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _gain(g) -> str:
    if not g:
        return "–"
    return _f(g["mean"], sign=True) + (f" ± {g['std']:.2f}" if g.get("std") is not None else "")


def _verdict(p) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[p]


def markdown_table(cells: dict, chk: dict) -> str:
    lines = ["| cell | seeds | teacher | ce | kd | dgkd | kd − ce | dgkd − ce | min student (chance) | s/run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for cid, r in cells.items():
        kd, dgkd = headline_methods(cid)
        m = r["mean_top1"]
        lines.append(f"| {cid} | {len(r['seeds'])} | {_f(r['teacher_top1'])} | {_f(m.get('ce'))} | "
                     f"{_f(m.get(kd))} | {_f(m.get(dgkd))} | {_gain(r['kd_minus_ce'])} | "
                     f"{_gain(r['dgkd_minus_ce'])} | {_f(r['min_student_top1'])} ({r['chance_top1']:g}) | "
                     f"{_f(r['wall_seconds_per_run'], 0)} |")
    lines.append("")
    extra = []
    for cid, r in cells.items():
        if r.get("unlabeled_gain"):
            extra.append(f"- {cid}: unlabeled images add {_gain(r['unlabeled_gain'])} points to dgkd "
                         f"(dgkd+unl − dgkd; kd/dgkd columns are the +unl runs; plain dgkd "
                         f"{_f(r['mean_top1'].get('dgkd'))}, kd {_f(r['mean_top1'].get('kd'))})")
        if r.get("init_gain"):
            parts = ", ".join(f"{m} {_gain(g)}" for m, g in r["init_gain"].items() if g)
            extra.append(f"- {cid}: pretrained student minus the same from scratch: {parts or '–'}")
    if extra:
        lines += extra + [""]
    c = chk
    lines += [
        "Done-when checks (issue 18):",
        f"- every cell dgkd − ce ≥ {DONE_MIN_CELL_GAIN}: {_verdict(c['every_cell_dgkd_ge_ce_minus_0.5']['pass'])}"
        + (f" (failing: {', '.join(c['every_cell_dgkd_ge_ce_minus_0.5']['failing'])})"
           if c["every_cell_dgkd_ge_ce_minus_0.5"]["failing"] else ""),
        f"- mean gain ≥ +{DONE_MEAN_GAIN}: {_verdict(c['mean_gain_ge_1.5']['pass'])} "
        f"(mean {_f(c['mean_gain_ge_1.5']['mean'], sign=True)} over {c['mean_gain_ge_1.5']['cells']} cells)",
        f"- no student within {DONE_CHANCE_MARGIN:g} points of chance (final): "
        f"{_verdict(c['no_student_near_chance_final']['pass'])}"
        + (f" ({', '.join(c['no_student_near_chance_final']['cells'])})" if c["no_student_near_chance_final"]["cells"] else ""),
        f"- … after epoch 1 (test split; val in runs from before --test-every-epoch): "
        f"{_verdict(c['no_student_near_chance_epoch1']['pass'])}"
        + (f" ({', '.join(c['no_student_near_chance_epoch1']['cells'])})" if c["no_student_near_chance_epoch1"]["cells"] else ""),
        f"- unlabeled images at 10 % labels add ≥ +{DONE_UNLABELED_GAIN:g}: {_verdict(c['unlabeled_gain_ge_2']['pass'])}",
    ]
    return "\n".join(lines)


def plot(cells: dict, path: Path) -> str | None:
    """Paired gains per cell; returns a note instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    from compressor.fileio import atomic_write

    rows = [(cid, r) for cid, r in cells.items() if r["dgkd_minus_ce"] or r["kd_minus_ce"]]
    if not rows:
        return "no finished cell to plot"
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    y = list(range(len(rows)))
    for off, key, color, label in ((-0.18, "kd_minus_ce", "#9ecae1", "kd − ce"),
                                   (0.18, "dgkd_minus_ce", "#2b5d8a", "dgkd − ce")):
        vals = [(r[key] or {}).get("mean", 0.0) for _, r in rows]
        errs = [(r[key] or {}).get("std") or 0.0 for _, r in rows]
        ax.barh([i + off for i in y], vals, height=0.34, xerr=errs, color=color, label=label, capsize=2)
    ax.axvline(0, color="black", lw=0.8)
    ax.axvline(DONE_MIN_CELL_GAIN, color="red", lw=0.8, ls="--", label=f"{DONE_MIN_CELL_GAIN} floor")
    ax.set_yticks(y, [cid for cid, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("student test top-1 gain over the student alone (points, paired mean over seeds)")
    ax.legend(fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return None


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, {os.cpu_count()} cores"
    except ImportError:
        pass
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu: {name}, {os.cpu_count()} cores"


def cells_of_source(path: Path) -> dict:
    """The cell rows of one ``--combine`` source: a folder of run records (``*.json`` with ``cell`` and
    ``status``, searched below it: ``OUT/cells`` of another matrix, ``docs/study/matrix_runs/CELL/``),
    aggregated; or a JSON file holding a matrix summary's ``cells`` (at its top or under ``summary``)."""
    from compressor.errors import CompressError

    if path.is_dir():
        records = read_records(path, "**/*.json")
        if not records:
            raise CompressError(f"--combine {path}: no run records in it (*.json with 'cell' and 'status'); "
                                f"give OUT/cells of a matrix or a folder of its records")
        return aggregate(records)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CompressError(f"--combine {path}: not a readable JSON file ({exc}); give a summary.json or a "
                            f"folder of run records") from None
    cells = data.get("cells") if isinstance(data, dict) else None
    if cells is None and isinstance(data, dict) and isinstance(data.get("summary"), dict):
        cells = data["summary"].get("cells")
    if not isinstance(cells, dict) or not cells:
        raise CompressError(f"--combine {path}: no 'cells' in it (a defaults_matrix summary.json has them); "
                            f"give a summary.json or a folder of run records")
    return cells


def combine_sources(paths: list[Path]) -> tuple[dict, dict]:
    """``(cells, origin)``: every cell of ``paths`` (:func:`cells_of_source`), each taken whole from the
    *last* source that has it (runs of one cell from two sources are never mixed: a later source is a
    re-measurement under later defaults); ``origin`` maps a cell to its source."""
    cells, origin = {}, {}
    for path in paths:
        for cid, row in cells_of_source(path).items():
            cells[cid], origin[cid] = row, str(path)
    order = sorted(cells, key=cell_sort_key)
    return {cid: cells[cid] for cid in order}, {cid: origin[cid] for cid in order}


def write_outputs(out: Path, *, settings: dict, skipped: list[str], failed: list[str],
                  cells: dict | None = None) -> tuple[dict, str]:
    """``OUT/summary.json``, ``matrix.md`` and ``matrix.png`` from ``cells`` (default: OUT's run records)."""
    from compressor.fileio import write_json, write_text

    if cells is None:
        cells = aggregate(load_records(out))
    chk = checks(cells)
    table = markdown_table(cells, chk)
    note = plot(cells, out / "matrix.png")
    # a combined table's runs ran where their sources say, not where it is drawn
    where = "each source's own (settings.combined_from)" if settings.get("combined_from") else machine()
    summary = {"settings": settings, "machine": where, "cells": cells, "checks": chk,
               "skipped": skipped, "failed": failed, "plot": None if note else "matrix.png", "plot_note": note,
               "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json(out / "summary.json", summary)
    kind = "combined" if settings.get("combined_from") else ("quick mode" if settings.get("quick") else "full")
    head = [f"# Defaults matrix ({kind})", "",
            f"- machine: {summary['machine']}; written {summary['written']}",
            f"- command: `{settings.get('command', '')}`",
            "- mean test top-1 (%) per method; gains are paired means over seeds ± std, in points", ""]
    tail = [""] + ([f"Skipped: {'; '.join(skipped)}", ""] if skipped else []) + \
        ([f"Failed (see OUT/logs): {', '.join(failed)}", ""] if failed else []) + \
        ([f"Plot: {note}"] if note else ["![matrix](matrix.png)"])
    write_text(out / "matrix.md", "\n".join(head) + "\n" + table + "\n" + "\n".join(tail) + "\n")
    return summary, table


# ----------------------------------------------------------------------------- running
def say(*parts) -> None:
    print(*parts, flush=True)  # progress lines show up at once in a redirected log


class Runner:
    """Runs subprocesses on ``jobs`` slots; each slot has its own GPU (round robin) and CPU threads."""

    def __init__(self, out: Path, jobs: int, device: str, echo=say):
        self.out, self.jobs, self.echo = out, jobs, echo
        from compressor.machine import usable_cores  # the affinity mask: `taskset -c 0` gives 1 core

        self.cores = usable_cores()
        self.threads = max(1, self.cores // jobs)
        gpus = 0
        if device != "cpu":
            try:
                import torch

                gpus = torch.cuda.device_count()
            except ImportError:
                gpus = 0
        if device == "cuda" and gpus == 0:
            raise SystemExit("error: --device cuda but no CUDA device is visible; use --device auto or cpu")
        self.gpu_of_slot = [("" if device == "cpu" else None) if gpus <= 1 else str(i % gpus) for i in range(jobs)]
        self.slots: queue.Queue = queue.Queue()
        for i in range(jobs):
            self.slots.put(i)
        self.lock = threading.Lock()
        self.t0 = time.time()

    @contextmanager
    def sharing_cores_among(self, parallel: int):
        """Fewer processes than ``jobs`` at once (one teacher to train first on a 2-job matrix) share
        the cores among themselves rather than leave a slot's cores idle: a 96-px MobileNetV2-1.0
        teacher's epoch took 168-189 s on one thread here, 107 s on both cores (2026-12-02)."""
        kept = self.threads
        self.threads = max(1, self.cores // max(1, min(parallel, self.jobs)))
        try:
            yield self.threads
        finally:
            self.threads = kept

    def call(self, label: str, cmd: list[str], log: Path) -> tuple[int, float]:
        slot = self.slots.get()
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            with self.lock:
                self.echo(f"[{time.time() - self.t0:7.0f}s] start {label}")
            t = time.perf_counter()
            with open(log, "a") as fh:
                fh.write(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}\n")
                fh.flush()
                rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                     env=child_env(self.gpu_of_slot[slot], self.threads))
            wall = time.perf_counter() - t
            with self.lock:
                self.echo(f"[{time.time() - self.t0:7.0f}s] {'done' if rc == 0 else f'FAILED (exit {rc})'} "
                          f"{label} in {wall:.0f} s" + ("" if rc == 0 else f"; log: {log}"))
            return rc, wall
        finally:
            self.slots.put(slot)


def _tail(path: Path, n: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


def execute(runs: list[Run], *, args, budgets: dict, echo=say) -> tuple[list[str], list[str]]:
    out, data_root = args.out, args.data_root
    extra = shlex.split(args.extra_args or "")
    runner = Runner(out, args.jobs, args.device, echo)
    skipped, failed = [], []
    todo = [r for r in runs if not record_path(out, r).is_file()]
    done_before = len(runs) - len(todo)
    if any("+unl" in r.method for r in todo) and not cli_has_unlabeled():
        note = "kd+unl/dgkd+unl: this checkout's `compress distill` has no --unlabeled yet"
        skipped.append(note)
        echo(f"skipping {sum('+unl' in r.method for r in todo)} runs: {note}")
        todo = [r for r in todo if "+unl" not in r.method]
    echo(f"{len(runs)} runs, {done_before} done earlier, "
         f"{len(todo)} to run on {args.jobs} job(s) ({runner.threads} CPU thread(s) each)")
    prereqs: dict = {}
    stale: dict = {}
    for r in todo:
        for p in (teacher_for(r.cell, args.teacher_epochs), pretrained_for(r.cell, args.teacher_epochs)):
            if p is not None and not p.path(out).is_file():
                prereqs[p.id] = p
            elif p is not None and (why := stale_prereq(p, out, extra)):
                stale.setdefault(why, set()).update(str(out / part / r.cell.id) for part in ("cells", "runs"))
    if stale:
        why, folders = next(iter(stale.items()))
        raise StaleCacheError(f"{why}: delete it and the runs it taught ({', '.join(sorted(folders))}) to "
                              f"train them again with today's defaults, or use another --out")
    ok_prereq: dict = {}

    def do_prereq(p: Prereq):
        folder = data_root / p.dataset
        if not folder.is_dir():
            ok_prereq[p.id] = f"no data set {folder} (tools/build_datasets.py)"
            return
        p.path(out).parent.mkdir(parents=True, exist_ok=True)  # compress train wants the folder to exist
        cmd = prereq_command(p, data_root, out, extra, args.train_subset)
        rc, _ = runner.call(p.id, cmd, out / "logs" / f"{p.id.replace(':', '-')}.log")
        ok_prereq[p.id] = None if rc == 0 else f"exit {rc}: {_tail(out / 'logs' / (p.id.replace(':', '-') + '.log'))}"

    with runner.sharing_cores_among(len(prereqs)) as threads, \
            ThreadPoolExecutor(max_workers=min(args.jobs, max(1, len(prereqs)))) as pool:
        if prereqs:
            echo(f"{len(prereqs)} teacher/pretrained model(s) to train first ({threads} CPU thread(s) each)")
        list(pool.map(do_prereq, prereqs.values()))
    for pid, err in ok_prereq.items():
        if err:
            failed.append(pid)
            echo(f"{pid} failed: {err}")

    def do_run(r: Run):
        budget = budgets[r.cell.budget]
        folder = data_root / r.cell.dataset
        if not folder.is_dir():
            skipped.append(f"{r.id}: no data set {folder}")
            return
        t, p = teacher_for(r.cell, args.teacher_epochs), pretrained_for(r.cell, args.teacher_epochs)
        if any(x is not None and ok_prereq.get(x.id) for x in (t, p)):
            skipped.append(f"{r.id}: its teacher/pretrained model failed")
            return
        teacher = PRETRAINED_TEACHER if t is None else t.path(out)
        init = None if p is None else p.path(out)
        cmd = run_command(r, data_root=data_root, out=out, budget=budget, teacher=teacher, init=init, extra=extra)
        log = out / "logs" / r.cell.id / f"{r.method}-s{r.seed}.log"
        rc, wall = runner.call(r.id, cmd, log)
        summary_path = run_dir(out, r) / "summary.json"
        if rc != 0 or not summary_path.is_file():
            failed.append(r.id)
            return
        from compressor.fileio import write_json

        resumed = "--resume" in cmd
        rec = make_record(r, json.loads(summary_path.read_text()), command=cmd, budget=budget,
                          wall=None if resumed else wall, num_classes=num_classes_of(folder),
                          notes=["resumed: wall time covers part of the run"] if resumed else [])
        write_json(record_path(out, r), rec)

    # dgkd with no assistant planned is kd: record kd's run for it instead of training it again
    derived = []
    if not getattr(args, "run_identical", False):
        run_ids = {r.id for r in runs}
        for r in todo:
            kd_run = kd_twin(r)
            # the twin runs in this call, or an earlier call recorded it (--methods dgkd after --methods kd)
            if not r.method.startswith("dgkd") or (kd_run.id not in run_ids and not record_path(out, kd_run).is_file()):
                continue
            t = teacher_for(r.cell, args.teacher_epochs)
            if t is not None and ok_prereq.get(t.id):
                continue  # do_run skips it with the reason
            teacher = PRETRAINED_TEACHER if t is None else t.path(out)
            if planned_assistants(teacher, CHAINS[r.cell.chain][1], extra) == 0:
                derived.append(r)
        if derived:
            echo(f"{len(derived)} dgkd run(s) plan no assistant: each records its kd twin's run")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(do_run, [r for r in todo if r not in derived]))
    from compressor.fileio import write_json

    for r in derived:
        twin = record_path(out, kd_twin(r))
        if twin.is_file():
            write_json(record_path(out, r), derived_record(r, json.loads(twin.read_text())))
        else:
            skipped.append(f"{r.id}: equals {kd_twin(r).id}, which did not finish")
    return skipped, failed


# ----------------------------------------------------------------------------- main
def _csv(value: str) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--data-root", type=Path, default=None,
                    help="folder made by tools/build_datasets.py (required unless --combine)")
    ap.add_argument("--out", type=Path, default=Path("runs/defaults-matrix"), help="[default: %(default)s]")
    ap.add_argument("--quick", action="store_true", help=f"one seed, short budget only, {QUICK_TEACHER_EPOCHS}-epoch teachers, the "
                         f"{len(QUICK_CELLS)} cells of QUICK_CELLS (--only: any of the short cells)")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel processes [default: 1]")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: CUDA when present (jobs spread over the GPUs), else CPU [default: auto]")
    ap.add_argument("--seeds", default=None, help="comma-separated [default: 0,1,2; quick: 0]")
    ap.add_argument("--budgets", default=None, help="short,cpu [default: both; quick: short]")
    ap.add_argument("--datasets", default=",".join(DATASETS), help="[default: %(default)s]")
    ap.add_argument("--chains", default=",".join(CHAINS), help="[default: %(default)s]")
    ap.add_argument("--only", default=None, help="regular expression on the cell ids (see --list)")
    ap.add_argument("--methods", default=None,
                    help="comma-separated subset of the methods to run, e.g. dgkd to start the longest runs first "
                         "(a later call without it runs the rest) [default: every method of each cell]")
    ap.add_argument("--short-epochs", type=int, default=3, help="epochs per stage, short budget [default: 3]")
    ap.add_argument("--teacher-epochs", type=int, default=None,
                    help=f"epochs of the teachers trained here [default: {FULL_TEACHER_EPOCHS}; quick: "
                         f"{QUICK_TEACHER_EPOCHS}]")
    ap.add_argument("--train-subset", type=int, default=None,
                    help="cap the training images of every short-budget run and teacher (0: all)")
    ap.add_argument("--extra-args", default=None,
                    help="appended to every compress command, e.g. \"--data-workers 2\"")
    ap.add_argument("--run-identical", action="store_true",
                    help="also train dgkd where its plan has no assistant (it then trains as kd, the same run; "
                         "by default kd's record is copied for it)")
    ap.add_argument("--list", action="store_true", help="print the runs and exit")
    ap.add_argument("--table-only", action="store_true", help="rebuild the table from the JSON files and exit")
    ap.add_argument("--combine", nargs="+", type=Path, default=None, metavar="SOURCE",
                    help="write OUT's table, checks and plot from these sources instead of OUT's runs and exit: "
                         "summary.json files or folders of run records; a cell comes whole from the last source "
                         "that has it (the whole matrix from runs made in several sessions)")
    args = ap.parse_args(argv)
    if args.data_root is None and not args.combine:
        ap.error("--data-root is required (a folder made by tools/build_datasets.py), unless --combine")
    for path in args.combine or []:
        if not path.exists():
            ap.error(f"--combine {path}: no such file or folder")
    try:
        args.seeds = [int(s) for s in _csv(args.seeds)] if args.seeds else ([0] if args.quick else [0, 1, 2])
    except ValueError:
        ap.error(f"--seeds takes comma-separated integers, e.g. 0,1,2; got {args.seeds!r}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        ap.error("--seeds needs distinct integers, e.g. 0,1,2")
    if args.only:
        try:
            re.compile(args.only)
        except re.error as exc:
            ap.error(f"--only {args.only!r} is not a regular expression ({exc}); e.g. --only '^cifar10\\.'")
    args.budgets = _csv(args.budgets) if args.budgets else (["short"] if args.quick else ["short", "cpu"])
    args.datasets, args.chains = _csv(args.datasets), _csv(args.chains)
    args.methods = _csv(args.methods or "") or None  # None: every method of each cell
    for what, vals, allowed in (("budget", args.budgets, ("short", "cpu")), ("data set", args.datasets, DATASETS),
                                ("chain", args.chains, tuple(CHAINS)),
                                ("method", args.methods or [], BASE_METHODS + UNL_METHODS)):
        bad = [v for v in vals if v not in allowed]
        if bad:
            ap.error(f"unknown {what}(s) {bad}; choose from {', '.join(allowed)}")
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    if args.short_epochs < 1 or (args.teacher_epochs is not None and args.teacher_epochs < 1):
        ap.error("--short-epochs and --teacher-epochs must be >= 1")
    if args.teacher_epochs is None:
        args.teacher_epochs = QUICK_TEACHER_EPOCHS if args.quick else FULL_TEACHER_EPOCHS
    if args.train_subset == 0:
        args.train_subset = None
    # the subprocesses run in the repository root: relative paths are the caller's
    args.data_root_given = None if args.data_root is None else str(args.data_root)  # as typed (no machine paths)
    args.data_root = None if args.data_root is None else args.data_root.resolve()
    args.out = args.out.resolve()
    return args


def select_runs(args) -> tuple[list[Run], dict]:
    cells = enumerate_cells(args.budgets, tuple(args.datasets), tuple(args.chains))
    if args.only:
        rx = re.compile(args.only)
        cells = [c for c in cells if rx.search(c.id)]
    elif args.quick:
        cells = [c for c in cells if c.id in QUICK_CELLS]
    budgets = {"short": Budget("short", args.short_epochs, args.train_subset), "cpu": cpu_budget()}
    runs = enumerate_runs(cells, args.seeds)
    if getattr(args, "methods", None):  # tests build args without it
        runs = [r for r in runs if r.method in args.methods]
    return runs, budgets


def main(argv=None) -> int:
    args = parse_args(argv)
    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/defaults_matrix.py",
                                                 *(sys.argv[1:] if argv is None else argv)])
    if args.combine:
        return combine_main(args, command)
    runs, budgets = select_runs(args)
    settings = {"command": command, "quick": args.quick, "seeds": args.seeds, "budgets":
                {k: asdict(v) for k, v in budgets.items() if k in args.budgets},
                "teacher_epochs": args.teacher_epochs, "data_root": args.data_root_given,
                "extra_args": args.extra_args}
    manifest = args.data_root / "datasets.json"
    if manifest.is_file():
        settings["datasets"] = {k: {"note": v.get("note"), "counts": v.get("counts"), "mode": v.get("mode")}
                                for k, v in json.loads(manifest.read_text()).items()}
    if args.list:
        for r in runs:
            done = "done" if record_path(args.out, r).is_file() else "todo"
            print(f"{done}  {r.id}")
        print(f"{len(runs)} runs in {len({r.cell.id for r in runs})} cells")
        return 0
    if not args.table_only:
        if not args.data_root.is_dir():
            print(f"error: --data-root {args.data_root} is not a folder; build it with "
                  f"python tools/build_datasets.py --cifar-tar PATH --out {args.data_root}", file=sys.stderr)
            return 2
        args.out.mkdir(parents=True, exist_ok=True)
        from compressor.errors import CompressError

        t0 = time.time()
        try:
            skipped, failed = execute(runs, args=args, budgets=budgets)
        except (StaleCacheError, CompressError) as exc:  # CompressError: e.g. a bad --option in --extra-args
            print(f"error: {exc}", file=sys.stderr)
            return 2
        settings["wall_seconds_this_session"] = round(time.time() - t0, 1)
    else:
        skipped, failed = [], []
        previous = args.out / "summary.json"
        if previous.is_file():  # keep what the runs were made with; note the redraw
            try:
                old = json.loads(previous.read_text())
                settings = {**old.get("settings", {}), "table_redrawn_by": command}
                skipped, failed = old.get("skipped", []), old.get("failed", [])
            except ValueError:
                pass
    summary, table = write_outputs(args.out, settings=settings, skipped=skipped, failed=failed)
    print()
    print(table)
    if skipped:
        print("\nskipped: " + "; ".join(skipped))
    if failed:
        print("\nfailed: " + ", ".join(failed) + f" (logs in {args.out / 'logs'})")
    print(f"\nwrote {args.out / 'summary.json'}, {args.out / 'matrix.md'}"
          + ("" if summary["plot_note"] else f", {args.out / 'matrix.png'}"))
    return 0


def combine_main(args, command: str) -> int:
    """``--combine``: OUT's summary.json, matrix.md and matrix.png from the sources' cells."""
    from compressor.errors import CompressError

    try:
        cells, origin = combine_sources(args.combine)
    except CompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {"command": command, "combined_from": origin}
    summary, table = write_outputs(args.out, settings=settings, skipped=[], failed=[], cells=cells)
    print(table)
    print(f"\n{len(cells)} cells from {len(set(origin.values()))} sources; wrote {args.out / 'summary.json'}, "
          f"{args.out / 'matrix.md'}" + ("" if summary["plot_note"] else f", {args.out / 'matrix.png'}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
