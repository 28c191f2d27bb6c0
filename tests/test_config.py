import pytest

from compressor.config import DistillConfig, TrainConfig, resolve_config
from compressor.errors import CompressError


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return str(p)


def test_precedence_defaults_recipe_cli(tmp_path):
    recipe = write(tmp_path, "teacher: t.safetensors\ntarget: resnet8\nepochs: 7\nlr: 0.05\ntemperature: 3\n")
    cfg = resolve_config(DistillConfig, recipe, {"epochs": 9, "lr": None})
    assert cfg.epochs == 9          # CLI beats recipe
    assert cfg.lr == 0.05           # recipe beats default; None CLI value = not given
    assert cfg.temperature == 3.0 and isinstance(cfg.temperature, float)
    assert cfg.momentum == 0.9      # default


def test_unknown_key_is_named(tmp_path):
    recipe = write(tmp_path, "teacher: t\ntarget: resnet8\ntemprature: 4\n")
    with pytest.raises(CompressError, match="unknown key 'temprature'.*temperature"):
        resolve_config(DistillConfig, recipe)


def test_wrong_type_is_named(tmp_path):
    recipe = write(tmp_path, "teacher: t\ntarget: resnet8\nepochs: ten\n")
    with pytest.raises(CompressError, match="key 'epochs' must be int"):
        resolve_config(DistillConfig, recipe)


def test_bad_yaml_and_missing_recipe(tmp_path):
    with pytest.raises(CompressError, match="not valid YAML"):
        resolve_config(DistillConfig, write(tmp_path, "a: [1,\n"))
    with pytest.raises(CompressError, match="does not exist"):
        resolve_config(DistillConfig, str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("values,message", [
    ({"epochs": 0}, "epochs must be > 0"),
    ({"batch_size": -1}, "batch_size must be > 0"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"kd_weight": 1.5}, r"kd_weight \(λ\) must be in \[0, 1\]"),
    ({"kd_weight": -0.1}, r"kd_weight \(λ\) must be in \[0, 1\]"),
    ({"method": "fitnet"}, "method must be one of"),
    ({"lr": 0.0}, "lr must be > 0"),
])
def test_validation(values, message):
    with pytest.raises(CompressError, match=message):
        resolve_config(DistillConfig, None, {"teacher": "t", "target": "resnet8", **values})


def test_student_required_and_exclusive():
    with pytest.raises(CompressError, match="no student"):
        resolve_config(DistillConfig, None, {"teacher": "t"})
    with pytest.raises(CompressError, match="either --target or --target-latency"):
        resolve_config(DistillConfig, None, {"teacher": "t", "target": "resnet8", "target_latency_ms": 0.2})


def test_train_config_defaults():
    cfg = resolve_config(TrainConfig, None, {"arch": "resnet8", "out": "x.safetensors"})
    # lr, weight decay, schedule, ...: None = the model family's (compressor.training_defaults)
    assert cfg.epochs == 30 and cfg.weight_decay is None and cfg.schedule is None and cfg.lr is None
