"""The guide-logit cache (``--cache-guides``) at scale: memory, key cost, top-k effect.

Three measurements, each printed as JSON:

* ``memory``: peak RSS growth of filling and then reading a cache of E epochs
  (default 391 steps x 128 images x 100 classes, CIFAR-100-sized: 10 MB per
  epoch), for E = 10 and E = 100, each in a fresh process. With per-epoch
  shards read memory-mapped it does not grow with E (ratio ~1).
* ``fingerprint``: seconds to hash a 50,000 x 3 x 32 x 32 uint8 split (the
  data part of the cache key when the split has no ``fingerprint()``).
* ``topk``: the effect of top-k sparse soft labels on a CIFAR-100-sized task
  (100 classes, synthetic images, 32x32 by default): a resnet14 teacher trained with CE,
  then two resnet8 students distilled through ``GuideLogitCache`` with dense
  and top-k (k=20) logits, same seed, same batches. Reports the students' test
  top-1, their agreement, how much of the KD target the top 20 hold, the KL
  from the dense to the rebuilt target and the relative error of the KD gradient.

Example::

    python benchmarks/guide_cache.py memory fingerprint
    python benchmarks/guide_cache.py topk --n-train 3000 --epochs 8 --image-size 16
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def fill_and_read(epochs: int, steps: int, batch: int, classes: int) -> dict:
    """In this process: fill a cache of ``epochs`` epochs (flush per epoch), then read it all."""
    from compressor.guides import GuideLogitCache

    z = torch.randn(batch, classes)
    with tempfile.TemporaryDirectory() as tmp:
        before = _rss_bytes()
        t0 = time.perf_counter()
        cache = GuideLogitCache(Path(tmp) / "guide", epochs, steps, batch, classes)
        for e in range(epochs):
            for s in range(steps):
                cache.put(e, s, z)
            cache.flush()
        fill_s = time.perf_counter() - t0
        del cache
        t0 = time.perf_counter()
        reader = GuideLogitCache(Path(tmp) / "guide", epochs, steps, batch, classes)
        hits = sum(reader.get(e, s) is not None for e in range(epochs) for s in range(steps))
        read_s = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"epochs": epochs, "peak_rss_growth_mb": round((peak - before) / 1e6, 1),
            "epoch_mb": round(steps * batch * classes * 2 / 1e6, 2), "hits": hits,
            "fill_s": round(fill_s, 2), "read_s": round(read_s, 2)}


def memory(args) -> dict:
    rows = []
    for epochs in args.epochs_list:
        code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import guide_cache; "
                f"print(json.dumps(guide_cache.fill_and_read({epochs}, {args.steps}, {args.batch}, {args.classes})))")
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return {"measurement": "memory", "steps": args.steps, "batch": args.batch, "classes": args.classes,
            "runs": rows, "rss_ratio_last_over_first": round(rows[-1]["peak_rss_growth_mb"]
                                                             / max(rows[0]["peak_rss_growth_mb"], 0.1), 2)}


def fingerprint(args) -> dict:
    from compressor.data import ImageSplit
    from compressor.guides import data_fingerprint

    g = torch.Generator().manual_seed(0)
    split = ImageSplit(torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, generator=g),
                       torch.randint(0, 100, (50_000,), generator=g))
    best = min(_timed(lambda: data_fingerprint(split)) for _ in range(3))
    return {"measurement": "fingerprint", "images": 50_000, "mb": round(split.images.numel() / 1e6, 1),
            "seconds": round(best, 3)}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def topk(args) -> dict:
    from accelerate import Accelerator

    from compressor.config import OptimConfig
    from compressor.data import make_loader, synthetic_data
    from compressor.guides import GuideLogitCache, GuideSet
    from compressor.models import create_model
    from compressor.trainer import LossSettings, build_optimizer, evaluate, lr_at_epoch, train_one_epoch

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    classes, temperature = 100, args.temperature
    size = args.image_size
    data = synthetic_data(num_classes=classes, input_size=(3, size, size), n_train=args.n_train,
                          n_test=args.n_test, seed=0)
    mean = std = (0.5, 0.5, 0.5)
    cfg = OptimConfig(batch_size=args.batch, lr=0.05, schedule="cosine", epochs=args.epochs)
    test_loader = make_loader(data.test, 256, shuffle=False)

    def train(model, guides: GuideSet, loss_cfg: LossSettings):
        opt = build_optimizer(model, cfg)
        m, o, loader = accelerator.prepare(model, opt, make_loader(data.train, args.batch, shuffle=True, seed=1))
        for epoch in range(args.epochs):
            for group in o.param_groups:
                group["lr"] = lr_at_epoch(cfg, epoch, args.epochs)
            loader.set_epoch(epoch)
            train_one_epoch(accelerator, m, guides, loader, o, cfg=cfg, loss_cfg=loss_cfg, mean=mean, std=std,
                            epoch=epoch, stage_seed=2)
        guides.flush()
        accelerator.free_memory()
        return accelerator.unwrap_model(m).eval()

    t0 = time.perf_counter()
    teacher = train(create_model(args.teacher, num_classes=classes), GuideSet([]), LossSettings(kd_weight=0.0))
    teacher_top1 = evaluate(accelerator, teacher, test_loader, mean=mean, std=std)["top1"]
    init = create_model(args.student, num_classes=classes).state_dict()
    students = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, k in (("dense", None), ("topk", 20)):
            cache = GuideLogitCache(Path(tmp) / name, args.epochs, -(-args.n_train // args.batch), args.batch,
                                    classes, temperature=temperature, top_k=k)
            student = create_model(args.student, num_classes=classes)
            student.load_state_dict(init)
            students[name] = train(student, GuideSet([teacher], [cache]),
                                   LossSettings(temperature=temperature, kd_weight=args.kd_weight))

    @torch.no_grad()
    def logits(model):
        return torch.cat([model((x.float() / 255 - 0.5) / 0.5) for x, _ in test_loader])

    from compressor.guides import densify, sparsify

    zt, zd, zk = logits(teacher), logits(students["dense"]), logits(students["topk"])
    labels = data.test.labels
    p = torch.softmax(zt / temperature, 1)
    q = torch.softmax(densify(**sparsify(zt, 20, temperature), num_classes=classes, temperature=temperature)
                      / temperature, 1)
    kl = (p * (p.log() - q.log())).sum(1)
    # the KD gradient w.r.t. the student's logits is T (softmax(z_s/T) - p): its error from top-k rows
    grad_error = (p - q).norm(dim=1) / (torch.softmax(zd / temperature, 1) - p).norm(dim=1)
    top1 = {name: round(100.0 * float((z.argmax(1) == labels).float().mean()), 2)
            for name, z in (("dense", zd), ("topk", zk))}
    return {"measurement": "topk", "classes": classes, "k": 20, "temperature": temperature,
            "n_train": args.n_train, "n_test": args.n_test, "epochs": args.epochs, "teacher": args.teacher,
            "student": args.student, "teacher_top1": round(teacher_top1, 2), "student_top1": top1,
            "top1_difference_topk_minus_dense": round(top1["topk"] - top1["dense"], 2),
            "student_agreement_pct": round(100.0 * float((zd.argmax(1) == zk.argmax(1)).float().mean()), 2),
            "teacher_topk_mass_at_T_mean": round(float(p.topk(20, 1).values.sum(1).mean()), 4),
            "kl_dense_to_topk_target_mean": round(float(kl.mean()), 5),
            "kd_gradient_relative_error_mean": round(float(grad_error.mean()), 4), "image_size": size,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="+", choices=["memory", "fingerprint", "topk"])
    ap.add_argument("--epochs-list", type=int, nargs="+", default=[10, 100], help="memory: cache epochs")
    ap.add_argument("--steps", type=int, default=391, help="memory: steps per epoch")
    ap.add_argument("--classes", type=int, default=100, help="memory: classes")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--n-train", type=int, default=2000, help="topk: training images")
    ap.add_argument("--n-test", type=int, default=1000, help="topk: test images")
    ap.add_argument("--epochs", type=int, default=3, help="topk: epochs of teacher and students")
    ap.add_argument("--image-size", type=int, default=32, help="topk: synthetic image size")
    ap.add_argument("--temperature", type=float, default=5.0, help="topk: KD temperature (paper: 5)")
    ap.add_argument("--kd-weight", type=float, default=1.0, help="topk: KD weight (paper: 1)")
    ap.add_argument("--teacher", default="resnet14")
    ap.add_argument("--student", default="resnet8")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reports = [{"memory": memory, "fingerprint": fingerprint, "topk": topk}[w](args) for w in args.what]
    for r in reports:
        print(json.dumps(r))
    return reports


if __name__ == "__main__":
    main()
