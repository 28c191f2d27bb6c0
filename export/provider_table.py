"""``compress bench --provider all``: every usable execution provider x file x batch size
in one table, each row checked against the CPU fp32 reference, the fastest passing row named.

Rows: the fp32 file in f32 on every provider, the fp32 file with OpenVINO's bf16
precision hint, and the INT8 file (``NAME.int8.onnx`` beside the model, or
``int8=``) on every provider. Parity is measured on the same inputs for all
rows: the first ``parity_images`` test images of ``data`` (default 1,000: one image
is then 0.1 point, fine enough for a 0.5-point budget), else 256 random inputs.

Pass rules (documented in docs/deployment.md):

- f32 rows: every logit within ``atol + rtol * |ref|`` (1e-4, 1e-3, as the
  export's parity check) and 100% top-1 agreement;
- bf16 and INT8 rows change the numbers on purpose (bf16 keeps 8 significant
  bits, about 2-3 decimal digits, so logits move by ~1e-2): only the decision is
  checked. With ``data``: top-1 accuracy on the parity images at most
  ``max_accuracy_drop`` points below the fp32 reference; without data: top-1
  agreement with the reference at least ``min_agreement``.

Thread search: ``threads="search"`` (what ``compress bench --provider all`` does
without ``--threads``) or a list of counts repeats every row at each thread count
of :func:`thread_counts` (1, 2, 4, ... and the usable cores): on a small CNN at
batch 1 one thread can beat two (OpenVINO at batch 1 on 2 AMX cores: 2.8-3.9x vs
0.23-0.30x onnxruntime fp32). Each row is checked at its own thread count. The
``vs cpu fp32`` ratios and ``reference_threads`` refer to cpu fp32 at the default
thread count (:func:`export.machine.default_threads`), what plain onnxruntime use gives.

Timing is interleaved (:func:`time_interleaved`): every row's session is built first, then
in each of :data:`TABLE_ROUNDS` rounds every row runs its share of the timed calls on the
same input, so a load spike on a shared runner hits all rows alike and the ratios between
rows (the choice of ``compress export --target``) hold where the absolute times do not.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from compressor.errors import CompressError
from compressor.evaluation import accuracy, predictions, sample_arrays

from .bench import DEFAULT_SECONDS, latency_stats, machine_info, time_engines, versions
from .machine import default_threads, usable_cores
from .options import PROVIDERS
from .providers import unavailable_reason
from .quantize import int8_path
from .runtime import OnnxModel, check_fits_data, load_bundle

SCHEMA = "compress.providers/1"   # the --provider all --json report; layout in docs/deployment.md
ATOL, RTOL = 1e-4, 1e-3
DATA_PARITY_IMAGES, RANDOM_PARITY_INPUTS = 1000, 256
TABLE_ROUNDS = 6  # rounds of interleaved timing: each row runs 1/6 of its calls per round


def time_interleaved(sessions: dict, *, batch_sizes, warmup: int, iters: int | None, seconds: float | None,
                     rounds: int = TABLE_ROUNDS, seed: int = 0) -> dict:
    """``{key: {batch: latency stats}}`` for every :class:`~export.runtime.OnnxModel` in ``sessions``,
    timed interleaved (:func:`export.bench.time_engines`): per batch size one input, shared by all
    rows; ``seconds`` (or ``iters``) per row, spread over ``rounds`` rounds."""
    out = {key: {} for key in sessions}
    if not sessions:
        return out
    first = next(iter(sessions.values()))
    for b in batch_sizes:
        x = first.random_input(int(b), seed=seed)
        fns = {key: (lambda m=m: m.predict(x)) for key, m in sessions.items()}
        samples = time_engines(fns, warmup=warmup, iters=iters, seconds=seconds, rounds=rounds)
        for key, s in samples.items():
            out[key][int(b)] = latency_stats(s, int(b))
    return out


def thread_counts(cores: int | None = None) -> list[int]:
    """1, 2, 4, ... up to ``cores`` (default: the usable cores), and ``cores`` itself."""
    cores = max(1, int(cores if cores is not None else usable_cores()))
    out, t = [], 1
    while t < cores:
        out.append(t)
        t *= 2
    return out + [cores]


def resolve_thread_counts(threads) -> tuple[list[int], int]:
    """``(counts to try, the baseline's count)`` for ``threads``: ``None`` (the default count only),
    an int, ``"search"`` (:func:`thread_counts`) or a list of ints."""
    if threads is None:
        counts = [default_threads()]
    elif isinstance(threads, str):
        if threads != "search":
            raise CompressError(f"threads must be a count, a list of counts or 'search', got {threads!r}")
        counts = thread_counts()
    elif isinstance(threads, int):
        counts = [threads]
    else:
        counts = sorted({int(t) for t in threads})
    if not counts or min(counts) < 1:
        raise CompressError(f"thread counts must be >= 1, got {threads!r}")
    base = default_threads()
    return counts, (base if base in counts else max(counts))


def _variants(provider: str, model: Path, int8: Path | None) -> list[tuple[str, Path, str]]:
    rows = [("fp32", model, "f32")]
    if provider == "openvino":
        rows.append(("bf16", model, "bf16"))
    if int8 is not None:
        rows.append(("int8", int8, "f32"))
    return rows


def _predict(m: OnnxModel, x: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([m.predict(x[i:i + batch]) for i in range(0, len(x), batch)])


def provider_table(model, *, int8=None, batch_sizes=(1, 64), threads=None, warmup: int = 10,
                   iters: int | None = None, seconds: float | None = 1.0, data=None, parity_images: int | None = None,
                   max_accuracy_drop: float = 0.5, min_agreement: float = 0.99, providers=PROVIDERS,
                   timer=time_interleaved) -> dict:
    """Time and check every available provider x variant x thread count x batch size; see the module
    docstring. ``threads``: see :func:`resolve_thread_counts`. ``timer``: times the rows' sessions
    (the signature of :func:`time_interleaved`; tests inject fake timings)."""
    model = Path(model)
    if iters is None and seconds is None:
        seconds = DEFAULT_SECONDS
    counts, base_threads = resolve_thread_counts(threads)
    reference = OnnxModel(model, threads=base_threads, providers="cpu")
    if int8 is None and int8_path(model).is_file():
        int8 = int8_path(model)
    int8 = Path(int8) if int8 is not None else None
    labels = None
    if data is not None:
        n = parity_images or DATA_PARITY_IMAGES
        bundle = load_bundle(data, reference.meta, splits=("test",), sample=n)
        images, labels = sample_arrays(bundle.test, n)
        check_fits_data(reference, bundle, images)
        x = reference.prepare(images)
    else:
        x = reference.random_input(parity_images or RANDOM_PARITY_INPUTS, seed=1)
    ref = _predict(reference, x)
    ref_pred = predictions(ref)
    ref_top1 = accuracy(ref, labels)["top1"] if labels is not None else None

    configs, sessions, unavailable = {}, {}, {}
    for provider in providers:
        reason = unavailable_reason(provider)
        if reason:
            unavailable[provider] = reason
            continue
        for (variant, path, precision), t in ((v, t) for v in _variants(provider, model, int8) for t in counts):
            m = OnnxModel(path, threads=t, providers=provider, precision=precision)
            out = _predict(m, x)
            agreement = float((predictions(out) == ref_pred).mean())
            check = {"max_abs_diff": float(np.abs(out - ref).max()), "top1_agreement": agreement,
                     "top1": accuracy(out, labels)["top1"] if labels is not None else None}
            if variant == "fp32":
                passed = bool(np.all(np.abs(out - ref) <= ATOL + RTOL * np.abs(ref))) and agreement == 1.0
            elif labels is not None:
                passed = check["top1"] >= ref_top1 - max_accuracy_drop - 1e-9
            else:
                passed = agreement >= min_agreement
            key = (provider, variant, t)
            sessions[key] = m
            configs[key] = {"provider": provider, "variant": variant, "path": str(path), "precision": precision,
                            "threads": t, "active_provider": m.provider, **check, "parity_passed": passed}
    timings = timer(sessions, batch_sizes=[int(b) for b in batch_sizes], warmup=warmup, iters=iters,
                    seconds=seconds if iters is None else None)
    timed = ("p50_ms", "throughput_ips", "cv", "iterations")
    rows = [{**configs[key], "batch_size": b, **{k: timings[key][b][k] for k in timed}}
            for key in configs for b in [int(b) for b in batch_sizes]]

    base = {r["batch_size"]: r for r in rows
            if r["provider"] == "cpu" and r["variant"] == "fp32" and r["threads"] == base_threads}
    for r in rows:
        b = base.get(r["batch_size"])
        r["p50_speedup_vs_cpu_fp32"] = b["p50_ms"] / r["p50_ms"] if b else None
        r["throughput_vs_cpu_fp32"] = r["throughput_ips"] / b["throughput_ips"] if b else None
    fastest = {}
    for b in sorted({r["batch_size"] for r in rows}):
        passing = [r for r in rows if r["batch_size"] == b and r["parity_passed"]]
        if passing:
            best = min(passing, key=lambda r: r["p50_ms"])
            fastest[str(b)] = {k: best[k] for k in ("provider", "variant", "precision", "threads", "p50_ms",
                                                    "throughput_ips", "p50_speedup_vs_cpu_fp32",
                                                    "throughput_vs_cpu_fp32")}
    return {"schema": SCHEMA, "model": str(model), "int8": str(int8) if int8 else None, "machine": machine_info(),
            "versions": versions(), "threads": reference.threads, "thread_counts": counts,
            "reference_threads": base_threads, "parity_inputs": len(x),
            "parity_source": "data" if labels is not None else "random", "reference_top1": ref_top1,
            "rules": {"atol": ATOL, "rtol": RTOL, "max_accuracy_drop": max_accuracy_drop,
                      "min_agreement": min_agreement},
            "timing": {"interleaved": True, "rounds": TABLE_ROUNDS, "warmup": int(warmup), "iterations": iters,
                       "seconds": seconds if iters is None else None},
            "rows": rows, "unavailable": unavailable, "fastest": fastest}


def format_provider_table(rep: dict) -> str:
    head = (f"{'provider':<9} {'file':<5} {'batch':>5} {'thr':>3} {'p50 ms':>9} {'cv':>5} {'img/s':>10} "
            f"{'vs cpu fp32':>11} {'agree %':>8} {'top-1 %':>8} {'max|diff|':>10}  parity")
    src = f"{rep['parity_inputs']} {'test images' if rep['parity_source'] == 'data' else 'random inputs'}"
    threads = ",".join(str(t) for t in rep.get("thread_counts", [rep["threads"]]))
    lines = [f"{rep['machine']['cpu']} | {threads} threads | onnxruntime {rep['versions'].get('onnxruntime')} "
             f"| parity on {src} vs cpu fp32 "
             f"({rep.get('reference_threads', rep['threads'])} threads)", head, "-" * len(head)]
    for r in rep["rows"]:
        top1 = f"{r['top1']:.2f}" if r["top1"] is not None else "-"
        ratio = (f"{r['p50_speedup_vs_cpu_fp32']:.2f}x" if r["batch_size"] == 1 else
                 f"{r['throughput_vs_cpu_fp32']:.2f}x") if r["p50_speedup_vs_cpu_fp32"] else "-"
        lines.append(f"{r['provider']:<9} {r['variant']:<5} {r['batch_size']:>5} {r.get('threads', ''):>3} "
                     f"{r['p50_ms']:>9.3f} {r['cv']:>5.2f} "
                     f"{r['throughput_ips']:>10.1f} {ratio:>11} {100 * r['top1_agreement']:>8.2f} {top1:>8} "
                     f"{r['max_abs_diff']:>10.2e}  {'PASS' if r['parity_passed'] else 'FAIL'}")
    lines.append("img/s = batch / p50; vs cpu fp32: p50 speedup at batch 1, throughput ratio at larger batches")
    for provider, reason in rep["unavailable"].items():
        lines.append(f"{provider}: not available: {reason}")
    for b, f in rep["fastest"].items():
        lines.append(f"fastest at batch {b} that passes parity: {f['provider']} {f['variant']} "
                     f"{f.get('threads', '?')} thread(s) "
                     f"({f['p50_ms']:.3f} ms p50, {f['throughput_ips']:.0f} img/s)")
    if not rep["fastest"]:
        raise CompressError("no provider produced a row; is the CPU provider missing from onnxruntime?")
    return "\n".join(lines)
