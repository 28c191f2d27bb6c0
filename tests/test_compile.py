"""--compile: torch.compile for the trained model and its guides (compressor.trainer.compile_for_training)."""
import pytest
import torch
from safetensors.torch import load_file

import compressor.trainer as trainer
from compressor.config import DistillConfig, resolve_config
from compressor.data import synthetic_data
from compressor.pipeline import run_distillation
from conftest import run_cli_inprocess


def _kd_run(tmp_path, teacher, name, **extra):
    cfg = resolve_config(DistillConfig, None, dict(teacher=str(teacher), target="resnet8", method="kd", epochs=1,
                                                   batch_size=32, out=str(tmp_path / name), seed=5, lr=0.05,
                                                   latency_backend="none", mixed_precision="no", **extra))
    return run_distillation(cfg, data=synthetic_data(num_classes=10, n_train=64, n_test=32, seed=1),
                            show_progress=False)


def test_compiled_training_matches_eager(tmp_path, pretrained_teacher, monkeypatch, one_torch_thread):
    compiled = []
    real = trainer.compile_for_training
    monkeypatch.setattr(trainer, "compile_for_training", lambda m: compiled.append(type(m).__name__) or real(m))
    _kd_run(tmp_path, pretrained_teacher, "eager")
    assert compiled == []
    _kd_run(tmp_path, pretrained_teacher, "compiled", compile=True)
    assert sorted(compiled) == ["CifarResNet", "CifarResNet"]  # the teacher (guide) and the student
    eager = load_file(str(tmp_path / "eager" / "student.safetensors"))
    comp = load_file(str(tmp_path / "compiled" / "student.safetensors"))
    assert eager.keys() == comp.keys()  # the plain module is saved: no "_orig_mod." prefixes
    # Same init, batches and steps: the compiled kernels only reorder float sums. (Had the wrapper
    # trained a copy, the saved student would still be its initialisation, far from the eager one.)
    for k in eager:
        torch.testing.assert_close(comp[k], eager[k], rtol=1e-3, atol=1e-4)


def test_compile_without_a_cpp_compiler_is_refused(in_tmp, pretrained_teacher, monkeypatch, capsys):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(trainer.shutil, "which", lambda name: None)
    code, out, err = run_cli_inprocess(["distill", "--teacher", pretrained_teacher, "--target", "resnet8",
                                        "--data", "demo", "--train-subset", "64", "--epochs", "1", "--compile",
                                        "--out", "runs/c"], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: --compile on the CPU needs a C++ compiler")
    assert "Traceback" not in err
    assert not (in_tmp / "runs" / "c").exists()  # refused before the run directory is made


def test_compile_may_change_on_resume_but_the_seed_may_not(tmp_path):
    import yaml

    from compressor.errors import CompressError
    from compressor.config import config_to_dict
    from compressor.pipeline import _check_resume_config

    cfg = resolve_config(DistillConfig, None, dict(teacher="t.safetensors", target="resnet8", out=str(tmp_path)))
    written = config_to_dict(cfg)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(written))
    _check_resume_config(tmp_path, {**written, "compile": True})  # a speed switch: accepted
    with pytest.raises(CompressError, match="seed: 20 -> 21"):
        _check_resume_config(tmp_path, {**written, "compile": True, "seed": 21})

