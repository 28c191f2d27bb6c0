#!/usr/bin/env python
"""fp32 training speed with channels_last vs the default (contiguous) memory format, per model, on this CPU.

What ``--mixed-precision auto`` decides from on a CPU without native bf16 (no AVX512-BF16, no AMX),
where it trains in fp32: each model of the table is timed with the speed probe's own function
(``compressor.precision_probe.time_training_steps``: random weights and images, lr 0, one warm-up step
then ``--steps`` timed steps, the fastest), contiguous and channels_last interleaved, ``--repeats``
times. The JSON gives ms per training image and ``channels_last_speedup`` = contiguous ms /
channels_last ms per repeat (> 1: channels_last trains faster), and the median over the repeats.
Machines are noisy: the two formats of a repeat are timed back to back, so read the ratios.

Example::

    OMP_NUM_THREADS=1 python benchmarks/fp32_channels_last.py --json docs/study/cpu_fp32_channels_last.json
    python benchmarks/fp32_channels_last.py --models mobilenetv2_035@96,resnet20@96 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from precision_by_model import DEFAULT_MODELS  # noqa: E402  (the same table of models)


def main(argv=None) -> dict:
    import torch

    from compressor.machine import cpu_model
    from compressor.models import create_model, get_entry
    from compressor.models.stems import with_auto_stem
    from compressor.precision import BF16_CPU_FLAGS, cpu_flags
    from compressor.precision_probe import time_training_steps

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="ARCH@PX,... (stem as a run picks it)")
    ap.add_argument("--batch", type=int, default=32, help="images per step [default: the probe's, 32]")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per format and repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the JSON report here")
    args = ap.parse_args(argv)

    rows = []
    for item in args.models.split(","):
        arch, _, px = item.partition("@")
        size = (3, int(px or 32), int(px or 32))
        kwargs = with_auto_stem(get_entry(arch).builder, {}, size)  # the stem a run at this size gets

        def build():
            return create_model(arch, num_classes=10, **kwargs)

        repeats = []
        for _ in range(args.repeats):
            ms = {fmt: time_training_steps(build, size, 10, batch=args.batch, steps=args.steps,
                                           channels_last=fmt == "channels_last", precisions=("no",))["ms_per_image"]["no"]
                  for fmt in ("contiguous", "channels_last")}
            repeats.append(ms)
        speedups = [round(r["contiguous"] / r["channels_last"], 3) for r in repeats]
        row = {"model": arch, "px": size[-1], "options": kwargs, "ms_per_image": repeats,
               "channels_last_speedup": speedups, "median_speedup": round(statistics.median(speedups), 3)}
        rows.append(row)
        print(f"{arch:>24} @{size[-1]:>3}px  channels_last speed-up {speedups}", flush=True)
    report = {"benchmark": "fp32_channels_last", "cpu": cpu_model(), "machine": platform.machine(),
              "bf16_flags": sorted(set(BF16_CPU_FLAGS) & cpu_flags()), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "batch": args.batch, "steps": args.steps, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))
    return report


if __name__ == "__main__":
    main()
