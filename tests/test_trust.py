"""Trust: no input file runs code, accuracies name their split, teacher and data agree.

Each hostile file is fed to the real CLI. The attack payload is ``touch MARKER``
(or its Python equivalent): a test passes only if the command exits 2 with one
line on stderr, the marker never appears, and the working folder holds nothing
new but what the test itself created.
"""
import argparse
import json
import os
import pickle
import signal
import struct
from pathlib import Path

import pytest
from conftest import assert_refused, run_cli_inprocess
import torch
import yaml

from compressor.checkpoint import load_foreign_state_dict, meta_for, save_checkpoint
from compressor.errors import CompressError
from compressor.models import create_model


class TouchMarker:
    """Unpickling this runs ``os.system('touch MARKER')``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


run_cli = run_cli_inprocess


def snapshot(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


# ------------------------------------------------------------------ pickles
@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_pickle_with_a_side_effect_is_refused_by_import(in_tmp, capsys, zipfile):
    marker = in_tmp / "PWNED"
    evil = in_tmp / "evil.pth"
    state = create_model("resnet8", num_classes=10).state_dict()
    torch.save({"state_dict": state, "payload": TouchMarker(marker)}, evil,
               _use_new_zipfile_serialization=zipfile)
    before = snapshot(in_tmp)
    code, _, err = run_cli(["import", evil, "--arch", "resnet8", "--out", "t.safetensors"], capsys)
    assert_refused(code, err, marker, "evil.pth", "refusing to unpickle", "posix.system", "--allow-pickle")
    assert snapshot(in_tmp) == before  # nothing written


def test_raw_pickle_is_refused_without_naming_a_fix_that_runs_it_silently(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.th"
    evil.write_bytes(pickle.dumps({"x": TouchMarker(marker)}))
    with pytest.raises(CompressError, match="refusing to unpickle.*--allow-pickle"):
        load_foreign_state_dict(evil)
    assert not marker.exists()


def test_allow_pickle_loads_a_trusted_legacy_file(in_tmp, capsys):
    # Old training scripts saved their argparse namespace next to the weights: weights_only refuses it.
    legacy = in_tmp / "legacy.pth"
    model = create_model("resnet8", num_classes=10)
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, legacy)
    code, _, err = run_cli(["import", legacy, "--arch", "resnet8", "--out", "a.safetensors"], capsys)
    assert code == 2 and "argparse.Namespace" in err and "--allow-pickle" in err, err
    code, out, err = run_cli(["import", legacy, "--arch", "resnet8", "--out", "a.safetensors",
                              "--allow-pickle"], capsys)
    assert code == 0, err
    assert (in_tmp / "a.safetensors").is_file()


def test_hostile_cifar_batch_file_is_refused(in_tmp, capsys, pretrained_teacher):
    marker = in_tmp / "PWNED"
    data = in_tmp / "cifar"
    data.mkdir()
    (data / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"] * 10}))
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        (data / name).write_bytes(pickle.dumps({b"data": TouchMarker(marker), b"labels": [0]}))
    code, _, err = run_cli(["eval", pretrained_teacher, "--data", data], capsys)
    assert_refused(code, err, marker)


# ------------------------------------------------------------------ safetensors
def _safetensors(path: Path, header: bytes, *, length: int | None = None, tail: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + tail)
    return path


META = {"arch": "resnet8", "num_classes": "10"}
HEADERS = {
    "header length 2**63": (b"{}", 2**63, b""),
    "header longer than the file": (b"{}", 10_000, b""),
    "not JSON": (b"{not json", None, b""),
    "tensor beyond the file": (json.dumps({"w": {"dtype": "F32", "shape": [1_000_000],
                                                 "data_offsets": [0, 4_000_000]}, "__metadata__": META}).encode(),
                               None, b"\0" * 16),
    "shape overflow": (json.dumps({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]},
                                   "__metadata__": META}).encode(), None, b"\0" * 8),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_safetensors_header_that_lies_is_refused(in_tmp, capsys, case):
    header, length, tail = HEADERS[case]
    bad = _safetensors(in_tmp / "bad.safetensors", header, length=length, tail=tail)
    before = snapshot(in_tmp)
    code, _, err = run_cli(["eval", bad, "--data", "demo"], capsys)
    assert_refused(code, err, in_tmp / "none", "bad.safetensors", "not a readable safetensors checkpoint")
    assert snapshot(in_tmp) == before


@pytest.mark.parametrize("field,value,words", [
    ("input_size", [3, 100000, 100000], "larger than 8192 px"),
    ("num_classes", 10**9, "num_classes"),
    ("mean", [0.5], "mean/std have 1/3 values"),
])
def test_safetensors_metadata_that_lies_is_refused(in_tmp, capsys, field, value, words):
    model = create_model("resnet8", num_classes=10)
    path = in_tmp / "liar.safetensors"
    save_checkpoint(path, model, meta_for("resnet8", num_classes=10))
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    save_file(tensors, str(path), metadata={**meta, field: json.dumps(value)})
    code, _, err = run_cli(["export", "--onnx", path, "--no-validate"], capsys)
    assert_refused(code, err, in_tmp / "none", "liar.safetensors", "metadata is malformed", words)
    assert not (in_tmp / "liar.onnx").exists()


# ------------------------------------------------------------------ ONNX
def _onnx_with_external_data(path: Path, location: str) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "64")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("location", ["../../../../../../etc/hostname", "/etc/hostname", "link/hostname"])
@pytest.mark.parametrize("command", ["eval", "bench"])
def test_onnx_external_data_outside_the_model_folder_is_refused(in_tmp, capsys, location, command):
    model = _onnx_with_external_data(in_tmp / "models" / "escape.onnx", location)
    (in_tmp / "models" / "link").symlink_to("/etc")  # a symlink inside the folder that leads out of it
    args = [command, model] + (["--data", "demo"] if command == "eval" else ["--iters", "2"])
    code, out, err = run_cli(args, capsys)
    assert_refused(code, err, in_tmp / "none", "escape.onnx", "tensor 'W'", "outside the model's folder")
    assert "hostname" not in out


# ------------------------------------------------------------------ YAML
def test_yaml_recipe_tag_never_runs(in_tmp, capsys, pretrained_teacher):
    marker = in_tmp / "PWNED"
    recipe = in_tmp / "evil.yaml"
    recipe.write_text(f'epochs: !!python/object/apply:os.system ["touch {marker}"]\n')
    code, _, err = run_cli(["distill", "--recipe", recipe, "--teacher", pretrained_teacher,
                            "--target", "resnet8"], capsys)
    assert_refused(code, err, marker, "evil.yaml", "YAML tag", "never executes")
    assert not (in_tmp / "runs").exists()


def test_recipe_naming_code_needs_the_command_line_to_agree(in_tmp, capsys, pretrained_teacher):
    marker = in_tmp / "PWNED"
    (in_tmp / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nimport torch\nNet = torch.nn.Linear\n")
    recipe = in_tmp / "r.yaml"
    recipe.write_text("target: evil.py:Net\nepochs: 1\n")
    code, _, err = run_cli(["plan", "--recipe", recipe, "--teacher", pretrained_teacher], capsys)
    assert_refused(code, err, marker, "r.yaml", "names code (target: evil.py:Net)", "--trust-code")


def test_run_directory_files_never_run_code(in_tmp, capsys, pretrained_teacher):
    marker = in_tmp / "PWNED"
    run = in_tmp / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f'seed: !!python/object/apply:os.system ["touch {marker}"]\n')
    code, _, err = run_cli(["distill", "--teacher", pretrained_teacher, "--target", "resnet8", "--data", "demo",
                            "--out", run, "--resume"], capsys)
    assert_refused(code, err, marker, "config.yaml")


# ------------------------------------------------------------------ resume state
def _tiny_run(out: Path, *, resume: bool = False):
    from compressor.config import DistillConfig, resolve_config
    from compressor.data import synthetic_data
    from compressor.pipeline import run_distillation

    teacher = Path(__file__).parents[1] / "compressor/assets/resnet20_cifar10_pretrained.safetensors"
    cfg = resolve_config(DistillConfig, None, dict(teacher=str(teacher), target="resnet8", method="kd", epochs=2,
                                                   batch_size=16, out=str(out), seed=5, lr=0.05,
                                                   latency_backend="none"))
    return run_distillation(cfg, data=synthetic_data(num_classes=10, n_train=64, n_test=16, seed=1),
                            show_progress=False, resume=resume)


def test_saved_training_state_is_json_and_a_planted_pickle_never_runs(tmp_path, monkeypatch, capsys):
    import compressor.trainer as trainer

    real_loss, calls = trainer.dgkd_loss, []

    def loss_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # epoch 2, step 2: the state is saved inside the epoch
            signal.raise_signal(signal.SIGINT)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(trainer, "dgkd_loss", loss_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        _tiny_run(tmp_path / "r")
    monkeypatch.setattr(trainer, "dgkd_loss", real_loss)
    state = tmp_path / "r" / "stages" / "1-resnet8" / "state"
    resume = json.loads((state / "resume.json").read_text())
    assert resume["epoch"] == 1 and resume["step"] == 2 and resume["num_processes"] == 1
    assert not list(state.glob("custom_checkpoint_*.pkl"))  # nothing of ours is pickled

    # Accelerate would unpickle custom_checkpoint_0.pkl with weights_only=False; we register nothing.
    marker = tmp_path / "PWNED"
    torch.save(TouchMarker(marker), state / "custom_checkpoint_0.pkl")
    # A state saved by another world size is refused, naming both counts.
    (state / "resume.json").write_text(json.dumps({**resume, "num_processes": 2}))
    with pytest.raises(CompressError, match=r"written by 2 process\(es\), this run has 1"):
        _tiny_run(tmp_path / "r", resume=True)
    (state / "resume.json").write_text(json.dumps(resume))
    with pytest.raises(CompressError, match="does not load"):  # refused before anything is unpickled
        _tiny_run(tmp_path / "r", resume=True)
    assert not marker.exists()
    (state / "custom_checkpoint_0.pkl").unlink()
    _tiny_run(tmp_path / "r", resume=True)
    assert (tmp_path / "r" / "student.safetensors").is_file()
    assert not marker.exists()


# ------------------------------------------------------------------ splits
def test_paper_protocol_labels_the_per_epoch_split_as_test(in_tmp, capsys, pretrained_teacher):
    code, out, err = run_cli(["distill", "--teacher", pretrained_teacher, "--target", "resnet8", "--method", "kd",
                              "--data", "demo", "--train-subset", "128", "--epochs", "1", "--batch-size", "64",
                              "--val-fraction", "0", "--latency-backend", "none", "--out", "runs/p",
                              "--bn-recalibration-batches", "0"], capsys)  # else the final model differs
    assert code == 0, err
    run = in_tmp / "runs" / "p"
    summary = json.loads((run / "summary.json").read_text())
    student = summary["chain"][-1]
    assert summary["per_epoch_split"] == "test"
    assert student["best_val_top1"] is None and student["best_test_top1"] is not None
    assert student["final_test_top1"] == pytest.approx(student["best_test_top1"])  # one epoch: the same score
    assert "best test top-1 %" in out and "chosen on the test split" in out
    report = (run / "report.md").read_text()
    assert "best test top-1 %" in report and "chosen on test" in report
    record = json.loads((run / "stages" / "1-resnet8" / "metrics.jsonl").read_text().splitlines()[0])
    assert "test_top1" in record and "val_top1" not in record
    assert summary["teacher_sha256"] == __import__("hashlib").sha256(pretrained_teacher.read_bytes()).hexdigest()


def test_default_holds_out_a_validation_split():
    from compressor.config import DistillConfig, TrainConfig

    assert DistillConfig().val_fraction == TrainConfig().val_fraction == 0.1


# ------------------------------------------------------------------ class names
def _teacher_with_names(path: Path, names) -> Path:
    model = create_model("resnet8", num_classes=len(names))
    save_checkpoint(path, model, meta_for("resnet8", num_classes=len(names), class_names=names))
    return path


DEMO_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.parametrize("names,words", [
    (DEMO_NAMES[:3] + ["dog", "deer", "cat"] + DEMO_NAMES[6:], "another order (#3: 'dog' vs 'cat'"),
    (DEMO_NAMES[:9] + ["lorry"], "teacher only: 'lorry'; data only: 'truck'"),
])
def test_class_names_that_differ_are_refused(in_tmp, capsys, names, words):
    teacher = _teacher_with_names(in_tmp / "t.safetensors", names)
    code, _, err = run_cli(["distill", "--teacher", teacher, "--target", "resnet8", "--method", "ce",
                            "--data", "demo", "--epochs", "1", "--out", "runs/x"], capsys)
    assert_refused(code, err, in_tmp / "none", words, "--ignore-class-names")
    assert not (in_tmp / "runs").exists()
    model_words = words.replace("teacher only", "model only")
    code, _, err = run_cli(["eval", teacher, "--data", "demo"], capsys)
    assert_refused(code, err, in_tmp / "none", model_words)
    code, out, err = run_cli(["eval", teacher, "--data", "demo", "--ignore-class-names"], capsys)
    assert code == 0, err


def test_eval_prints_the_checkpoint_provenance(capsys, pretrained_teacher, tmp_path):
    code, out, err = run_cli(["eval", pretrained_teacher, "--data", "demo", "--json", tmp_path / "m.json"], capsys)
    assert code == 0, err
    digest = __import__("hashlib").sha256(pretrained_teacher.read_bytes()).hexdigest()
    assert f"sha256 {digest}" in out
    record = json.loads((tmp_path / "m.json").read_text())
    assert record["sha256"] == digest and record["split"] == "test" and record["source"]


def test_recipes_stay_plain_mappings():
    # every shipped recipe loads with the safe loader (no tags)
    for recipe in (Path(__file__).parents[1] / "recipes").glob("*.yaml"):
        assert isinstance(yaml.safe_load(recipe.read_text()), dict), recipe


def test_resume_of_a_run_written_by_an_older_version_compares_missing_keys_as_defaults(tmp_path):
    from compressor.config import DistillConfig, config_to_dict
    from compressor.pipeline import _check_resume_config

    resolved = {**config_to_dict(DistillConfig(teacher="t", target="resnet8")), "target": "resnet8",
                "num_processes": 1}
    old = {k: v for k, v in resolved.items() if k not in ("ignore_class_names", "num_processes", "image_size")}
    old["augment"] = True  # before augmentation policies
    resolved["augment"] = "cifar"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    _check_resume_config(tmp_path, resolved)  # nothing differs
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**old, "seed": 99}))
    with pytest.raises(CompressError, match="seed: 99 -> 20"):
        _check_resume_config(tmp_path, resolved)
