"""benchmarks/guide_gate_paired.py: the paired lead of two models on the same images, and a run re-scored."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from compressor.checkpoint import meta_for, save_checkpoint
from compressor.models import create_model

from data_folders import write_uniform_folder

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("guide_gate_paired", REPO / "benchmarks" / "guide_gate_paired.py")
gp = importlib.util.module_from_spec(_spec)
sys.modules["guide_gate_paired"] = gp
_spec.loader.exec_module(gp)


def test_paired_lead_hand_computed():
    # differences 1, 0, 0, 0: lead 25 points; sample variance 0.25, SE sqrt(0.25 / 4) = 0.25 -> 25 points
    assert gp.paired_lead([1, 1, 1, 0], [0, 1, 1, 0]) == {"a": 75.0, "b": 50.0, "lead": 25.0, "paired_se": 25.0, "n": 4}
    # differences 0, 1, 0, -1: no lead; variance 2/3, SE sqrt(2/3 / 4) = 0.40825
    same = gp.paired_lead([1, 1, 0, 0], [1, 0, 0, 1])
    assert same["lead"] == 0.0 and same["paired_se"] == round(100 * math.sqrt(2 / 3 / 4), 2) == 40.82
    # identical hits: no lead and no noise, however many images
    assert gp.paired_lead([1, 0, 1], [1, 0, 1])["paired_se"] == 0.0
    with pytest.raises(ValueError):
        gp.paired_lead([1, 0], [1])


def test_a_run_rescored_on_both_splits(tmp_path, one_torch_thread):
    data = write_uniform_folder(tmp_path / "data", size=16, per_class=8, classes=2)
    meta = meta_for("resnet8", num_classes=2, input_size=(3, 16, 16), class_names=["c0", "c1"])
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=2)
    teacher = save_checkpoint(tmp_path / "teacher.safetensors", model, meta)
    run = tmp_path / "run"
    # the assistant is the teacher's weights: the same hits on every image
    (run / "stages" / "1-resnet8").mkdir(parents=True)
    save_checkpoint(run / "stages" / "1-resnet8" / "model.safetensors", model, meta)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": str(data), "seed": 3, "val_fraction": 0.25,
                                                     "train_subset": None, "teacher": str(teacher)}))
    chain = [{"role": r, "arch": "resnet8"} for r in ("teacher", "assistant", "student")]
    (run / "plan.json").write_text(json.dumps({"chain": chain}))

    report = gp.score_run(run, teacher_seed=3)
    assert report["teacher_val_honest"] is True and gp.score_run(run, teacher_seed=0)["teacher_val_honest"] is False
    (a,) = report["assistants"]
    assert a["stage"] == "1-resnet8"
    assert a["val"]["n"] == 4 and a["test"]["n"] == 8   # 16 training images x 0.25; the val/ folder's 2 x 4
    for split in ("val", "test"):
        assert a[split]["lead"] == 0.0 and a[split]["paired_se"] == 0.0 and a[split]["a"] == a[split]["b"]
    # the run's gate: the assistant's validation score against the teacher's test score
    assert a["gate"]["lead"] == round(a["val"]["a"] - a["test"]["b"], 2)
    assert a["paired"] == {"lead": 0.0, "margin": 2.0, "drops_teacher": False}


def test_an_unfinished_assistant_is_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"data": "demo", "seed": 0, "val_fraction": 0.1, "teacher": "t"}))
    (run / "plan.json").write_text(json.dumps({"chain": [{"role": "teacher", "arch": "resnet20"},
                                                               {"role": "assistant", "arch": "resnet14"}]}))
    with pytest.raises(SystemExit, match="1-resnet14"):
        gp.score_run(run, teacher_seed=None)
