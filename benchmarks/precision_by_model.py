#!/usr/bin/env python
"""Training speed in fp32 vs bf16 autocast (both channels_last) per model and image size, on this CPU.

What ``--mixed-precision auto``'s speed probe (compressor/precision_probe.py) decides from, for a
table of models: each is timed with the probe's own function (random weights and images, lr 0, one
warm-up step then ``--steps`` timed steps per precision, interleaved, the fastest step of each),
``--repeats`` times, and the JSON gives ms per training image and ``fp32_speedup`` = bf16 ms / fp32 ms
(> 1: fp32 trains faster) per repeat, with what auto would pick (fp32 only at >= FP32_MARGIN, and
only models with depthwise convolutions are probed at all). Machines are noisy: read the spread
of the repeats, and run it on each CPU you deploy training to.

Example::

    OMP_NUM_THREADS=1 python benchmarks/precision_by_model.py --json docs/study/cpu_precision_by_model.json
    python benchmarks/precision_by_model.py --models mobilenetv2_035@96,resnet20@96 --batch 32
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

DEFAULT_MODELS = ("mobilenetv2_035@32", "mobilenetv2_035@96", "mobilenetv2_100@32", "mobilenetv2_100@96",
                  "mobilenetv3_small_050@96", "efficientnet_b0@96", "shufflenetv2_x0_5@96", "regnety_400mf@96",
                  "resnet8@32", "resnet20@96")


def main(argv=None) -> dict:
    import torch

    from compressor.machine import cpu_model
    from compressor.models import create_model, get_entry
    from compressor.models.stems import with_auto_stem
    from compressor.precision import BF16_CPU_FLAGS, FP32_MARGIN, cpu_flags, resolve_precision
    from compressor.precision_probe import has_depthwise, time_training_steps

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="ARCH@PX,... (stem as a run picks it)")
    ap.add_argument("--batch", type=int, default=32, help="images per step [default: the probe's, 32]")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per precision and repeat")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the JSON report here")
    args = ap.parse_args(argv)

    rows = []
    for item in args.models.split(","):
        arch, _, px = item.partition("@")
        size = (3, int(px or 32), int(px or 32))
        kwargs = with_auto_stem(get_entry(arch).builder, {}, size)  # the stem a run at this size gets

        def build():
            return create_model(arch, num_classes=10, **kwargs)
        repeats = [time_training_steps(build, size, 10, batch=args.batch, steps=args.steps)["ms_per_image"]
                   for _ in range(args.repeats)]
        speedups = [round(r["bf16"] / r["no"], 2) for r in repeats]
        depthwise = has_depthwise(build())
        # what auto decides from each repeat's timing: the decision itself, not a copy of its rule
        picks = {"bf16 (not probed)"} if not depthwise else {
            resolve_precision("auto", None, cuda=False, flags=set(BF16_CPU_FLAGS), environ={},
                              probe=lambda r=r: {"ms_per_image": r}).mixed_precision.replace("no", "fp32")
            for r in repeats}
        row = {"model": arch, "px": size[-1], "options": kwargs, "depthwise": depthwise,
               "ms_per_image": repeats, "fp32_speedup": speedups,
               "auto_picks": picks.pop() if len(picks) == 1 else "either (a tie)"}
        rows.append(row)
        print(f"{arch:>24} @{size[-1]:>3}px  fp32 speed-up {speedups}  depthwise={depthwise}  auto: {row['auto_picks']}",
              flush=True)
    report = {"benchmark": "precision_by_model", "cpu": cpu_model(), "machine": platform.machine(),
              "bf16_flags": sorted(set(BF16_CPU_FLAGS) & cpu_flags()), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "batch": args.batch, "steps": args.steps, "fp32_margin": FP32_MARGIN,
              "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))
    return report


if __name__ == "__main__":
    main()
