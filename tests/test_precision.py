"""``--mixed-precision auto``: which hardware gets bf16 + channels_last, and what is recorded."""
import pytest

from compressor.config import DistillConfig, TrainConfig, resolve_config
from compressor.errors import CompressError
from compressor.precision import cpu_flags, resolve_precision

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni
processor\t: 1
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni
"""


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    (tmp_path / "cpuinfo").write_text(CPUINFO)
    assert cpu_flags(tmp_path / "cpuinfo") == {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16", "avx512_vnni"}
    assert cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize("flags,expect,reason", [
    ({"avx512f", "avx512_bf16"}, "bf16", "the CPU has avx512_bf16"),
    ({"amx_bf16", "amx_tile", "avx512_bf16"}, "bf16", "the CPU has amx_bf16, avx512_bf16"),
    ({"avx2", "avx512f"}, "no", "neither AVX512-BF16 nor AMX"),
    (set(), "no", "neither AVX512-BF16 nor AMX"),
])
def test_auto_on_cpu_follows_the_bf16_flags(flags, expect, reason):
    choice = resolve_precision("auto", None, cuda=False, flags=flags)
    assert choice.mixed_precision == expect
    assert choice.channels_last is (expect == "bf16")  # channels_last comes with bf16 when not given
    assert reason in choice.reason and choice.requested == "auto"


def test_auto_on_gpu_follows_bf16_support():
    assert resolve_precision("auto", None, cuda=True, cuda_bf16=True).mixed_precision == "bf16"
    old = resolve_precision("auto", None, cuda=True, cuda_bf16=False, flags={"avx512_bf16"})
    assert (old.mixed_precision, old.channels_last) == ("no", False)  # the GPU decides, not the CPU


def test_explicit_settings_are_kept():
    assert resolve_precision("auto", False, cuda=False, flags={"amx_bf16"}).channels_last is False
    assert resolve_precision("auto", True, cuda=False, flags=set()).channels_last is True
    no = resolve_precision("no", None)
    assert (no.mixed_precision, no.channels_last, no.reason) == ("no", False, "as requested")
    bf16 = resolve_precision("bf16", None)
    assert (bf16.mixed_precision, bf16.channels_last) == ("bf16", False)  # as before: layout only when asked


def test_describe_and_apply():
    choice = resolve_precision("auto", None, cuda=False, flags={"avx512_bf16"})
    assert choice.describe() == ("precision: bf16 autocast + channels_last "
                                 "(--mixed-precision auto: the CPU has avx512_bf16)")
    cfg = choice.apply(resolve_config(TrainConfig, None, {"arch": "resnet8", "out": "x.safetensors"}))
    assert (cfg.mixed_precision, cfg.channels_last, cfg.arch) == ("bf16", True, "resnet8")
    fp32 = resolve_precision("auto", None, cuda=False, flags=set())
    assert fp32.describe().startswith("precision: fp32 (--mixed-precision auto:")


def test_auto_is_the_default_and_choices_are_checked():
    cfg = resolve_config(DistillConfig, None, {"teacher": "t", "target": "resnet8"})
    assert cfg.mixed_precision == "auto" and cfg.channels_last is None
    with pytest.raises(CompressError, match="mixed_precision must be one of auto, no, bf16, fp16; got 'fp8'"):
        resolve_config(DistillConfig, None, {"teacher": "t", "target": "resnet8", "mixed_precision": "fp8"})


def test_runs_with_different_precisions_in_one_process():
    # Accelerate's process-wide state would refuse the second precision ("cannot be changed")
    from compressor.pipeline import make_accelerator

    fp32 = make_accelerator(resolve_config(TrainConfig, None, {"arch": "resnet8", "out": "x.safetensors",
                                                               "mixed_precision": "no"}))
    assert fp32.mixed_precision == "no"
    bf16 = make_accelerator(resolve_config(TrainConfig, None, {"arch": "resnet8", "out": "x.safetensors",
                                                               "mixed_precision": "bf16"}))
    assert bf16.mixed_precision == "bf16"
    again = make_accelerator(resolve_config(TrainConfig, None, {"arch": "resnet8", "out": "x.safetensors",
                                                                "mixed_precision": "no"}))
    assert again.mixed_precision == "no"


def test_auto_follows_the_accelerate_launch_config():
    from compressor.precision import resolve_precision

    launched = {"ACCELERATE_MIXED_PRECISION": "no"}  # `accelerate launch --config_file` with mixed_precision: no
    choice = resolve_precision("auto", flags={"avx512_bf16"}, cuda=False, environ=launched)
    assert choice.mixed_precision == "no" and not choice.channels_last
    assert "accelerate launch config" in choice.reason
    # an explicit flag wins, and says what it overrides
    choice = resolve_precision("bf16", flags={"avx512_bf16"}, cuda=False, environ=launched)
    assert choice.mixed_precision == "bf16" and "overrides the accelerate launch config" in choice.reason
    # not launched by accelerate: auto picks by the hardware
    assert resolve_precision("auto", flags={"avx512_bf16"}, cuda=False, environ={}).mixed_precision == "bf16"
