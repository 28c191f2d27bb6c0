#!/usr/bin/env python
"""Memory vs streaming data on a generated ImageFolder of 224-px JPEGs.

Builds, in a temporary folder, an ImageFolder of 224x224 JPEGs (the embedded
demo images, upscaled; 10 classes, 10% in val/) with ``--large`` images (2,000
distinct files, the rest hard links to them), and a second root with the first
``--small`` of them (hard links). Then measures:

* ``load``: peak RSS (``VmHWM`` of a fresh subprocess) and wall
  time of ``load_data(root, mode=memory|stream)``; the stream run also pulls
  ``--stream-batches`` training batches through the loader (2 workers); the
  workers' own peak (``getrusage`` children, shared pages counted again) is
  ``children_max_rss_mb``. ``bare_rss_mb`` is a subprocess that imports the
  same modules and loads nothing. Targets: memory peak <= 1.5 x decoded bytes
  + bare; stream peak at ``--large`` <= 1.1 x stream peak at ``--small``.
* ``decode``: images/s of torchvision.io ``decode_jpeg`` vs Pillow on the files.
* ``loader``: img/s of the streaming training loader (imagenet policy:
  RandomResizedCrop + flip, 12 batches of 64, worker start-up included) with
  0, 1 and 2 workers.
* ``train``: img/s of SGD steps of torchvision-size ResNet-18 at 224 px
  (batch 16, fp32) on this machine. Target: loader img/s (best worker count)
  >= 1.5 x train img/s.
* ``multiprocess_stream``: torchrun with 2 CPU processes (gloo), stream mode,
  10 batches of 32 per process: images each process decoded (disjoint sets)
  and its peak RSS.
* ``index`` (with ``--index N``): a third folder of N images (hard links), loaded in stream
  mode only (list the files, read every header): wall time, peak RSS and the RSS it adds per
  1,000 files over the ``--small`` stream load (the file list and the header results; a
  future per file cost about 2 KB before the reads went in chunks).
* ``auto``: what ``--data-mode auto`` chooses here for the demo set, a
  CIFAR-10-sized set, this 224-px folder and ImageNet-1k (decoded bytes).

Prints one JSON object on stdout and a table on stderr.

Usage: ``python benchmarks/data_loader.py [--small 2000] [--large 20000] [--index 200000] [--keep DIR]``
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import torch
from compressor.data import load_data, make_loader
root, mode, batches = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
n = 0
if mode != "bare":
    b = load_data(root, mode=mode)
    load_s = time.perf_counter() - t0
    if mode == "stream" and batches:
        for k, (x, y) in enumerate(make_loader(b.train, 64, shuffle=True, seed=0, policy=b.augment, workers=2)):
            n += len(y)
            if k + 1 == batches:
                break
    images = len(b.train) + len(b.test)
    size = list(b.input_size)
else:
    load_s, images, size = 0.0, 0, None
# VmHWM: this process's own peak (ru_maxrss would include the parent's RSS at fork)
ru = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
ch = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"load_s": round(load_s, 2), "wall_s": round(time.perf_counter() - t0, 2), "images": images,
                  "input_size": size, "peak_rss_mb": round(ru, 1), "children_max_rss_mb": round(ch, 1),
                  "streamed_images": n}))
"""


def make_folder(root: Path, n: int, unique: int = 2000, seed: int = 0) -> None:
    """``n`` 224-px JPEGs, 10% in val/: ``unique`` distinct ones from the demo images (bilinear
    upscale, random flip), the rest hard links to them (same class), so building 20,000 takes seconds."""
    import torch
    import torch.nn.functional as F
    from torchvision.io import encode_jpeg

    from compressor.data import load_data

    demo = load_data("demo")
    src, labels = torch.cat([demo.train.images, demo.test.images]), torch.cat([demo.train.labels, demo.test.labels])
    names = demo.class_names
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(src), generator=g)  # classes mixed in every prefix of the numbering
    n_val = n // 10
    made: list[tuple[Path, str]] = []

    def dest(i: int, cls: str) -> Path:
        d = root / ("val" if i < n_val else "train") / cls
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{i:07d}.jpg"

    for start in range(0, min(n, unique), 256):
        idx = torch.arange(start, min(start + 256, n, unique))
        x = F.interpolate(src[perm[idx % len(src)]].float(), size=(224, 224), mode="bilinear", align_corners=False)
        flip = torch.rand(len(idx), generator=g) < 0.5
        x[flip] = x[flip].flip(-1)
        x = x.round().clamp(0, 255).to(torch.uint8)
        for j, i in enumerate(idx.tolist()):
            cls = names[int(labels[perm[i % len(src)]])]
            path = dest(i, cls)
            path.write_bytes(encode_jpeg(x[j], quality=90).numpy().tobytes())
            made.append((path, cls))
    for i in range(len(made), n):
        path, cls = made[i % len(made)]
        os.link(path, dest(i, cls))


def link_subset(src: Path, dst: Path, n: int) -> None:
    """The first ``n`` images of ``src`` (by number), 10% of them in val/, as hard links."""
    n_val = n // 10
    train = sorted((src / "train").rglob("*.jpg"), key=lambda p: int(p.stem))[: n - n_val]
    val = sorted((src / "val").rglob("*.jpg"), key=lambda p: int(p.stem))[:n_val]
    for f in train + val:
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, out)


def child(root: Path | str, mode: str, batches: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", CHILD, str(root), mode, str(batches)], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{mode} load of {root} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


MP_CHILD = r"""
import json, sys
import torch
from accelerate import Accelerator
from compressor.data import load_data, make_loader
from compressor.data.stream import StreamDataset
root, batches = sys.argv[1], int(sys.argv[2])
acc = Accelerator(cpu=True)
seen = []
original = StreamDataset._one
StreamDataset._one = lambda self, key: (seen.append(key), original(self, key))[1]
b = load_data(root, mode="stream")
loader = acc.prepare(make_loader(b.train, 32, shuffle=True, seed=0, workers=0))
loader.set_epoch(0)
for k, _ in enumerate(loader):
    if k + 1 == batches:
        break
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print("MP " + json.dumps({"rank": acc.process_index, "world": acc.num_processes, "decoded": len(seen),
                          "peak_rss_mb": round(hwm, 1), "indices": sorted(seen)}), flush=True)
"""


def multiprocess(root: Path, batches: int = 10) -> dict:
    """torchrun, 2 CPU processes (gloo): each decodes its own batches; per-process peak RSS."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(MP_CHILD)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), fh.name, str(root), str(batches)], env=env, capture_output=True, text=True)
    os.unlink(fh.name)
    if out.returncode:
        raise SystemExit(f"torchrun failed:\n{out.stderr[-3000:]}")
    ranks = sorted((json.loads(line[3:]) for line in out.stdout.splitlines() if line.startswith("MP ")),
                   key=lambda r: r["rank"])
    a, b = (set(r.pop("indices")) for r in ranks)
    return {"processes": ranks, "disjoint": not (a & b), "decoded_total": len(a) + len(b)}


def decode_rates(files: list[Path]) -> dict:
    import io

    import numpy as np
    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    from compressor.data.formats import quiet_torchvision

    blobs = [f.read_bytes() for f in files]
    t0 = time.perf_counter()
    with quiet_torchvision():
        for b in blobs:
            decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB)
    tv = len(blobs) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for b in blobs:
        with Image.open(io.BytesIO(b)) as im:
            torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    pil = len(blobs) / (time.perf_counter() - t0)
    return {"torchvision_img_s": round(tv, 1), "pillow_img_s": round(pil, 1), "files": len(blobs)}


def loader_rates(root: Path, workers_list=(0, 1, 2), batches: int = 12, batch: int = 64) -> dict:
    from compressor.data import load_data, make_loader

    b = load_data(str(root), mode="stream", splits=("train",))
    out = {}
    for w in workers_list:
        loader = make_loader(b.train, batch, shuffle=True, seed=0, policy="imagenet", workers=w)
        n = k = 0
        t0 = time.perf_counter()  # worker start-up included: that is what an epoch pays
        for epoch in range(10**6):
            loader.sampler.set_epoch(epoch)
            for _, y in loader:
                n += len(y)
                k += 1
                if k == batches:
                    break
            if k == batches:
                break
        out[str(w)] = round(n / (time.perf_counter() - t0), 1)
    return out


def train_rate(steps: int = 3, batch: int = 16) -> float:
    import torch
    import torch.nn.functional as F

    from compressor.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 10, (batch,))

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def auto_choices(n_large: int) -> dict:
    from compressor.data import choose_mode

    cases = {"demo (6,000 x 32 px)": 6000 * 3 * 32 * 32, "CIFAR-10 (60,000 x 32 px)": 60000 * 3 * 32 * 32,
             f"224-px folder ({n_large:,} images)": n_large * 3 * 224 * 224,
             "ImageNet-1k train+val at 224 px (1,331,167)": 1_331_167 * 3 * 224 * 224}
    return {k: choose_mode("auto", v, processes=1)[1] for k, v in cases.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--large", type=int, default=20000)
    ap.add_argument("--stream-batches", type=int, default=10)
    ap.add_argument("--index", type=int, default=0,
                    help="also index a folder of this many images in stream mode (e.g. 200000; 0: skip)")
    ap.add_argument("--keep", default=None, help="build the folders here and keep them (default: a temp dir)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    tmp = None
    if args.keep:
        base = Path(args.keep)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="compress-data-bench-")
        base = Path(tmp.name)
    big, small = base / f"jpeg224-{args.large}", base / f"jpeg224-{args.small}"
    t0 = time.perf_counter()
    if not big.exists():
        make_folder(big, args.large)
    if not small.exists():
        link_subset(big, small, args.small)
    make_s = time.perf_counter() - t0

    bare = child("demo", "bare", 0)
    load = {}
    for n, root in ((args.small, small), (args.large, big)):
        for mode in ("memory", "stream"):
            r = child(root, mode, args.stream_batches)
            r["decoded_mb"] = round(r["images"] * 3 * 224 * 224 / 1e6, 1)
            load[f"{mode}_{n}"] = r
    for n in (args.small, args.large):
        m = load[f"memory_{n}"]
        m["rss_over_decoded_plus_bare"] = round(m["peak_rss_mb"] / (m["decoded_mb"] + bare["peak_rss_mb"]), 3)
    stream_growth = load[f"stream_{args.large}"]["peak_rss_mb"] / load[f"stream_{args.small}"]["peak_rss_mb"]
    decode = decode_rates(sorted(small.rglob("*.jpg"))[:300])
    loader = loader_rates(small)
    train_img_s = train_rate()
    mp = multiprocess(small)
    index = None
    if args.index:
        root = base / f"jpeg224-{args.index}"
        if not root.exists():
            make_folder(root, args.index)
        r = child(root, "stream", 0)
        added = r["peak_rss_mb"] - load[f"stream_{args.small}"]["peak_rss_mb"]
        index = {**r, "rss_mb_per_1000_files": round(1000 * added / max(1, args.index - args.small), 3)}
    best_loader = max(loader.values())
    result = {
        "benchmark": "data_loader", "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "folder_build_s": round(make_s, 1), "bare_rss_mb": bare["peak_rss_mb"], "load": load,
        "targets": {
            "memory_rss_over_decoded_plus_bare_max": max(load[f"memory_{n}"]["rss_over_decoded_plus_bare"]
                                                         for n in (args.small, args.large)),
            "memory_target": 1.5,
            "stream_rss_large_over_small": round(stream_growth, 3), "stream_target": 1.1,
            "loader_over_train": round(best_loader / train_img_s, 2), "loader_target": 1.5,
        },
        "decode": decode, "stream_loader_img_s_by_workers": loader,
        "train_resnet18_224_img_s": round(train_img_s, 2), "auto": auto_choices(args.large),
        "multiprocess_stream": mp, "index": index,
    }
    print(json.dumps(result))
    e = sys.stderr
    print(f"bare process RSS {bare['peak_rss_mb']:.0f} MB; folder built in {make_s:.0f} s", file=e)
    print(f"{'run':<16}{'images':>8}{'decoded MB':>12}{'peak RSS MB':>13}{'workers MB':>12}{'load s':>9}", file=e)
    for k, r in load.items():
        print(f"{k:<16}{r['images']:>8}{r['decoded_mb']:>12.0f}{r['peak_rss_mb']:>13.0f}"
              f"{r['children_max_rss_mb']:>12.0f}{r['load_s']:>9.1f}", file=e)
    print(f"decode img/s: torchvision {decode['torchvision_img_s']:.0f}, Pillow {decode['pillow_img_s']:.0f}", file=e)
    print("stream loader img/s (imagenet policy) by workers: "
          + ", ".join(f"{w}: {v:.0f}" for w, v in loader.items()), file=e)
    print(f"resnet18 @224 training img/s: {train_img_s:.1f}", file=e)
    print("torchrun 2 CPU processes, stream, 10 batches of 32 each: "
          + "; ".join(f"rank {r['rank']} decoded {r['decoded']} images, peak RSS {r['peak_rss_mb']:.0f} MB"
                      for r in mp["processes"]) + f"; disjoint: {mp['disjoint']}", file=e)
    if index is not None:
        print(f"index {args.index} files (stream, headers only): {index['load_s']:.1f} s, peak RSS "
              f"{index['peak_rss_mb']:.0f} MB, +{index['rss_mb_per_1000_files']:.2f} MB per 1,000 files", file=e)
    for k, v in result["targets"].items():
        print(f"  {k}: {v}", file=e)
    for k, v in result["auto"].items():
        print(f"  auto for {k}: {v}", file=e)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
