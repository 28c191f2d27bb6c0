"""Tables, ``report.md`` and plots of a run directory."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import CompressError
from .fileio import atomic_write, read_jsonl, write_text
from .stability import gate_text


def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def summary_headers(summary: dict) -> list[str]:
    """Every accuracy column names its split: the final test score, and the best per-epoch
    score on val (or on test under the paper's protocol, ``val_fraction 0``)."""
    split = summary.get("per_epoch_split", "val")
    return ["role", "model", "final test top-1 %", f"best {split} top-1 %", "params", "MACs", "latency ms",
            "train s"]


def summary_rows(summary: dict) -> list[list]:
    split = summary.get("per_epoch_split", "val")
    rows = []
    for m in summary["chain"]:
        rows.append([m["role"], m["arch"], _fmt(m.get("final_test_top1"), ".2f"),
                     _fmt(m.get(f"best_{split}_top1"), ".2f"),
                     f"{m['params']:,}", f"{m['macs'] / 1e6:.1f}M", _fmt(m.get("latency_ms"), ".3f"),
                     _fmt(m.get("train_seconds"), ".0f")])
    return rows


def format_summary(summary: dict) -> str:
    table = format_table(summary_headers(summary), summary_rows(summary))
    if summary.get("per_epoch_split") == "test":
        table += ("\nnote: no validation split (val_fraction 0, the paper's protocol): the per-epoch 'best' "
                  "column was chosen on the test split")
    if any(m.get("latency_ms") is not None for m in summary["chain"]) or (summary.get("latency") or {}).get("failed"):
        table += "\n" + latency_note(summary)
    for line in stability_notes(summary):
        table += "\n" + line
    return table


def latency_note(summary: dict) -> str:
    """How the latency column was measured (one line; see :func:`compressor.latency.describe_latency`)."""
    from .latency import describe_latency

    return describe_latency(summary.get("latency"), summary.get("latency_backend"))


def _latency_axis(summary: dict) -> str:
    info = summary.get("latency") or {}
    if info.get("backend") == "onnxruntime":
        return f"batch-1 latency (ms, onnxruntime {info.get('precision', 'fp32')}, {info.get('threads')} threads)"
    return {"torch": "batch-1 latency (ms, torch eager)"}.get(summary.get("latency_backend"), "batch-1 latency (ms)")


def stability_notes(summary: dict) -> list[str]:
    """The assistants kept out of later guide sets, and the student's warnings (one line each)."""
    lines = []
    for m in summary.get("chain", []):
        gate = m.get("guide_gate")
        if gate and not gate.get("kept", True):
            lines.append(f"guide {m['arch']} dropped: {gate_text(gate)}")
    if summary.get("teacher_dropped"):
        lines.append(f"guide {summary['chain'][0]['arch']} (the teacher) dropped: {gate_text(summary['teacher_dropped'])}")
    lines += [f"WARNING: {w}" for w in summary.get("warnings") or []]
    return lines


def _plot_curves(run_dir: Path, summary: dict) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for m in summary["chain"]:
        if not m.get("stage_dir"):
            continue
        key = f"{summary.get('per_epoch_split', 'val')}_top1"
        records = [r for r in read_jsonl(run_dir / m["stage_dir"] / "metrics.jsonl") if key in r]
        if records:
            ax.plot([r["epoch"] for r in records], [r[key] for r in records], marker=".",
                    label=f"{m['role']} {m['arch']}")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{summary.get('per_epoch_split', 'val')} top-1 (%), per epoch")
    ax.set_title(f"{summary['method'].upper()} stages")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save_fig(fig, run_dir / "accuracy_curves.png")


def _plot_tradeoff(run_dir: Path, summary: dict) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [m for m in summary["chain"] if m.get("final_test_top1") is not None]
    if not points:
        return None
    use_latency = all(m.get("latency_ms") for m in points)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in points:
        x = m["latency_ms"] if use_latency else m["params"]
        ax.scatter([x], [m["final_test_top1"]], s=40)
        ax.annotate(f"{m['arch']} ({m['role']})", (x, m["final_test_top1"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(_latency_axis(summary) if use_latency else "parameters")
    ax.set_ylabel("final test top-1 (%)")
    ax.set_title("accuracy vs " + ("latency" if use_latency else "size"))
    ax.grid(alpha=0.3)
    return _save_fig(fig, run_dir / "accuracy_vs_latency.png")


def _save_fig(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path.name


def write_report(run_dir) -> Path:
    """Write ``report.md`` and the PNG plots for a finished run directory."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise CompressError(f"{run_dir}: no summary.json; is this a finished 'compress distill' run directory?")
    try:
        summary = json.loads(summary_path.read_text())
    except (ValueError, RecursionError):  # JSONDecodeError, non-UTF-8 bytes, [[[[... nested too deep
        raise CompressError(f"{summary_path}: not valid JSON; re-run 'compress distill --resume'") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("chain"), list):
        raise CompressError(f"{summary_path}: not a 'compress distill' summary (no 'chain' list); "
                            f"re-run 'compress distill --resume'")
    curves = _plot_curves(run_dir, summary)
    tradeoff = _plot_tradeoff(run_dir, summary)
    dropped = list(summary.get("dropped_assistants") or []) + (
        [summary["chain"][0]["arch"]] if summary.get("teacher_dropped") else [])
    lines = [f"# Distillation report: {summary.get('name', run_dir.name)}", "",
             f"- method: **{summary['method']}**, data: `{summary['data']}`, "
             f"epochs: {summary['epochs']}, seed: {summary['seed']}",
             f"- temperature {summary['temperature']}, λ (kd_weight) {summary['kd_weight']}, "
             f"KD terms: {summary.get('kd_reduction', 'sum')} over the kept guides "
             f"({summary.get('kd_weighting', 'uniform')} weights, {summary.get('kd_logits', 'raw')} logits)"
             f"{'; the guides also label mixes of the training images' if summary.get('kd_mixup') else ''}, "
             f"guides dropped per batch: {summary['drop_guides']}, "
             f"KD weight warm-up: {summary.get('kd_warmup_epochs', 0)} epochs (at most 1/4 of a stage)",
             f"- BatchNorm statistics recomputed after each stage on up to "
             f"{summary.get('bn_recalibration_batches', 0)} training batches (0: off); weak or surpassed "
             f"guides kept out of later guide sets: {'on' if summary.get('gate_guides') else 'off'}"
             + (f" (dropped: {', '.join(dropped)})" if dropped else ""),
             f"- total training time: {summary['total_seconds']:.0f} s",
             f"- teacher: `{summary.get('teacher', '?')}` (sha256 `{summary.get('teacher_sha256', '?')}`)",
             f"- accuracies: *final test* = the test split, scored once per model at the end; *best "
             f"{summary.get('per_epoch_split', 'val')}* = the best per-epoch score on the "
             + ("held-out validation split" if summary.get("per_epoch_split", "val") == "val"
                else "test split (val_fraction 0, the paper's protocol: chosen on test)"), "",
             "```", format_summary(summary), "```", ""]
    if curves:
        lines += [f"![per-stage {summary.get('per_epoch_split', 'val')} accuracy]({curves})", ""]
    if tradeoff:
        lines += [f"![accuracy vs latency]({tradeoff})", ""]
    lines += ["Reproduce: `" + summary.get("command", "compress distill ...") + "`", ""]
    out = run_dir / "report.md"
    write_text(out, "\n".join(lines))
    return out
