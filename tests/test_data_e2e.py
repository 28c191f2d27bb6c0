"""Any image size end to end: train -> (distill) -> export -> eval (ONNX) -> bench on generated folders."""
from __future__ import annotations

import json

import onnx
import pytest
import yaml

from compressor.checkpoint import read_checkpoint
from compressor.cli import main

from data_folders import write_mixed_folder, write_uniform_folder


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exc.value.code, captured.out + captured.err


def onnx_input_shape(path) -> list:
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]


def test_image_size_48_train_distill_export_eval(in_tmp, capsys):
    ds = write_mixed_folder(in_tmp / "mixed")
    code, out = run_cli(["train", "--arch", "resnet14", "--data", ds, "--image-size", 48, "--epochs", 1,
                         "--batch-size", 8, "--out", "t.safetensors"], capsys)
    assert code == 2 and "broken.jpg" in out and "broken.png" in out  # both bad files in one report
    code, out = run_cli(["train", "--arch", "resnet14", "--data", ds, "--image-size", 48, "--epochs", 1,
                         "--batch-size", 8, "--skip-bad-images", "--out", "t.safetensors"], capsys)
    assert code == 0, out
    assert "skipped 2 undecodable image files" in out and "normalisation estimated" in out
    _, tmeta = read_checkpoint("t.safetensors")
    assert tmeta.input_size == (3, 48, 48) and tmeta.metrics["skipped_images"] == 2
    assert tmeta.mean != (0.4914, 0.4822, 0.4465)  # estimated on this data, not CIFAR's
    code, out = run_cli(["distill", "--teacher", "t.safetensors", "--target", "resnet8", "--assistants", 0,
                         "--method", "kd", "--data", ds, "--epochs", 1, "--batch-size", 8, "--skip-bad-images",
                         "--data-mode", "stream", "--data-workers", 0, "--latency-backend", "none", "--out", "runs/r"], capsys)
    assert code == 0, out
    assert "image size" not in out or "48" in out
    _, smeta = read_checkpoint(in_tmp / "runs" / "r" / "student.safetensors")
    assert smeta.input_size == (3, 48, 48) and smeta.metrics["data_mode"] == "stream"
    # a streamed training set gets no mixed images for KD (their pixels are not in memory): said and recorded
    assert ("KD on mixes of the training images: off (auto: on, " in out
            and "off: the training images are streamed, not held in memory (--data-mode memory))" in out)
    summary = json.loads((in_tmp / "runs" / "r" / "summary.json").read_text())
    assert summary["kd_mixup"] is False and summary["unlabeled"] is None
    # the KD temperature: auto, 2 for one short epoch; the rule is printed and recorded
    assert "KD temperature: 2 (auto: 2, " in out and "--temperature to set it)" in out
    assert summary["temperature"] == 2.0
    recorded = yaml.safe_load((in_tmp / "runs" / "r" / "config.yaml").read_text())
    assert recorded["temperature"] is None and recorded["temperature_rule"].startswith("auto: 2, ")
    code, out = run_cli(["export", "runs/r", "--out", "s.onnx"], capsys)
    assert code == 0, out
    assert onnx_input_shape("s.onnx")[1:] == [3, 48, 48]
    code, out = run_cli(["eval", "s.onnx", "--data", ds, "--json", "e.json"], capsys)
    assert code == 0, out
    assert json.loads((in_tmp / "e.json").read_text())["n"] == 18  # val/ only; the broken train files unread
    assert "resized to 48x48" in out or "image size: 48x48" in out


@pytest.mark.parametrize("size,mode,chw", [(28, "L", [1, 28, 28]), (96, "RGB", [3, 96, 96])])
def test_folder_train_distill_export_eval_bench_with_only_data(in_tmp, capsys, size, mode, chw):
    ds = write_uniform_folder(in_tmp / "ds", size, mode)
    code, out = run_cli(["train", "--arch", "resnet14", "--data", ds, "--epochs", 1, "--out", "t.safetensors"],
                        capsys)
    assert code == 0, out
    assert f"image size: {size}x{size} (the native size" in out
    _, meta = read_checkpoint("t.safetensors")
    assert list(meta.input_size) == chw and meta.in_chans == chw[0]
    assert meta.metrics["augment"] == ("crop" if mode == "L" else "imagenet")  # grayscale: no mirror, small crop
    # distill with nothing about the data but --data: size, channels and policy follow the teacher
    code, out = run_cli(["distill", "--teacher", "t.safetensors", "--target", "resnet8", "--assistants", 0,
                         "--method", "kd", "--data", ds, "--epochs", 1, "--latency-backend", "none",
                         "--out", "runs/r"], capsys)
    assert code == 0, out
    (in_tmp / "m.safetensors").write_bytes((in_tmp / "runs" / "r" / "student.safetensors").read_bytes())
    _, meta = read_checkpoint("m.safetensors")
    assert meta.arch == "resnet8" and list(meta.input_size) == chw and meta.in_chans == chw[0]
    code, out = run_cli(["export", "m.safetensors"], capsys)
    assert code == 0, out
    assert onnx_input_shape("m.onnx")[1:] == chw
    code, out = run_cli(["eval", "m.onnx", "--data", ds], capsys)
    assert code == 0 and "(6 images, onnxruntime)" in out, out
    code, torch_out = run_cli(["eval", "m.safetensors", "--data", ds], capsys)
    assert code == 0 and "(6 images, torch)" in torch_out
    # the same top-1 from both paths (same size, channels and evaluation transform)
    assert out.split("top-1 ")[1].split("%")[0] == torch_out.split("top-1 ")[1].split("%")[0]
    code, out = run_cli(["bench", "m.onnx", "--warmup", 1, "--iters", 3, "--json", "b.json"], capsys)
    assert code == 0, out
    assert json.loads((in_tmp / "b.json").read_text())["models"][0]["input_shape"] == chw


def test_eval_resizes_other_sized_data_to_the_model(in_tmp, capsys):
    ds = write_uniform_folder(in_tmp / "ds", 40, "RGB", per_class=2)
    assert run_cli(["train", "--arch", "resnet8", "--data", ds, "--epochs", 1, "--out", "m.safetensors"],
                   capsys)[0] == 0
    other = write_uniform_folder(in_tmp / "big", 72, "RGB", per_class=2)
    assert run_cli(["export", "m.safetensors"], capsys)[0] == 0
    for model in ("m.safetensors", "m.onnx"):
        code, out = run_cli(["eval", model, "--data", other], capsys)
        assert code == 0 and "images are 72x72, resized to 40x40" in out, out
