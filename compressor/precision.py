"""``--mixed-precision auto``: pick bf16 autocast + channels_last where the hardware
runs bf16 natively, fp32 elsewhere.

bf16 is native on CPUs with AVX512-BF16 or AMX-BF16 (measured 1.8-2.4x faster
training and 2.9x faster guide inference than fp32 there, DESIGN.md section 6)
and on CUDA GPUs that report bf16 support. Without those instructions bf16 is
emulated and slower than fp32, so ``auto`` keeps fp32. The choice is printed at
the start of a run and recorded (``config.yaml`` ``precision``, ``summary.json``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class PrecisionChoice:
    requested: str        # what was asked: auto | no | bf16 | fp16
    mixed_precision: str  # what runs: no | bf16 | fp16 (Accelerate's names)
    channels_last: bool
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        what = "fp32" if self.mixed_precision == "no" else f"{self.mixed_precision} autocast"
        layout = " + channels_last" if self.channels_last else ""
        return f"precision: {what}{layout} (--mixed-precision {self.requested}: {self.reason})"

    def apply(self, cfg):
        """A copy of ``cfg`` with the resolved ``mixed_precision`` and ``channels_last``."""
        return replace(cfg, mixed_precision=self.mixed_precision, channels_last=self.channels_last)


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is missing)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


LAUNCHER_ENV = "ACCELERATE_MIXED_PRECISION"  # set by `accelerate launch` from its config / --mixed_precision


def launcher_precision(environ=None) -> str | None:
    """The precision an ``accelerate launch`` config asked for (``no``/``bf16``/``fp16``), or None."""
    import os

    value = (os.environ if environ is None else environ).get(LAUNCHER_ENV, "").strip().lower()
    return value if value in ("no", "bf16", "fp16") else None


def resolve_precision(requested: str, channels_last: bool | None = None, *, cuda: bool | None = None,
                      cuda_bf16: bool | None = None, flags: set[str] | None = None,
                      environ=None) -> PrecisionChoice:
    """Resolve ``requested`` (auto | no | bf16 | fp16) for this machine.

    ``channels_last`` None means "not given": on with bf16 chosen by ``auto``, off
    otherwise; an explicit True/False is kept. ``cuda``, ``cuda_bf16`` and ``flags``
    default to what this machine reports (tests pass them).

    Under ``accelerate launch`` (its config's ``mixed_precision`` arrives as
    ``ACCELERATE_MIXED_PRECISION``), ``auto`` follows the launch config; an explicit
    ``--mixed-precision`` wins and the reason says it overrides the config.
    """
    explicit_cl = channels_last is not None
    launcher = launcher_precision(environ)
    if requested != "auto":
        reason = "as requested"
        if launcher is not None and launcher != requested:
            reason += f"; overrides the accelerate launch config's mixed_precision: {launcher}"
        return PrecisionChoice(requested, requested, bool(channels_last), reason)
    if launcher is not None:
        return PrecisionChoice("auto", launcher, channels_last if explicit_cl else launcher == "bf16",
                               f"the accelerate launch config says mixed_precision: {launcher}")
    if cuda is None or (cuda and cuda_bf16 is None):
        import torch

        cuda = torch.cuda.is_available() if cuda is None else cuda
        if cuda and cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_bf16_supported()
    if cuda:
        if cuda_bf16:
            return PrecisionChoice("auto", "bf16", channels_last if explicit_cl else True, "the GPU supports bf16")
        return PrecisionChoice("auto", "no", bool(channels_last), "the GPU has no bf16 support")
    native = sorted(set(BF16_CPU_FLAGS) & (cpu_flags() if flags is None else set(flags)))
    if native:
        return PrecisionChoice("auto", "bf16", channels_last if explicit_cl else True,
                               f"the CPU has {', '.join(native)}")
    return PrecisionChoice("auto", "no", bool(channels_last),
                           "the CPU has neither AVX512-BF16 nor AMX, bf16 would be emulated")
