"""Small interop defects (issue 21): typed --option values, safetensors' `format: pt`, a run's
config.yaml as a recipe, and refusals that name only flags the command has."""
import pytest
import yaml
from conftest import run_cli_inprocess as run_cli
from safetensors import safe_open

from compressor.cli import _parse_options
from compressor.config import DistillConfig, config_to_dict, resolve_config
from compressor.errors import CompressError


def test_option_values_are_typed():
    parsed = _parse_options(["pretrained=False", "flag=true", "width=16", "scale=0.5", "stem=cifar", "x=None"])
    assert parsed == {"pretrained": False, "flag": True, "width": 16, "scale": 0.5, "stem": "cifar", "x": None}
    assert parsed["pretrained"] is False  # the string 'False' would be truthy
    for bad in (["width"], ["2x=1"], ["w=nan"], ["w=inf"]):
        with pytest.raises(CompressError):
            _parse_options(bad)


def test_saved_checkpoints_carry_format_pt(tmp_path):
    from compressor.checkpoint import load_model, meta_for, save_checkpoint
    from compressor.models import create_model

    save_checkpoint(tmp_path / "m.safetensors", create_model("cnn2", num_classes=10), meta_for("cnn2", num_classes=10))
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as fh:
        assert fh.metadata()["format"] == "pt"
    assert load_model(tmp_path / "m.safetensors")[1].arch == "cnn2"


def test_a_runs_own_config_yaml_is_a_recipe(tmp_path):
    cfg = resolve_config(DistillConfig, None, {"teacher": "t.safetensors", "target": "resnet8", "epochs": 3,
                                               "lr": 0.05})
    recorded = {**config_to_dict(cfg), "num_processes": 1, "precision": {"mixed_precision": "bf16"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(recorded))
    again = resolve_config(DistillConfig, tmp_path / "config.yaml", {})
    assert config_to_dict(again) == config_to_dict(cfg)


def test_a_teacher_naming_code_is_refused_without_suggesting_flags_distill_lacks(in_tmp, capsys):
    from compressor.checkpoint import meta_for, save_checkpoint
    from compressor.models import create_model

    (in_tmp / "net.py").write_text("from torch import nn\n\nclass Net(nn.Module):\n"
                                   "    def __init__(self, num_classes=10, in_chans=3):\n"
                                   "        super().__init__()\n        self.fc = nn.Linear(in_chans, num_classes)\n\n"
                                   "    def forward(self, x):\n        return self.fc(x.mean((2, 3)))\n")
    save_checkpoint(in_tmp / "t.safetensors", create_model("net.py:Net", num_classes=10),
                    meta_for("net.py:Net", num_classes=10))
    code, _, err = run_cli(["distill", "--teacher", "t.safetensors", "--target", "cnn2", "--epochs", "1"], capsys)
    assert code == 2 and "--trust-code" in err
    assert "pass --arch" not in err  # distill has no --arch flag


def test_eval_reads_a_folder_with_only_test(in_tmp, capsys):
    import numpy as np
    from PIL import Image

    from compressor.checkpoint import meta_for, save_checkpoint
    from compressor.models import create_model

    for c in ("a", "b"):
        (in_tmp / "d" / "test" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(in_tmp / "d" / "test" / c / f"{i}.png")
    save_checkpoint(in_tmp / "m.safetensors", create_model("cnn2", num_classes=2, input_hw=8),
                    meta_for("cnn2", num_classes=2, class_names=["a", "b"], model_kwargs={"input_hw": 8},
                             input_size=(3, 8, 8)))
    code, out, err = run_cli(["eval", "m.safetensors", "--data", "d"], capsys)
    assert code == 0, err
    assert "(6 images, torch)" in out
    code, _, err = run_cli(["train", "--arch", "cnn2", "--data", "d", "--out", "t.safetensors"], capsys)
    assert code == 2 and "has no train/ folder" in err and "eval and export read test/ alone" in err
