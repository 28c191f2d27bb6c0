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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_model_table.py, however the script is run
from _model_table import emit_table, machine_fields, parse_table_args, table_models  # noqa: E402


def main(argv=None) -> dict:
    from compressor.precision import BF16_CPU_FLAGS, FP32_MARGIN, resolve_precision
    from compressor.precision_probe import has_depthwise, time_training_steps

    args = parse_table_args(__doc__, argv, steps=6, repeats=2)

    rows = []
    for arch, size, kwargs, build in table_models(args.models):
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
    report = {"benchmark": "precision_by_model", **machine_fields(args), "fp32_margin": FP32_MARGIN, "rows": rows}
    return emit_table(report, args)


if __name__ == "__main__":
    main()
