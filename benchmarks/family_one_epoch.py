"""One epoch of ``compress train`` on the demo set for the smallest member of every zoo family.

Prints JSON: per family, the model, its final test top-1 (%), the final test
loss and the seconds it took, plus the settings. Chance is 10 % (10 classes);
issue 18 asks for >= 20 % after one epoch with the default settings.

    python benchmarks/family_one_epoch.py [--families mobilenetv3,wrn] [--epochs 1] [--set grad_clip=0] [--out rows.json]

Each family runs in-process with the defaults of ``compress train`` (only
``--epochs`` given), exactly as ``compress train --arch X --data demo --epochs 1``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import yaml


def smallest_members() -> dict:
    from compressor.models import registry

    return {family: registry.family_ladder(family)[0] for family in registry.list_families()}


def precise_bn_top1(path: str, data: str, batches: int) -> float:
    """Test top-1 of the saved model after recomputing its BN statistics on training images (eval view)."""
    from compressor.bn_recalibration import recalibrate_bn
    from compressor.checkpoint import load_model
    from compressor.data import load_data, make_loader, normalize
    from compressor.data.loader import as_eval
    from compressor.trainer import evaluate

    model, meta = load_model(path)
    bundle = load_data(data, image_size=tuple(meta.input_size[1:]), channels=meta.in_chans)
    train = make_loader(as_eval(bundle.train), 128, shuffle=True, seed=0)
    recalibrate_bn(model, (normalize(x, meta.mean, meta.std) for x, _ in train), max_batches=batches)
    test = make_loader(bundle.test, 256, shuffle=False)
    return round(evaluate(None, model, test, mean=meta.mean, std=meta.std)["top1"], 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="", help="comma-separated families [default: all]")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--data", default="demo")
    ap.add_argument("--seed", type=int, default=None, help="training seed [default: compress train's, 20]")
    ap.add_argument("--out", default="", help="also write the JSON here (rows are appended as they finish)")
    ap.add_argument("--precise-bn", type=int, default=0, metavar="N",
                    help="also report top-1 after recomputing BN statistics on N training batches "
                         "(compressor.bn_recalibration; diagnostic column top1_precise_bn)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="KEY=VALUE config override for every family, e.g. --set grad_clip=0 (repeatable)")
    args = ap.parse_args()

    from compressor.config import TrainConfig
    from compressor.pipeline import train_model

    members = smallest_members()
    overrides = {}
    for pair in args.overrides:
        key, _, value = pair.partition("=")
        overrides[key] = yaml.safe_load(value)
    wanted = [f for f in args.families.split(",") if f] or list(members)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in wanted:
            arch = members[family]
            seed = {} if args.seed is None else {"seed": args.seed}
            cfg = TrainConfig(arch=arch, data=args.data, epochs=args.epochs, out=str(Path(tmp) / f"{arch}.safetensors"),
                              **seed, **overrides)
            cfg.validate()
            t0 = time.perf_counter()
            try:
                metrics = train_model(cfg, show_progress=False)
                used = metrics.get("training_defaults", {})
                row = {"family": family, "arch": arch, "top1": metrics["final_test_top1"],
                       "loss": metrics["final_test_loss"], "seconds": round(time.perf_counter() - t0, 1),
                       "optimizer": used.get("optimizer"), "lr": used.get("lr"), "seed": cfg.seed,
                       # what --mixed-precision auto trained it in (the probe may pick fp32 for depthwise convs)
                       "precision": metrics["precision"]["mixed_precision"]}
                if args.precise_bn:
                    row["top1_precise_bn"] = precise_bn_top1(cfg.out, args.data, args.precise_bn)
            except Exception as exc:  # a diverged run is a result, not a crash of the benchmark
                row = {"family": family, "arch": arch, "top1": None, "error": f"{type(exc).__name__}: {exc}",
                       "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(json.dumps({"epochs": args.epochs, "data": args.data, "overrides": overrides,
                      "threads": torch.get_num_threads(),
                      "cpu": platform.processor() or platform.machine(), "load_average": os.getloadavg(),
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
