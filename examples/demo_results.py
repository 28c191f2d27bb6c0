"""Print the results table of `make demo` from the JSON files it wrote.

Usage: python examples/demo_results.py DEMO_OUT [SECONDS]
"""
import json
import sys
from pathlib import Path

from compressor.report import format_table


def main(out: Path, seconds: str | None) -> None:
    dgkd = json.loads((out / "dgkd" / "summary.json").read_text())
    ce = json.loads((out / "ce" / "summary.json").read_text())
    onnx_eval = json.loads((out / "eval_onnx.json").read_text())
    bench = json.loads((out / "bench.json").read_text())

    def p50(role: str, batch: int):
        for r in bench["results"]:
            if r["role"] == role and r["batch_size"] == batch:
                return r["p50_ms"]
        return None

    split = dgkd.get("per_epoch_split", "val")

    def best(m):
        v = m.get(f"best_{split}_top1")
        return "-" if v is None else f"{v:.2f}"

    teacher, *assistants, student = dgkd["chain"]
    alone = ce["chain"][-1]
    rows = [["teacher (pretrained)", teacher["arch"], f"{teacher['final_test_top1']:.2f}", "-",
             f"{teacher['params']:,}", "-"]]
    for a in assistants:
        rows.append(["assistant (DGKD)", a["arch"], f"{a['final_test_top1']:.2f}", best(a), f"{a['params']:,}", "-"])
    rows.append(["student alone (CE)", alone["arch"], f"{alone['final_test_top1']:.2f}", best(alone),
                 f"{alone['params']:,}", "-"])
    rows.append(["student (DGKD), torch", student["arch"], f"{student['final_test_top1']:.2f}", best(student),
                 f"{student['params']:,}", f"{p50('torch', 1):.3f}" if p50("torch", 1) else "-"])
    rows.append(["student (DGKD), onnx", student["arch"], f"{onnx_eval['top1']:.2f}", "-", f"{student['params']:,}",
                 f"{p50('model', 1):.3f}" if p50("model", 1) else "-"])
    held_out = ("4,500 train + 500 val held out" if split == "val" else "5,000 train (no val split)")
    print(f"RESULTS (demo data: {held_out} / 1,000 test CIFAR-10 JPEG images)")
    precision = dgkd.get("precision")
    if precision:  # what --mixed-precision (default auto) resolved to
        mode = "fp32" if precision["mixed_precision"] == "no" else precision["mixed_precision"] + " autocast"
        print(f"training precision: {mode}{' + channels_last' if precision['channels_last'] else ''} "
              f"(--mixed-precision {precision['requested']}: {precision['reason']})")
    print(format_table(["model", "arch", "final test top-1 %", f"best {split} top-1 %", "params",
                        "batch-1 p50 ms"], rows))
    speed = [c for c in bench.get("comparisons", []) if c["baseline"] == "torch"]
    for c in speed:
        print(f"onnxruntime vs torch eager, batch {c['batch_size']}: {c['p50_speedup']:.1f}x faster (p50)")
    gain = student["final_test_top1"] - alone["final_test_top1"]
    print(f"DGKD student vs student trained alone: {gain:+.2f} points (final test top-1)")
    if seconds:
        print(f"demo time: {int(seconds) // 60} min {int(seconds) % 60} s (after installation)")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
