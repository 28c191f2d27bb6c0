#!/usr/bin/env python
"""Memory a streaming DataLoader worker adds by reading the split's file paths.

A forked worker shares its parent's pages until it writes to them. Reading a str
from a Python list writes its reference count, so a worker that reads every path
of an epoch ends up with a private copy of every page the strings live on
(PyTorch issue 13246). ``FileSplit`` packs the paths into one buffer
(:class:`compressor.data.stream.FileList`). For ``--paths`` N ImageNet-style paths
(``/data/imagenet/train/n01440764/n01440764_123456.JPEG``), each layout is built in
a fresh process, which then forks ``--workers`` children that read every path once;
reported per layout: the children's added private dirty memory (``Private_Dirty`` of
``/proc/self/smaps_rollup`` after the reads minus before; Linux only), the parent's
RSS growth for holding the paths, build time and the time a child takes to read them
all. Goal: a FileList worker adds at most 5 % of what a list worker adds.

Prints one JSON object. Usage: ``python benchmarks/file_list_memory.py [--paths 1000000] [--workers 2]``
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _json_report import emit_report  # noqa: E402

CHILD = r'''
import gc, json, os, sys, time
from compressor.data.stream import FileList

def private_dirty_mb():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Private_Dirty"):
            return int(line.split()[1]) / 1024

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

n, workers, layout = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
before = rss_mb()
t = time.perf_counter()
paths = [f"/data/imagenet/train/n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG" for i in range(n)]
if layout == "FileList":
    paths = FileList(paths)
build = time.perf_counter() - t
gc.collect()
gc.freeze()  # what the DataLoader's fork sees: nothing left for the collector to touch
held = rss_mb() - before
out = []
for _ in range(workers):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        start = private_dirty_mb()
        t = time.perf_counter()
        total = sum(len(paths[i]) for i in range(n))
        os.write(w, json.dumps({"added_mb": private_dirty_mb() - start, "read_s": time.perf_counter() - t,
                                "chars": total}).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as fh:
        out.append(json.loads(fh.read()))
    os.waitpid(pid, 0)
print(json.dumps({"build_s": build, "held_mb": held, "workers": out}))
'''


def measure(n: int, workers: int, layout: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", CHILD, str(n), str(workers), layout], env=env,
                          capture_output=True, text=True, check=True)
    raw = json.loads(done.stdout)
    added = [w["added_mb"] for w in raw["workers"]]
    return {"parent_holds_mb": round(raw["held_mb"], 1), "build_s": round(raw["build_s"], 3),
            "worker_added_mb": [round(v, 1) for v in added], "worker_read_s": [round(w["read_s"], 3) for w in raw["workers"]],
            "worker_added_bytes_per_path": round(max(added) * 2**20 / n, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", help="also write the report here")
    ap.add_argument("--check", action="store_true", help="exit 1 when the goal is not met")
    args = ap.parse_args(argv)
    if not Path("/proc/self/smaps_rollup").exists():
        print("needs Linux (/proc/self/smaps_rollup)", file=sys.stderr)
        return 2
    layouts = {name: measure(args.paths, args.workers, name) for name in ("list", "FileList")}
    worst = {k: max(v["worker_added_mb"]) for k, v in layouts.items()}
    ratio = worst["FileList"] / worst["list"] if worst["list"] else None
    report = {"paths": args.paths, "workers": args.workers, "layouts": layouts,
              "worker_added_ratio_filelist_vs_list": None if ratio is None else round(ratio, 4),
              "goal": {"what": "a FileList worker adds <= 5% of a list worker", "met": ratio is not None and ratio <= 0.05}}
    return emit_report(report, args.json, args.check)


if __name__ == "__main__":
    raise SystemExit(main())
