"""Every recipe validates; every paper recipe runs end to end on tiny synthetic data.

The paper recipes (DESIGN.md section 1) are run for one epoch of 32 synthetic
images (16 for the big models) at batch 16 with a freshly initialised teacher of the recipe's
architecture: this checks the keys, the explicit assistant chain, the model
options (e.g. option-B shortcuts) and the pipeline, not accuracy.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest


from compressor.checkpoint import load_model, meta_for, save_checkpoint
from compressor.config import DistillConfig, read_recipe, resolve_config
from compressor.data import synthetic_data
from compressor.models import count_macs, count_params, create_model, get_entry
from compressor.models.registry import profile_arch
from compressor.pipeline import run_distillation

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# recipe -> teacher arch, classes, teacher options, trained chain (assistants..., student),
# synthetic input size (ImageNet ResNets are fully convolutional: 64x64 keeps the test fast),
# training images (big models: one step of 16 images is enough).
PAPER = {
    "cifar10_cnn_10-8-6-4-2.yaml": dict(teacher="cnn10", num_classes=10, chain=["cnn8", "cnn6", "cnn4", "cnn2"]),
    "cifar100_cnn_10-8-6-4-2.yaml": dict(teacher="cnn10", num_classes=100, chain=["cnn8", "cnn6", "cnn4", "cnn2"]),
    "cifar10_resnet_26-20-14-8.yaml": dict(teacher="resnet26", num_classes=10, teacher_kwargs={"shortcut": "B"},
                                           chain=["resnet20", "resnet14", "resnet8"]),
    "cifar100_wrn40-2_wrn16-2.yaml": dict(teacher="wrn40_2", num_classes=100, chain=["wrn28_2", "wrn16_2"],
                                          n_train=16),
    "cifar100_vgg13_vgg8.yaml": dict(teacher="vgg13", num_classes=100, chain=["vgg11", "vgg8"], n_train=16),
    "imagenet_resnet34_resnet18.yaml": dict(teacher="resnet34", num_classes=10,
                                            chain=["resnet28", "resnet22", "resnet18"],
                                            input_size=(3, 64, 64), n_train=16, student_kwargs={"stem": "imagenet"}),
    "imagenet_resnet50_mobilenetv2.yaml": dict(teacher="resnet50", num_classes=10,
                                               chain=["mobilenetv2_140", "mobilenetv2_100"],
                                               input_size=(3, 64, 64), n_train=16,
                                               student_kwargs={"stem": "imagenet"}),
    "cifar10_resnet56_mobilenetv2.yaml": dict(teacher="resnet56", num_classes=10,
                                              chain=["mobilenetv2_075", "mobilenetv2_050", "mobilenetv2_035"],
                                              n_train=16, student_kwargs={"stem": "cifar"}, cpu_scale=True),
}
ALL_RECIPES = sorted(p.name for p in RECIPES.glob("*.yaml"))


@pytest.mark.parametrize("arch,num_classes,kwargs", [("resnet8", 10, {"shortcut": "B"}), ("cnn4", 100, {}),
                                                     ("wrn16_1", 100, {}), ("vgg8", 10, {})])
def test_meta_profile_is_exact(arch, num_classes, kwargs):
    """The planner profiles models built on the meta device; the numbers equal a real forward pass."""
    model = create_model(arch, num_classes=num_classes, **kwargs)
    real = (count_params(model), count_macs(model, get_entry(arch).input_size))
    assert profile_arch(arch, num_classes, json.dumps(kwargs, sort_keys=True)) == real


def _validate(path: Path, teacher: str = "teacher.safetensors") -> DistillConfig:
    overrides = {"teacher": teacher}
    if not read_recipe(path).get("target"):  # e.g. demo.yaml: the student comes from the command line
        overrides["target"] = "resnet8"
    return resolve_config(DistillConfig, str(path), overrides)


def test_paper_recipes_exist():
    missing = [name for name in PAPER if not (RECIPES / name).is_file()]
    assert not missing, f"paper recipes missing from recipes/: {missing}"
    assert (RECIPES / "cpu_study.yaml").is_file()


@pytest.mark.parametrize("name", ALL_RECIPES)
def test_every_recipe_validates(name):
    cfg = _validate(RECIPES / name)
    assert cfg.teacher == "teacher.safetensors"
    text = (RECIPES / name).read_text()
    assert "teacher" not in read_recipe(RECIPES / name), "the teacher is given on the command line"
    assert text.lstrip().startswith("#"), "a recipe starts with a comment saying what it is and how to run it"


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipe_settings(name):
    spec = PAPER[name]
    cfg = _validate(RECIPES / name)
    raw = read_recipe(RECIPES / name)
    assert cfg.target == spec["chain"][-1]
    assert cfg.data != "demo" and "data" in raw, "data: is a placeholder path users replace"
    if spec.get("cpu_scale"):  # the CPU-study budget (cpu_study.yaml), auto assistants
        study = _validate(RECIPES / "cpu_study.yaml")
        assert cfg.method == "dgkd" and cfg.assistants == "auto" and cfg.model_kwargs == {"stem": "cifar"}
        assert cfg.spacing == 2.5  # the studied chains (results §1, §4), not the default's fewer assistants
        for key in ("spacing", "epochs", "train_subset", "val_fraction", "temperature", "kd_weight", "schedule", "lr",
                    "weight_decay", "batch_size"):
            assert getattr(cfg, key) == getattr(study, key), key
        return
    assert cfg.seed == 20 and cfg.momentum == 0.9 and cfg.drop_guides == 1
    assert cfg.temperature == 5.0 and cfg.kd_weight == 1.0
    if name.startswith("imagenet"):
        assert cfg.method == "dgkd"  # real assistants from the student's family
        assert [a.strip() for a in cfg.assistants.split(",")] == spec["chain"][:-1]
        assert (cfg.epochs, cfg.batch_size, cfg.lr) == (100, 256, 0.1)
        assert cfg.schedule == "step" and cfg.milestones == [0.3, 0.6, 0.9] and cfg.weight_decay == 1e-4
        return
    assert cfg.method == "dgkd"
    assert [a.strip() for a in cfg.assistants.split(",")] == spec["chain"][:-1]
    assert (cfg.epochs, cfg.batch_size, cfg.weight_decay) == (160, 128, 1e-4)
    if spec["teacher"].startswith("cnn"):
        assert cfg.schedule == "constant" and cfg.lr == 0.01
    else:
        assert cfg.schedule == "step" and cfg.lr == 0.1 and cfg.milestones == [0.5, 0.75] and cfg.gamma == 0.1
    if spec["teacher"].startswith("resnet"):
        assert cfg.model_kwargs == {"shortcut": "B"}
    header = (RECIPES / name).read_text()
    assert "--teacher" in header and "--data" in header and "compress train" in header
    assert "NOKD" in header and "DGKD" in header


def test_cpu_study_recipe():
    cfg = _validate(RECIPES / "cpu_study.yaml")
    assert cfg.target == "resnet8" and cfg.method == "dgkd" and cfg.drop_guides == 1
    assert cfg.val_fraction > 0, "the study makes its choices on a validation split, never on test"
    assert cfg.assistant_epochs in (None, cfg.epochs), "identical budgets for every trained model"


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipe_runs_on_tiny_data(name, tmp_path, monkeypatch):
    # report.md and its plots are tested elsewhere; matplotlib would dominate the time here.
    monkeypatch.setattr("compressor.pipeline.write_report", lambda run_dir: None)
    spec = PAPER[name]
    n, size = spec["num_classes"], spec.get("input_size", (3, 32, 32))
    t_kwargs = spec.get("teacher_kwargs", {})
    teacher_path = tmp_path / "teacher.safetensors"
    save_checkpoint(teacher_path, create_model(spec["teacher"], num_classes=n, **t_kwargs),
                    meta_for(spec["teacher"], num_classes=n, model_kwargs=t_kwargs,
                             class_names=[f"class{i}" for i in range(n)]))
    cfg = resolve_config(DistillConfig, str(RECIPES / name),
                         {"teacher": str(teacher_path), "epochs": 1, "batch_size": 16, "latency_backend": "none",
                          "out": str(tmp_path / "run")})
    data = synthetic_data(num_classes=n, input_size=size, n_train=spec.get("n_train", 32), n_test=16)
    summary = run_distillation(cfg, data=data, show_progress=False)

    assert [m["arch"] for m in summary["chain"]] == [spec["teacher"], *spec["chain"]]
    assert summary["method"] == cfg.method
    student_path = tmp_path / "run" / "student.safetensors"
    assert student_path.is_file() and (tmp_path / "run" / "summary.json").is_file()
    student, meta = load_model(student_path)
    assert meta.arch == spec["chain"][-1] and meta.num_classes == n
    # e.g. option-B shortcuts reach the student; torchvision families record their stem
    assert meta.model_kwargs == {**t_kwargs, **spec.get("student_kwargs", {})}
