#!/usr/bin/env python
"""Is data loading ever the bottleneck? Loader throughput vs resnet8 training throughput.

Measures, in one process on the same machine:

* ``load_s``: wall time of ``load_data("demo")`` (decode the embedded JPEGs once);
* ``loader_img_s``: images/s of the training input pipeline on the demo train
  split -- ``make_loader`` batches of 128 (shuffled), ``augment_batch``
  (crop pad 4 + flip) and ``normalize`` -- i.e. everything a training step
  needs before the forward pass;
* ``train_img_s``: images/s of resnet8 SGD training steps (batch 128, fp32,
  forward + cross-entropy + backward + step) on the same batches;
* ``ratio`` = loader_img_s / train_img_s (how many times faster the input
  pipeline is than the model) and ``data_share`` = train_img_s / loader_img_s
  (the fraction of a step's time spent on data if both run serially).

Prints one JSON object on stdout and a short table on stderr. Runs in well under a minute.

Usage: ``python benchmarks/data_loader.py [--batch 128] [--epochs 3] [--steps 30] [--warmup 5] [--device cpu]``
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3, help="loader passes over the 5,000 demo images")
    ap.add_argument("--steps", type=int, default=30, help="timed resnet8 training steps")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    from compressor.checkpoint import CIFAR_MEAN, CIFAR_STD
    from compressor.data import augment_batch, load_data, make_loader, normalize
    from compressor.models import create_model

    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)

    import torchvision.io  # noqa: F401  (import cost is not load cost)
    t0 = time.perf_counter()
    data = load_data("demo")
    load_s = time.perf_counter() - t0

    loader = make_loader(data.train, args.batch, shuffle=True, seed=0, drop_last=True)
    gen = torch.Generator().manual_seed(0)

    def pipeline(x):
        return normalize(augment_batch(x.to(dev, non_blocking=True), gen), CIFAR_MEAN, CIFAR_STD)

    # --- loader + augmentation + normalisation
    for x, _ in loader:  # warm-up pass
        pipeline(x)
        break
    n_img = 0
    sync()
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        loader.sampler.set_epoch(epoch)
        for x, y in loader:
            xb = pipeline(x)
            y.to(dev)
            n_img += xb.shape[0]
    sync()
    loader_s = time.perf_counter() - t0
    loader_img_s = n_img / loader_s

    # --- resnet8 training steps on pre-made batches (model cost only)
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=data.num_classes).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    batches = []
    loader.sampler.set_epoch(100)
    for x, y in loader:
        batches.append((pipeline(x), y.to(dev)))
        if len(batches) == 8:
            break

    def step(i):
        xb, yb = batches[i % len(batches)]
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(args.warmup):
        step(i)
    sync()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i)
    sync()
    train_s = time.perf_counter() - t0
    train_img_s = args.steps * args.batch / train_s

    result = {
        "benchmark": "data_loader",
        "device": str(dev),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "batch": args.batch,
        "demo_train_images": len(data.train),
        "load_s": round(load_s, 3),
        "loader_epochs": args.epochs,
        "loader_images": n_img,
        "loader_s": round(loader_s, 3),
        "loader_img_s": round(loader_img_s, 1),
        "train_model": "resnet8",
        "train_warmup_steps": args.warmup,
        "train_steps": args.steps,
        "train_s": round(train_s, 3),
        "train_img_s": round(train_img_s, 1),
        "ratio": round(loader_img_s / train_img_s, 2),
        "data_share": round(train_img_s / loader_img_s, 4),
    }
    print(json.dumps(result))
    print(f"{'stage':<44}{'img/s':>12}", file=sys.stderr)
    print(f"{'loader + augment_batch + normalize':<44}{loader_img_s:>12.0f}", file=sys.stderr)
    print(f"{'resnet8 SGD train step (batch %d)' % args.batch:<44}{train_img_s:>12.0f}", file=sys.stderr)
    print(f"{'ratio loader / train':<44}{loader_img_s / train_img_s:>12.1f}x", file=sys.stderr)
    print(f"{'load_data(demo) seconds':<44}{load_s:>12.2f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
