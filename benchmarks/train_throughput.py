"""DGKD training cost vs its compute floor, measured on the same batches in one run.

For a chain (default resnet20 -> resnet14 -> resnet8, the demo's) it measures:

  (a) images/s of plain cross-entropy training of each trained model (SGD step),
  (b) images/s of guide inference for each guide (inference mode, eval),
  (c) images/s of the real DGKD stage (``compressor.trainer.train_one_epoch``)
      with its guides and stochastic teaching,
  (d) images/s of the data loader (index + augment + normalise) alone,
  (e) images/s of the stage with ``--cache-guides`` once the cache is filled
      (no guide runs: this can beat the floor).

The floor of a stage is ``t(a) + keep · Σ t(b)``: training the model plus running
the guides that are kept (``keep = (k - drop) / k`` of k guides). The script prints
``c / floor`` per stage and the whole chain's time relative to training the
student alone with CE. Random weights (speed does not depend on them).

Example::

    python benchmarks/train_throughput.py --chain resnet20,resnet14,resnet8 --batches 12
    python benchmarks/train_throughput.py --channels-last --mixed-precision bf16 --json out.json
    python benchmarks/train_throughput.py --mixed-precision auto   # what compress picks here (printed)

``--mixed-precision auto`` (the default, as in ``compress``) resolves like a run
does (:mod:`compressor.precision`); ``mixed_precision``/``channels_last`` in the JSON
are the resolved values, ``precision`` records the request and the reason.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from compressor.config import OptimConfig
from compressor.guides import GuideLogitCache, GuideSet
from compressor.data import augment_batch, load_data, make_loader, normalize, subset
from compressor.models import create_model
from compressor.planning import guides_for_stage
from compressor.precision import resolve_precision
from compressor.trainer import LossSettings, build_optimizer, seeded_generator, train_one_epoch

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chain", default="resnet20,resnet14,resnet8", help="teacher,...,student")
    ap.add_argument("--method", default="dgkd", choices=["dgkd", "takd", "kd"])
    ap.add_argument("--drop-guides", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=10, help="batches per measurement")
    ap.add_argument("--repeats", type=int, default=2, help="best of N timings")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                    help="default: on when --mixed-precision auto picks bf16, else off")
    ap.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the JSON report here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from accelerate import Accelerator

    precision = resolve_precision(args.mixed_precision, args.channels_last)
    print(precision.describe(), file=sys.stderr)
    args.mixed_precision, args.channels_last = precision.mixed_precision, precision.channels_last
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    device = accelerator.device
    chain = [c.strip() for c in args.chain.split(",")]
    bundle = load_data("demo")
    args.batches = min(args.batches, len(bundle.train) // args.batch_size)
    n_images = args.batch_size * args.batches
    split = subset(bundle.train, torch.arange(n_images))
    cfg = OptimConfig(batch_size=args.batch_size, channels_last=args.channels_last,
                      mixed_precision=args.mixed_precision, lr=0.01)
    models = {name: create_model(name).to(device) for name in chain}
    memfmt = torch.channels_last if args.channels_last else torch.contiguous_format
    for m in models.values():
        m.to(memory_format=memfmt)

    # the same batches for every measurement: augmented + normalised once up front
    loader = make_loader(split, args.batch_size, shuffle=True, seed=0)
    batches = []
    for step, (x, y) in enumerate(loader):
        x = normalize(augment_batch(x, seeded_generator(0, step)), MEAN, STD).to(device)
        batches.append((x.contiguous(memory_format=memfmt), y.to(device)))

    def loader_pass():
        for step, (x, y) in enumerate(loader):
            normalize(augment_batch(x.to(device), seeded_generator(0, step)), MEAN, STD)

    loader_ips = n_images / _timed(loader_pass, args.repeats)

    def ce_train(name):
        model = models[name].train()
        opt = build_optimizer(model, cfg)

        def run():
            for x, y in batches:
                with accelerator.autocast():
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        run()  # warm-up
        return n_images / _timed(run, args.repeats)

    def guide_infer(name):
        model = models[name].eval()

        def run():
            with torch.inference_mode(), accelerator.autocast():
                for x, _ in batches:
                    model(x)
        run()
        return n_images / _timed(run, args.repeats)

    train_ips = {name: ce_train(name) for name in chain[1:]}
    infer_ips = {name: guide_infer(name) for name in chain[:-1]}

    # (c) the real stage: train_one_epoch over a prepared loader of the same images
    stages = []
    for k, name in enumerate(chain[1:]):
        guide_names = [chain[i] for i in guides_for_stage(args.method, k)]
        model = create_model(name).to(device).to(memory_format=memfmt)
        opt = build_optimizer(model, cfg)
        prepared_model, prepared_opt, prepared_loader = accelerator.prepare(model, opt, make_loader(
            split, args.batch_size, shuffle=True, seed=0))
        guides = GuideSet([models[g] for g in guide_names])
        loss_cfg = LossSettings(temperature=4.0, kd_weight=0.9, drop_guides=args.drop_guides)

        def stage_pass(guide_set):
            prepared_loader.set_epoch(0)
            train_one_epoch(accelerator, prepared_model, guide_set, prepared_loader, prepared_opt, cfg=cfg,
                            loss_cfg=loss_cfg, mean=MEAN, std=STD, epoch=0, stage_seed=1)
        stage_pass(guides)
        t_stage = _timed(lambda: stage_pass(guides), args.repeats)
        # (e) the same stage with --cache-guides after a first pass filled the cache: no guide runs
        with tempfile.TemporaryDirectory() as tmp:
            caches = [GuideLogitCache(Path(tmp) / f"{g}.safetensors", 1, args.batches, args.batch_size, 10)
                      for g in guide_names]
            cached = GuideSet([models[g] for g in guide_names], caches)
            loss_cfg_nodrop = LossSettings(temperature=4.0, kd_weight=0.9, drop_guides=0)
            prepared_loader.set_epoch(0)
            train_one_epoch(accelerator, prepared_model, cached, prepared_loader, prepared_opt, cfg=cfg,
                            loss_cfg=loss_cfg_nodrop, mean=MEAN, std=STD, epoch=0, stage_seed=1)
            t_cached = _timed(lambda: stage_pass(cached), args.repeats)
        kept = len(guides) - min(args.drop_guides, max(len(guides) - 1, 0))
        keep = kept / len(guides) if guides else 0.0
        floor = n_images / train_ips[name] + keep * sum(n_images / infer_ips[g] for g in guide_names)
        stages.append({"model": name, "guides": guide_names, "kept_per_batch": kept,
                       "stage_img_s": round(n_images / t_stage, 1), "floor_img_s": round(n_images / floor, 1),
                       "stage_over_floor": round(t_stage / floor, 3),
                       "cached_stage_img_s": round(n_images / t_cached, 1),
                       "cached_stage_over_floor": round(t_cached / floor, 3),
                       "seconds_per_epoch_of_50k": round(50_000 * t_stage / n_images, 1)})
        accelerator.free_memory()

    student_alone = n_images / train_ips[chain[-1]]
    chain_time = sum(n_images / s["stage_img_s"] for s in stages)
    report = {
        "benchmark": "train_throughput", "chain": chain, "method": args.method, "drop_guides": args.drop_guides,
        "batch_size": args.batch_size, "images": n_images, "channels_last": args.channels_last,
        "mixed_precision": args.mixed_precision, "precision": precision.to_dict(), "device": str(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "loader_img_s": round(loader_ips, 1),
        "ce_train_img_s": {k: round(v, 1) for k, v in train_ips.items()},
        "guide_infer_img_s": {k: round(v, 1) for k, v in infer_ips.items()},
        "stages": stages,
        "chain_over_student_alone": round(chain_time / student_alone, 3),
        "loader_over_student_train": round(loader_ips / train_ips[chain[-1]], 1),
    }
    print(f"{'stage':10} {'guides':28} {'stage img/s':>11} {'floor img/s':>11} {'stage/floor':>11} "
          f"{'cached img/s':>12} {'cached/floor':>12}", file=sys.stderr)
    for s in stages:
        print(f"{s['model']:10} {','.join(s['guides']):28} {s['stage_img_s']:>11} {s['floor_img_s']:>11} "
              f"{s['stage_over_floor']:>11} {s['cached_stage_img_s']:>12} {s['cached_stage_over_floor']:>12}",
              file=sys.stderr)
    print(f"chain / student alone: {report['chain_over_student_alone']}x; loader {report['loader_img_s']} img/s "
          f"= {report['loader_over_student_train']}x student training", file=sys.stderr)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
