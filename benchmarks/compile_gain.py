"""What ``--compile`` (torch.compile) costs and gains, per model, measured in one run.

For each model it times, on the same batches and with the same precision as a
``compress`` run (``--mixed-precision auto`` by default):

  * training steps (SGD, cross-entropy) eager, then through
    :func:`compressor.trainer.compile_for_training`: the first compiled step
    (compilation included) and the steady state after it;
  * guide inference (eval, inference mode), eager and compiled, likewise.

and prints JSON with ``speedup`` = compiled / eager images per second and
``break_even_images`` = how many images a model must train on (or a guide must
label) before the compilation has paid for itself. Random weights: speed does
not depend on them. Machines are noisy: read the ratios.

Example::

    python benchmarks/compile_gain.py --models resnet14,resnet8 --batches 8
    python benchmarks/compile_gain.py --models mobilenetv2_035 --option stem=cifar --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

from compressor.fileio import write_text


def _steps_per_second(fn, batches, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x, y in batches:
            fn(x, y)
        best = min(best, time.perf_counter() - t0)
    return len(batches) / best


def measure(name: str, kwargs: dict, batches, autocast, memfmt, repeats: int) -> dict:
    from compressor.models import create_model
    from compressor.trainer import compile_for_training

    out = {"model": name}
    bs = batches[0][0].shape[0]
    for role in ("train", "guide"):
        torch.manual_seed(0)
        model = create_model(name, **kwargs).to(memory_format=memfmt)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step_with(m):
            def train_step(x, y):
                with autocast():
                    loss = torch.nn.functional.cross_entropy(m(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            def guide_step(x, y):
                with torch.inference_mode(), autocast():
                    m(x)
            return train_step if role == "train" else guide_step

        model.train(role == "train")
        eager = step_with(model)
        eager(*batches[0])  # warm-up
        eager_ips = _steps_per_second(eager, batches, repeats) * bs
        compiled = step_with(compile_for_training(model))
        t0 = time.perf_counter()
        compiled(*batches[0])  # compiles
        first = time.perf_counter() - t0
        compiled(*batches[0])
        compiled_ips = _steps_per_second(compiled, batches, repeats) * bs
        saved_per_image = 1 / eager_ips - 1 / compiled_ips
        out[role] = {"eager_img_s": round(eager_ips, 1), "compiled_img_s": round(compiled_ips, 1),
                     "speedup": round(compiled_ips / eager_ips, 3), "compile_seconds": round(first, 1),
                     "break_even_images": round(first / saved_per_image) if saved_per_image > 0 else None}
    return out


def _print_summary(rows: list[dict]) -> None:
    for r in rows:
        for role in ("train", "guide"):
            m = r[role]
            print(f"{r['model']:18} {role:5} eager {m['eager_img_s']:>8} img/s  compiled {m['compiled_img_s']:>8} "
                  f"img/s  x{m['speedup']}  compile {m['compile_seconds']} s  break-even "
                  f"{m['break_even_images']} images", file=sys.stderr)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet14,resnet8", help="comma-separated zoo names")
    ap.add_argument("--option", action="append", default=[], help="model option KEY=VALUE (all models)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=8, help="batches per timing")
    ap.add_argument("--repeats", type=int, default=2, help="best of N timings")
    ap.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--warm-cache", action="store_true",
                    help="keep torch's on-disk compile cache (default: a fresh one, so compile_seconds is a first "
                         "compilation as a new machine sees it)")
    ap.add_argument("--json", default=None, help="also write the JSON report here")
    args = ap.parse_args(argv)
    if not args.warm_cache:  # read when inductor first compiles, i.e. after this
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile_gain_")
    if args.threads:
        torch.set_num_threads(args.threads)
    from compressor.precision import resolve_precision

    precision = resolve_precision(args.mixed_precision, None)
    print(precision.describe(), file=sys.stderr)
    bf16 = precision.mixed_precision == "bf16"
    memfmt = torch.channels_last if precision.channels_last else torch.contiguous_format

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
                .contiguous(memory_format=memfmt), torch.randint(0, 10, (args.batch_size,), generator=g))
               for _ in range(args.batches)]
    kwargs = dict(kv.split("=", 1) for kv in args.option)
    rows = [measure(name.strip(), kwargs, batches, autocast, memfmt, args.repeats) for name in args.models.split(",")]
    report = {"benchmark": "compile_gain", "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "precision": precision.to_dict(),
              "compile_cache": "warm" if args.warm_cache else "cold", "batch_size": args.batch_size, "image_size": args.image_size, "models": rows}
    _print_summary(rows)
    print(json.dumps(report, indent=2))
    if args.json:  # atomic: a half-written report never replaces a good one
        write_text(args.json, json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
