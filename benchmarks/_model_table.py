"""What the per-model CPU speed tables share (precision_by_model.py, fp32_channels_last.py): the
models and image sizes, their options as a run picks them, and the machine the timings come from."""
from __future__ import annotations

import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

DEFAULT_MODELS = ("mobilenetv2_035@32", "mobilenetv2_035@96", "mobilenetv2_100@32", "mobilenetv2_100@96",
                  "mobilenetv3_small_050@96", "efficientnet_b0@96", "shufflenetv2_x0_5@96", "regnety_400mf@96",
                  "resnet8@32", "resnet20@96")


def parse_table_args(doc: str, argv, *, steps: int, repeats: int):
    """The command line both tables take (``doc``: the script's docstring, its first paragraph the description)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="ARCH@PX,... (stem as a run picks it)")
    ap.add_argument("--batch", type=int, default=32, help="images per step [default: the probe's, 32]")
    ap.add_argument("--steps", type=int, default=steps, help="timed steps per setting and repeat")
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--json", default=None, help="write the JSON report here")
    return ap.parse_args(argv)


def table_models(models: str):
    """``(arch, (C, H, W), options, build)`` per ``ARCH@PX`` of ``models``: the stem a run at that size
    gets, and a function making the model (10 classes, random weights)."""
    from compressor.models import create_model, get_entry
    from compressor.models.stems import with_auto_stem

    for item in models.split(","):
        arch, _, px = item.partition("@")
        size = (3, int(px or 32), int(px or 32))
        kwargs = with_auto_stem(get_entry(arch).builder, {}, size)

        def build(arch=arch, kwargs=kwargs):
            return create_model(arch, num_classes=10, **kwargs)
        yield arch, size, kwargs, build


def emit_table(report: dict, args) -> dict:
    """Write ``report`` to ``--json`` (when given), print it without its rows, and return it."""
    from _json_report import emit_report

    emit_report(report, args.json, hide=("rows",))
    return report


def machine_fields(args) -> dict:
    """Where the timings come from: CPU, its native bf16 flags, threads, torch, batch and steps."""
    import torch

    from compressor.machine import cpu_model
    from compressor.precision import BF16_CPU_FLAGS, cpu_flags

    return {"cpu": cpu_model(), "machine": platform.machine(),
            "bf16_flags": sorted(set(BF16_CPU_FLAGS) & cpu_flags()), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "batch": args.batch, "steps": args.steps}
