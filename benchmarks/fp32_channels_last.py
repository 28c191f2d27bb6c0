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

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_model_table.py, however the script is run
from _model_table import emit_table, machine_fields, parse_table_args, table_models  # noqa: E402


def main(argv=None) -> dict:
    from compressor.precision_probe import time_training_steps

    args = parse_table_args(__doc__, argv, steps=4, repeats=3)

    rows = []
    for arch, size, kwargs, build in table_models(args.models):
        repeats = []
        for _ in range(args.repeats):  # the two layouts back to back in each repeat
            repeats.append({fmt: time_training_steps(build, size, 10, batch=args.batch, steps=args.steps,
                                                     channels_last=fmt == "channels_last",
                                                     precisions=("no",))["ms_per_image"]["no"]
                            for fmt in ("contiguous", "channels_last")})
        speedups = [round(r["contiguous"] / r["channels_last"], 3) for r in repeats]
        rows.append({"model": arch, "px": size[-1], "options": kwargs, "ms_per_image": repeats,
                     "channels_last_speedup": speedups, "median_speedup": round(statistics.median(speedups), 3)})
        print(f"{arch:>24} @{size[-1]:>3}px  channels_last speed-up {speedups}", flush=True)
    report = {"benchmark": "fp32_channels_last", **machine_fields(args), "rows": rows}
    return emit_table(report, args)


if __name__ == "__main__":
    main()
