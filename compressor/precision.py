"""``--mixed-precision auto``: pick bf16 autocast + channels_last where the hardware
runs bf16 natively and it trains the model faster, fp32 elsewhere.

bf16 is native on CPUs with AVX512-BF16 or AMX-BF16 (measured 1.8-2.4x faster
training and 2.9x faster guide inference than fp32 there for ResNets, DESIGN.md
section 6) and on CUDA GPUs that report bf16 support. Without those instructions
bf16 is emulated and slower than fp32, so ``auto`` keeps fp32. On such a CPU,
``compress train`` and ``compress distill`` pass a speed probe
(:mod:`compressor.precision_probe`): a model to train with depthwise
convolutions is timed for a few steps in both (once per machine, cached), and
fp32 + channels_last wins when it is at least :data:`FP32_MARGIN` times faster
(MobileNetV2-0.35 trained 2.3x faster in fp32 on an AMD EPYC with AVX512-BF16). The choice is printed at the
start of a run and recorded (``config.yaml`` ``precision``, ``summary.json``,
with the probe's timings).
"""
from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# fp32 displaces bf16 on a CPU with native bf16 only when the probe times it this much faster: bf16 is
# the measured default there (ResNets, two CPUs), and a near tie should not flip with the machine's load.
FP32_MARGIN = 1.15
X86_MACHINES = ("x86_64", "amd64", "i686", "i386")  # platform.machine() names of x86 CPUs


@dataclass(frozen=True)
class PrecisionChoice:
    requested: str        # what was asked: auto | no | bf16 | fp16
    mixed_precision: str  # what runs: no | bf16 | fp16 (Accelerate's names)
    channels_last: bool
    reason: str
    probe: dict | None = None  # the speed probe's timings, where auto measured (precision_probe)
    guides: str | None = None  # the guides' inference precision where it differs from the training's

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("probe", "guides"):
            if d[key] is None:  # as recorded before these existed
                del d[key]
        return d

    @property
    def guide_mixed_precision(self) -> str:
        """The precision the guides (teacher, assistants) infer in: the training's, except where the
        probe chose fp32 training on a CPU with native bf16 -- inference stays bf16 there (the slow
        part is the depthwise backward; a ResNet-20 guide at 96 px infers about 2x faster in bf16)."""
        return self.guides or self.mixed_precision

    def describe(self) -> str:
        what = "fp32" if self.mixed_precision == "no" else f"{self.mixed_precision} autocast"
        layout = " + channels_last" if self.channels_last else ""
        guides = f"; guides infer in {self.guides} autocast" if self.guides else ""
        return f"precision: {what}{layout} (--mixed-precision {self.requested}: {self.reason}){guides}"

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
                      environ=None, probe: Callable[[], dict] | None = None,
                      recorded: dict | None = None, machine: str | None = None) -> PrecisionChoice:
    """Resolve ``requested`` (auto | no | bf16 | fp16) for this machine.

    ``channels_last`` None means "not given": on whenever ``auto`` picks for an x86 CPU (bf16
    or fp32) and with bf16 on a GPU, off otherwise; an explicit True/False is kept.
    ``machine``: ``platform.machine()`` unless given (tests). ``cuda``, ``cuda_bf16`` and ``flags``
    default to what this machine reports (tests pass them).

    Under ``accelerate launch`` (its config's ``mixed_precision`` arrives as
    ``ACCELERATE_MIXED_PRECISION``), ``auto`` follows the launch config; an explicit
    ``--mixed-precision`` wins and the reason says it overrides the config.

    ``probe``: on a CPU with native bf16 only, a callable returning
    :func:`compressor.precision_probe.time_training_steps`'s record (plus ``arch``) for the
    model(s) the run trains, or None when it has nothing to measure; fp32 (+ channels_last
    unless given) is chosen when it trains at least :data:`FP32_MARGIN` times faster. A probe that raises leaves bf16 (the reason says
    so). ``recorded``: the ``precision`` block of the run being resumed; a choice its probe made
    is kept (a resumed run does not change precision on a close call).
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
        has = f"the CPU has {', '.join(native)}"
        if (isinstance(recorded, dict) and isinstance(recorded.get("probe"), dict)
                and recorded.get("mixed_precision") in ("no", "bf16")):
            why = str(recorded.get("reason", "")).removeprefix("kept from the run: ")
            return PrecisionChoice("auto", recorded["mixed_precision"], bool(recorded.get("channels_last")),
                                   f"kept from the run: {why}", recorded["probe"],
                                   "bf16" if recorded.get("guides") == "bf16" else None)
        if probe is None:
            return PrecisionChoice("auto", "bf16", channels_last if explicit_cl else True, has)
        return _probed_choice(has, probe, channels_last if explicit_cl else True)
    reason = "the CPU has neither AVX512-BF16 nor AMX, bf16 would be emulated"
    if explicit_cl:
        return PrecisionChoice("auto", "no", bool(channels_last), reason)
    # fp32 on an x86 CPU trains faster channels_last too: 1.06-1.44x on every model of
    # benchmarks/fp32_channels_last.py (docs/performance.md), most for depthwise convolutions.
    # Other CPUs (Arm) keep the default layout: not measured there.
    x86 = (machine or platform.machine()).lower() in X86_MACHINES
    return PrecisionChoice("auto", "no", x86, reason if x86 else f"{reason}; default memory format "
                           "(channels_last is measured faster in fp32 on x86 CPUs only: --channels-last)")


def _probed_choice(has: str, probe: Callable[[], dict], channels_last: bool) -> PrecisionChoice:
    """bf16 or fp32 on a CPU with native bf16 (``has`` says which), by the speed ``probe``."""
    try:
        timing = probe()
        if timing is None:  # the probe found nothing to measure (no depthwise convolution): bf16 as measured
            return PrecisionChoice("auto", "bf16", channels_last, has)
        ms = timing["ms_per_image"]
        fp32, bf16 = float(ms["no"]), float(ms["bf16"])
    except Exception as exc:  # noqa: BLE001 -- a speed heuristic must not stop a run; the model's own errors come later
        return PrecisionChoice("auto", "bf16", channels_last,
                               f"{has}; the speed probe failed ({type(exc).__name__}), bf16 kept")
    what = timing.get("arch", "the model")
    measured = f"{fp32:.3g} vs {bf16:.3g} ms per training image, measured on this machine"
    if fp32 * FP32_MARGIN < bf16:
        return PrecisionChoice("auto", "no", channels_last,
                               f"{has}, but {what} trains {bf16 / fp32:.1f}x faster in fp32: {measured}", timing,
                               guides="bf16")
    return PrecisionChoice("auto", "bf16", channels_last,
                           f"{has}; {what} trains {fp32 / bf16:.1f}x as fast in bf16: {measured}", timing)
