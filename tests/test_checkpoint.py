import json

import pytest
import torch

from compressor.checkpoint import (load_foreign_state_dict, load_model, load_state_strict, meta_for,
                                   read_checkpoint, save_checkpoint)
from compressor.cli import main
from compressor.errors import CompressError
from compressor.models import create_model

from conftest import SHARED


def test_round_trip_with_metadata(tmp_path):
    model = create_model("resnet8", shortcut="B").eval()
    meta = meta_for("resnet8", num_classes=10, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6),
                    class_names=list("abcdefghij"), model_kwargs={"shortcut": "B"}, metrics={"test_top1": 50.0})
    path = save_checkpoint(tmp_path / "m.safetensors", model, meta)
    loaded, meta2 = load_model(path)
    assert meta2.arch == "resnet8" and meta2.model_kwargs == {"shortcut": "B"}
    assert meta2.mean == (0.1, 0.2, 0.3) and meta2.class_names == list("abcdefghij")
    assert meta2.metrics == {"test_top1": 50.0} and meta2.input_size == (3, 32, 32)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file


def test_truncated_and_foreign_files(tmp_path):
    model = create_model("resnet8")
    path = save_checkpoint(tmp_path / "m.safetensors", model, meta_for("resnet8", num_classes=10))
    data = path.read_bytes()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CompressError, match="not a readable safetensors"):
        load_model(bad)
    text = tmp_path / "text.safetensors"
    text.write_text("hello")
    with pytest.raises(CompressError, match="not a readable safetensors"):
        load_model(text)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CompressError, match="empty"):
        load_model(empty)
    with pytest.raises(CompressError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")


def test_safetensors_without_metadata_needs_arch(tmp_path):
    from safetensors.torch import save_file

    model = create_model("resnet8")
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(CompressError, match="--arch"):
        load_model(path)
    loaded, meta = load_model(path, arch="resnet8")
    assert meta.num_classes == 10


def test_mismatched_weights_name_the_keys(tmp_path):
    model = create_model("resnet20")
    path = save_checkpoint(tmp_path / "m.safetensors", model, meta_for("resnet8", num_classes=10))
    with pytest.raises(CompressError, match=r"do not match arch 'resnet8'.*unexpected \(e\.g\. layer1\.1"):
        load_model(path)


def test_import_pth_wrappers_and_module_prefix(tmp_path):
    model = create_model("resnet8")
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "best_prec1": 1.0}, tmp_path / "w.th")
    loaded = load_foreign_state_dict(tmp_path / "w.th")
    target = create_model("resnet8")
    load_state_strict(target, loaded, "resnet8", "w.th")
    assert all(torch.equal(target.state_dict()[k], v) for k, v in model.state_dict().items())


def test_import_cli_round_trip_and_wrong_arch(tmp_path, capsys):
    model = create_model("resnet8")
    torch.save(model.state_dict(), tmp_path / "w.pth")
    out = tmp_path / "w.safetensors"
    with pytest.raises(SystemExit) as exc:
        main(["import", str(tmp_path / "w.pth"), "--arch", "resnet8", "--out", str(out),
              "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"])
    assert exc.value.code == 0
    _, meta = read_checkpoint(out)
    assert meta.mean == (0.5, 0.5, 0.5) and meta.arch == "resnet8"
    with pytest.raises(SystemExit) as exc:
        main(["import", str(tmp_path / "w.pth"), "--arch", "resnet14", "--out", str(tmp_path / "x.safetensors")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "missing" in err and "resnet14" in err and "Traceback" not in err
    assert not (tmp_path / "x.safetensors").exists()


def test_import_grayscale_state_dict_keeps_one_channel(tmp_path, capsys):
    """A 1-channel model's state dict imports as a 1-channel checkpoint (the stem conv decides), with one
    mean/std value (the family's channel averages) and the same outputs as the model that wrote it."""
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=4, in_chans=1).eval()
    torch.save(model.state_dict(), tmp_path / "gray.pth")
    out = tmp_path / "gray.safetensors"
    with pytest.raises(SystemExit) as exc:
        main(["import", str(tmp_path / "gray.pth"), "--arch", "resnet8", "--out", str(out)])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "input channels: 1, as the file's first conv takes (the arch's default: 3)" in printed
    loaded, meta = load_model(out)
    assert meta.in_chans == 1 and tuple(meta.input_size) == (1, 32, 32) and meta.num_classes == 4
    assert meta.mean == (0.4734,) and meta.std == (0.2507,)  # CIFAR-10: (0.4914+0.4822+0.4465)/3, (0.2470+0.2435+0.2616)/3
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(loaded.eval()(x), model(x))
    with pytest.raises(SystemExit) as exc:  # 3 mean values for a 1-channel model: one line, nothing written
        main(["import", str(tmp_path / "gray.pth"), "--arch", "resnet8", "--out", str(tmp_path / "g3.safetensors"),
              "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2"])
    assert exc.value.code == 2 and not (tmp_path / "g3.safetensors").exists()
    err = capsys.readouterr().err
    assert "--mean/--std need 1 values (one per channel)" in err and "Traceback" not in err


@pytest.mark.skipif(not (SHARED / "pretrained-cifar10-resnet").is_dir(), reason="shared pretrained weights absent")
@pytest.mark.parametrize("name,arch", [("resnet20-12fca82f.th", "resnet20"), ("resnet32-d509ac18.th", "resnet32"),
                                       ("resnet56-4bfd9763.th", "resnet56")])
def test_import_shared_pretrained_exactly(name, arch):
    state = load_foreign_state_dict(SHARED / "pretrained-cifar10-resnet" / name)
    model = create_model(arch)  # option-A shortcuts
    load_state_strict(model, state, arch, name)  # raises on any missing/unexpected key


def test_embedded_teacher_metadata(pretrained_teacher):
    _, meta = read_checkpoint(pretrained_teacher)
    assert meta.arch == "resnet20" and meta.num_classes == 10
    assert meta.mean == (0.485, 0.456, 0.406)
    assert json.dumps(meta.class_names).startswith('["airplane"')


def test_meta_for_gives_one_mean_and_std_value_per_channel():
    from compressor.checkpoint import CIFAR_MEAN, CIFAR_STD

    gray = meta_for("resnet8", num_classes=10, input_size=(1, 28, 28))
    assert gray.in_chans == 1 and gray.mean == (0.4734,) and gray.std == (0.2507,)  # CIFAR's channel averages
    assert meta_for("resnet8", num_classes=10).mean == CIFAR_MEAN
    assert meta_for("resnet8", num_classes=10, in_chans=2).std == (0.2507, 0.2507)
    assert meta_for("resnet8", num_classes=10, in_chans=3).std == CIFAR_STD
    with pytest.raises(ValueError, match="mean/std have 3/3 values for 1 channels"):
        meta_for("resnet8", num_classes=10, in_chans=1, mean=CIFAR_MEAN, std=CIFAR_STD)


def test_malformed_onnx_metadata_is_named_as_malformed_not_missing():
    from export.onnx_export import meta_from_onnx_props

    props = meta_for("resnet8", num_classes=10).to_strings()
    with pytest.raises(CompressError, match="no compress metadata"):
        meta_from_onnx_props({k: v for k, v in props.items() if k != "arch"}, "m.onnx")
    with pytest.raises(CompressError, match=r"metadata is malformed \(mean/std have 3/3 values for 1 channels\)"):
        meta_from_onnx_props({**props, "in_chans": "1", "input_size": "[1, 28, 28]"}, "m.onnx")
