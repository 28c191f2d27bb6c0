"""Latency benchmark of ONNX models (onnxruntime) and, optionally, PyTorch eager.

:func:`benchmark_onnx` times every engine on the *same* inputs, interleaving
them in rounds so that a noisy neighbour slows all of them alike; the report
(a JSON-able dict, format documented in ``docs/deployment.md``) holds the
machine, versions, settings, per-engine latency percentiles, throughput and
speed ratios. :func:`check_budget` and :func:`check_baseline` are the CI gates.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import time
from pathlib import Path

import numpy as np

from compressor.errors import CheckFailed, CompressError
from compressor.fileio import shorten

from .machine import cpu_model, default_threads, machine_info, versions  # noqa: F401 (public here too)
from .options import GRAPH_OPT_LEVELS
from .runtime import OnnxModel

SCHEMA = "compress.bench/2"   # /2: throughput_ips = batch / p50 (was / mean); docs/deployment.md
PERCENTILES = ("p50", "p90", "p99")
DEFAULT_SECONDS = 1.0   # per engine and batch size when neither iters nor seconds is given
MIN_ITERS = 10
ROUNDS = 3


# ------------------------------------------------------------------- timing
def latency_stats(samples_ms, batch_size: int) -> dict:
    a = np.asarray(samples_ms, dtype=np.float64)
    mean, p50 = float(a.mean()), float(np.percentile(a, 50))
    std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    return {
        "iterations": int(len(a)),
        "p50_ms": p50,
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": mean,
        "std_ms": std,
        "cv": std / mean if mean > 0 else 0.0,
        "min_ms": float(a.min()),
        "max_ms": float(a.max()),
        "throughput_ips": 1000.0 * batch_size / p50 if p50 > 0 else 0.0,  # one definition: batch / p50
    }


def time_engines(fns: dict, *, warmup: int, iters: int | None, seconds: float | None,
                 rounds: int = ROUNDS) -> dict:
    """Time each callable in ``fns``; engines take turns in ``rounds`` blocks.

    ``iters``: exact number of timed calls per engine; else ``seconds`` of
    timed calls per engine (at least :data:`MIN_ITERS`).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in fns}
    rounds = max(1, rounds)
    for r in range(rounds):
        for name, fn in fns.items():
            if iters is not None:
                n = iters // rounds + (1 if r < iters % rounds else 0)
                for _ in range(n):
                    t0 = time.perf_counter()
                    fn()
                    samples[name].append((time.perf_counter() - t0) * 1000.0)
            else:
                budget = seconds / rounds
                min_n = math.ceil(MIN_ITERS / rounds)
                start = time.perf_counter()
                done = 0
                while done < min_n or time.perf_counter() - start < budget:
                    t0 = time.perf_counter()
                    fn()
                    samples[name].append((time.perf_counter() - t0) * 1000.0)
                    done += 1
    return samples


class _TorchThreads:
    """Pin torch's intra-op threads for the block, then restore them."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        import torch

        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.old)


def _torch_fn(module, x):
    import torch

    xt = torch.from_numpy(np.ascontiguousarray(x))

    def run():
        with torch.inference_mode():
            return module(xt)

    return run


_SHA_MEMO: dict = {}


def file_sha(path) -> str:
    """sha256 of a file, hashed once per process while its size and mtime stay the same
    (a gate's context check and its report both need it)."""
    from compressor.checkpoint import file_sha256

    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = file_sha256(p)
    return _SHA_MEMO[key]


def model_entry(m: OnnxModel, role: str | None = None) -> dict:
    """What a report records about one ONNX file (``bench`` results' ``models[]``, the gate's
    ``candidate``/``baseline``)."""
    meta = m.meta
    return {
        **({"role": role} if role is not None else {}),
        "path": str(m.path), "sha256": file_sha(m.path), "size_bytes": m.path.stat().st_size,
        "arch": meta.arch if meta else None, "input_shape": list(m.chw),
        "preprocessing": m.preprocessing, "quantization": m.metadata.get("quantization", "none"),
    }


def open_models(path, compare=None, *, roles=("model", "compare"), threads: int | None = None, providers=None,
                graph_optimization: str = "all", precision: str = "f32") -> dict:
    """``{roles[0]: session of path, roles[1]: session of compare}`` with the same settings, checked to
    take the same input. A path that is already an :class:`OnnxModel` is used as it is (no second
    session, no second hash)."""
    def session(src):
        if isinstance(src, OnnxModel):
            return src
        return OnnxModel(src, threads=threads, providers=providers, graph_optimization=graph_optimization,
                         precision=precision)

    main = session(path)
    models = {roles[0]: main}
    if compare is not None:
        other = session(compare)
        if tuple(other.chw) != tuple(main.chw) or other.preprocessing != main.preprocessing:
            raise CompressError(
                f"cannot compare {main.path} (input {main.chw}, preprocessing {main.preprocessing}) with "
                f"{other.path} (input {other.chw}, preprocessing {other.preprocessing}): inputs differ"
            )
        models[roles[1]] = other
    return models


def benchmark_onnx(path, *, batch_sizes=(1,), threads: int | None = None, warmup: int = 10,
                   iters: int | None = None, seconds: float | None = None, providers=None,
                   graph_optimization: str = "all", torch_model=None, compare=None, seed: int = 0,
                   rounds: int = ROUNDS, precision: str = "f32") -> dict:
    """Benchmark ``path`` (and ``compare``, another .onnx, and ``torch_model``) on the same inputs.

    ``path`` and ``compare`` may be paths or :class:`OnnxModel` sessions already built (then
    used as they are: their own threads, provider and graph level).

    ``torch_model`` is the PyTorch module the file was exported from; it is
    timed in eager mode with ``torch.set_num_threads(threads)``. When the ONNX
    graph folds the normalisation in, the torch model is timed with the same
    normalisation in front so both do the same work.
    Returns the report dict (see ``docs/deployment.md``).
    """
    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or min(batch_sizes) < 1:
        raise CompressError(f"batch sizes must be >= 1, got {batch_sizes}")
    if warmup < 0:
        raise CompressError(f"warmup must be >= 0, got {warmup}")
    if iters is not None and iters < 1:
        raise CompressError(f"iters must be >= 1, got {iters}")
    if seconds is not None and seconds <= 0:
        raise CompressError(f"seconds must be > 0, got {seconds}")
    if iters is None and seconds is None:
        seconds = DEFAULT_SECONDS
    threads = int(threads) if threads else (path.threads if isinstance(path, OnnxModel) else default_threads())
    if threads < 1:
        raise CompressError(f"threads must be >= 1, got {threads}")
    if str(graph_optimization).lower() not in GRAPH_OPT_LEVELS:
        raise CompressError(f"unknown --graph-opt {graph_optimization!r}; use one of {', '.join(GRAPH_OPT_LEVELS)}")

    models = open_models(path, compare, threads=threads, providers=providers, graph_optimization=graph_optimization,
                         precision=precision)
    main = models["model"]
    threads = main.threads

    torch_module = None
    if torch_model is not None:
        torch_module = torch_model.eval()
        if main.preprocessing == "normalize":
            from .onnx_export import NormalizedModel

            meta = main.require_meta()
            torch_module = NormalizedModel(torch_module, meta.mean, meta.std).eval()

    results = []
    comparisons = []
    with _TorchThreads(threads):
        for b in batch_sizes:
            x = main.random_input(b, seed=seed)
            fns = {role: (lambda m=m: m.predict(x)) for role, m in models.items()}
            if torch_module is not None:
                fns["torch"] = _torch_fn(torch_module, x)
            samples = time_engines(fns, warmup=warmup, iters=iters, seconds=seconds, rounds=rounds)
            row = {}
            for role, s in samples.items():
                entry = {"role": role, "engine": "torch" if role == "torch" else "onnxruntime",
                         "path": str(models[role].path) if role in models else None,
                         "batch_size": b, **latency_stats(s, b)}
                results.append(entry)
                row[role] = entry
            for other in ("compare", "torch"):
                if other in row:
                    comparisons.append({
                        "batch_size": b, "baseline": other, "candidate": "model",
                        # > 1: the model is faster than the other engine/file
                        **{f"{p}_speedup": row[other][f"{p}_ms"] / row["model"][f"{p}_ms"]
                           for p in ("p50", "p90", "p99", "mean")},
                        "throughput_ratio": row["model"]["throughput_ips"] / row[other]["throughput_ips"],
                    })

    return {
        "schema": SCHEMA,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "models": [model_entry(m, role) for role, m in models.items()],
        "machine": machine_info(),
        "versions": versions(),
        "provider": main.provider,
        "providers": list(main.active_providers),
        "precision": main.precision,
        "graph_optimization": main.graph_optimization,
        "threads": threads,
        "torch_threads": threads if torch_module is not None else None,
        "warmup": int(warmup),
        "iterations": iters,
        "seconds": seconds if iters is None else None,
        "rounds": rounds,
        "batch_sizes": batch_sizes,
        "results": results,
        "comparisons": comparisons,
        "gates": [],
    }


def onnx_model_latency_ms(model, meta, *, threads: int | None = None, warmup: int = 10, iters: int | None = 50,
                          seconds: float | None = None) -> float:
    """Median batch-1 onnxruntime latency (ms) of a torch ``model`` (with its ``meta``), exported to a
    temporary ONNX file. The timer latency planning uses (``compressor.latency.set_onnx_timer``).
    ``seconds``: time that long in :data:`ROUNDS` rounds instead of ``iters`` calls (as :func:`benchmark_onnx`)."""
    import tempfile

    from .onnx_export import export_onnx

    with tempfile.TemporaryDirectory(prefix="compress-latency-") as tmp:
        onnx_model = OnnxModel(export_onnx((model, meta), Path(tmp) / "model.onnx"), threads=threads)
        x = onnx_model.random_input(1)
        if seconds is not None:
            samples = time_engines({"model": lambda: onnx_model.predict(x)}, warmup=warmup, iters=None,
                                   seconds=float(seconds), rounds=ROUNDS)
        else:
            samples = time_engines({"model": lambda: onnx_model.predict(x)}, warmup=warmup,
                                   iters=max(1, int(iters or 50)), seconds=None, rounds=1)
        return float(np.median(samples["model"]))


# ------------------------------------------------------------------ display
def format_table(report: dict) -> str:
    names = {m["role"]: Path(m["path"]).name for m in report.get("models", [])}
    names["torch"] = "torch eager"
    head = f"{'engine':<12} {'model':<28} {'batch':>5} {'p50 ms':>9} {'cv':>6} {'img/s':>10} {'p90 ms':>9} " \
           f"{'p99 ms':>9} {'mean ms':>9} {'iters':>6}"
    lines = [
        f"{report['machine']['cpu']} | {report['provider']} | {report['threads']} threads | "
        f"graph opt {report['graph_optimization']} | onnxruntime {report['versions'].get('onnxruntime')}",
        head, "-" * len(head),
    ]
    for r in report["results"]:
        lines.append(
            f"{r['engine']:<12} {names.get(r['role'], r['role'])[:28]:<28} {r['batch_size']:>5} {r['p50_ms']:>9.3f} "
            f"{r['cv']:>6.2f} {r['throughput_ips']:>10.1f} {r['p90_ms']:>9.3f} {r['p99_ms']:>9.3f} "
            f"{r['mean_ms']:>9.3f} {r['iterations']:>6}"
        )
    lines.append("img/s = batch / p50; cv = std / mean of single calls")
    for c in report.get("comparisons", []):
        what = "torch eager" if c["baseline"] == "torch" else names.get("compare", "compare")
        sp = c["p50_speedup"]
        verdict = f"{sp:.2f}x faster than" if sp >= 1 else f"{1 / sp:.2f}x slower than"
        lines.append(f"batch {c['batch_size']}: {names.get('model', 'model')} is {verdict} {what} "
                     f"(p50; speedup p50 {sp:.2f}, mean {c['mean_speedup']:.2f})")
    for g in report.get("gates", []):
        lines.append(g["message"])
    return "\n".join(lines)


# -------------------------------------------------------------------- gates
def parse_ratio(text) -> float:
    """``"10%"`` -> 0.10, ``"0.1"`` -> 0.10. A bare number >= 1 written as text is refused (ambiguous);
    a number already parsed (a fraction, e.g. 1.5 for ``150%``) is taken as it is."""
    if isinstance(text, (int, float)):
        value = float(text)
        if not (math.isfinite(value) and value >= 0):
            raise CompressError(f"regression ratio must be a finite fraction >= 0, got {text}; write e.g. 10%")
        return value
    s = str(text).strip()
    try:
        if s.endswith("%"):
            value = float(s[:-1]) / 100.0
        else:
            value = float(s)
            if value >= 1:
                raise CompressError(f"--max-regression {s!r} is ambiguous; write {s}% or {value / 100:g}")
    except ValueError:
        raise CompressError(f"--max-regression {s!r} is not a ratio; write e.g. 10% or 0.1") from None
    if value < 0 or not math.isfinite(value):
        raise CompressError(f"--max-regression must be >= 0, got {s!r}")
    return value


def _check_percentile(percentile: str) -> str:
    p = str(percentile).lower()
    if p not in PERCENTILES + ("mean",):
        raise CompressError(f"unknown percentile {percentile!r}; use p50, p90, p99 or mean")
    return p


def _main_results(report: dict) -> list[dict]:
    return [r for r in report.get("results", []) if r.get("role") == "model"]


def check_budget(report: dict, budget_ms: float, percentile: str = "p50", *, raise_on_fail: bool = True) -> list:
    """Latency gate: the main model's ``percentile`` latency at every benchmarked
    batch size must be <= ``budget_ms``. Appends the outcome to ``report["gates"]``."""
    p = _check_percentile(percentile)
    if budget_ms is None or not budget_ms > 0:
        raise CompressError(f"--budget-ms must be > 0, got {budget_ms}")
    gates = []
    for r in _main_results(report):
        value = r[f"{p}_ms"]
        ok = value <= budget_ms
        gates.append({
            "kind": "budget", "batch_size": r["batch_size"], "percentile": p, "value_ms": value,
            "limit_ms": float(budget_ms), "passed": ok,
            "message": f"latency budget {'PASS' if ok else 'FAIL'}: batch {r['batch_size']} {p} "
                       f"{value:.3f} ms {'<=' if ok else '>'} {budget_ms:g} ms",
        })
    report.setdefault("gates", []).extend(gates)
    failed = [g for g in gates if not g["passed"]]
    if failed and raise_on_fail:
        raise CheckFailed("; ".join(g["message"] for g in failed))
    return gates


def load_baseline(path) -> dict:
    p = Path(path)
    if p.exists() and not p.is_file():
        raise CompressError(f"baseline {str(p)!r} is not a regular file (a folder, a pipe?); pass a "
                            f"'compress bench --json' report")
    if not p.is_file():
        raise CompressError(f"baseline {str(p)!r} does not exist; write one with 'compress bench MODEL --json {p}'")
    try:
        if p.stat().st_size > 64 << 20:
            raise CompressError(f"baseline {str(p)!r} is larger than 64 MB; not a 'compress bench --json' report")
        data = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CompressError(f"baseline {str(p)!r} is not valid JSON ({shorten(exc)}); "
                            f"regenerate it with 'compress bench --json'") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise CompressError(f"baseline {str(p)!r} is not a 'compress bench --json' report (no 'results' list)")
    for r in data["results"]:
        bad = _bad_latency(r)
        if bad:
            raise CompressError(f"baseline {str(p)!r}: {bad}; regenerate it with 'compress bench --json'")
    return data


def _bad_latency(entry) -> str:
    """Why a baseline result entry cannot serve as a reference ('' if it can): its latencies must be
    finite numbers > 0 (JSON ``Infinity`` or ``NaN`` would pass every gate)."""
    if not isinstance(entry, dict):
        return f"malformed entry in 'results': {shorten(entry)}"
    for key in (f"{p}_ms" for p in PERCENTILES):
        if key not in entry:
            continue
        v = entry[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not v > 0:
            return f"{key} {shorten(v)} of batch {shorten(entry.get('batch_size'))} is not a finite latency > 0"
    return ""


def check_baseline(report: dict, baseline, max_regression=0.10, percentile: str = "p50", *,
                   raise_on_fail: bool = True) -> list:
    """Regression gate: for each batch size of the main model, its ``percentile``
    latency may be at most ``(1 + max_regression)`` x the baseline's.

    ``baseline`` is a path to (or the dict of) an earlier ``bench --json``
    report; its main ONNX entry at the same batch size is the reference.
    """
    p = _check_percentile(percentile)
    ratio_limit = parse_ratio(max_regression)
    base = baseline if isinstance(baseline, dict) else load_baseline(baseline)
    source = "baseline" if isinstance(baseline, dict) else str(baseline)
    if not isinstance(base.get("results"), list):
        raise CompressError(f"{source}: not a 'compress bench --json' report (no 'results' list)")
    key = f"{p}_ms"
    ref = {}
    for r in base["results"]:
        bad = _bad_latency(r)
        if bad:
            raise CompressError(f"{source}: {bad}")
        if r.get("role", "model") == "model" and r.get("engine", "onnxruntime") == "onnxruntime":
            try:
                ref[int(r["batch_size"])] = float(r[key])
            except (KeyError, TypeError, ValueError, OverflowError):
                raise CompressError(f"{source}: result entry lacks a numeric batch_size/{key}: "
                                    f"{shorten(r)}") from None
    gates = []
    for r in _main_results(report):
        b = r["batch_size"]
        if b not in ref:
            have = ", ".join(map(str, sorted(ref))) or "none"
            raise CompressError(f"{source}: has no onnxruntime result for batch size {b} (it has: {have}); "
                                f"benchmark the same --batch-size as the baseline")
        if not (math.isfinite(ref[b]) and ref[b] > 0):
            raise CompressError(f"{source}: {key} for batch {b} is {ref[b]}, not a positive latency")
        ratio = r[key] / ref[b]
        ok = ratio <= 1.0 + ratio_limit
        gates.append({
            "kind": "baseline", "batch_size": b, "percentile": p, "value_ms": r[key], "baseline_ms": ref[b],
            "ratio": ratio, "max_ratio": 1.0 + ratio_limit, "passed": ok, "baseline": source,
            "message": f"baseline gate {'PASS' if ok else 'FAIL'}: batch {b} {p} {r[key]:.3f} ms vs baseline "
                       f"{ref[b]:.3f} ms ({(ratio - 1) * 100:+.1f}%, limit +{ratio_limit * 100:g}%)",
        })
    base_cpu = (base.get("machine") or {}).get("cpu") if isinstance(base.get("machine"), dict) else None
    if base_cpu and base_cpu != report.get("machine", {}).get("cpu"):
        for g in gates:
            g["message"] += f" [note: baseline measured on a different CPU: {base_cpu}]"
    report.setdefault("gates", []).extend(gates)
    failed = [g for g in gates if not g["passed"]]
    if failed and raise_on_fail:
        raise CheckFailed("; ".join(g["message"] for g in failed))
    return gates


def check_accuracy_floor(top1: float, min_accuracy: float) -> str:
    """Accuracy gate for ``eval --min-accuracy``: both numbers in the same unit
    (top-1 in percent, as :func:`export.runtime.evaluate_onnx` reports it).
    Raises :class:`CheckFailed` when ``top1 < min_accuracy``; returns a PASS line."""
    try:
        top1, min_accuracy = float(top1), float(min_accuracy)
    except (TypeError, ValueError):
        raise CompressError(f"accuracy floor needs numbers, got top1={top1!r}, min={min_accuracy!r}") from None
    if not math.isfinite(min_accuracy) or min_accuracy < 0 or min_accuracy > 100:
        raise CompressError(f"--min-accuracy must be a percentage in [0, 100], got {min_accuracy:g}")
    if not top1 >= min_accuracy:
        raise CheckFailed(f"accuracy floor FAIL: top-1 {top1:.2f}% < {min_accuracy:g}%")
    return f"accuracy floor PASS: top-1 {top1:.2f}% >= {min_accuracy:g}%"


def write_report(report: dict, path) -> Path:
    from compressor.fileio import check_output_path, write_json

    out = check_output_path(path)
    write_json(out, report)
    return out
