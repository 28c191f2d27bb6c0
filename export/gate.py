"""The CI gates that compare a candidate ONNX file with a baseline: one timed, one not.

* :func:`compare_latency` times both files in one process, interleaved in
  rounds (each round: a short burst of each, the order alternating), takes the
  median of each burst and decides on the paired per-round ratios
  candidate / baseline with a seeded bootstrap confidence interval
  (:func:`decide`): the gate fails only when the interval's *lower* bound is
  above ``1 + max_regression``. A noisy neighbour slows both files of a round
  alike, so the ratio stays near 1 for an unchanged model.
* :func:`graph_cost` counts what a graph costs without running it (MACs of
  Conv/Gemm/MatMul from static shapes, parameters, nodes, file bytes);
  :func:`compare_cost` gates the candidate's counts against the baseline's.
* :func:`run_context` / :func:`check_baseline_context`: a ``bench --json``
  baseline records the model's sha256, provider, precision, threads, graph
  optimisation level and CPU; a latency compared under other settings is
  refused (one line naming the fields) unless explicitly allowed.

The report of :func:`compare_latency` has ``schema: compress.gate/1``
(layout in ``docs/deployment.md``).
"""
from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path

import numpy as np

from compressor.errors import CompressError

SCHEMA = "compress.gate/1"
DEFAULT_ROUNDS = 15
BURST_SECONDS = 0.06           # timed calls per file and round: about this long (at least bench.MIN_ITERS calls)
RESAMPLES = 2000
CONFIDENCE = 0.95
CONTEXT_FIELDS = ("sha256", "provider", "precision", "threads", "graph_optimization", "cpu")
COST_FIELDS = ("macs", "params", "nodes", "bytes")


# ------------------------------------------------------------- the decision
def decide(candidate_ms, baseline_ms, max_regression=0.10, *, resamples: int = RESAMPLES,
           confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """Slowdown of the candidate with a bootstrap confidence interval, and the verdict.

    ``candidate_ms[i]`` and ``baseline_ms[i]`` are the median latencies of the two
    files in round ``i`` (paired: timed back to back). The statistic is the median
    of the per-round ratios ``candidate / baseline``; its interval is the
    ``confidence`` percentile interval of the statistic over ``resamples``
    resamples of the rounds (with replacement, ``numpy.random.default_rng(seed)``).
    ``passed`` is False only when the lower bound exceeds ``1 + max_regression``.
    """
    max_regression = _ratio(max_regression)
    c = np.asarray(candidate_ms, dtype=np.float64)
    b = np.asarray(baseline_ms, dtype=np.float64)
    if c.shape != b.shape or c.ndim != 1 or len(c) < 2:
        raise CompressError(f"the latency gate needs >= 2 paired rounds, got {c.shape} and {b.shape}")
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(b)) and np.all(c > 0) and np.all(b > 0)):
        raise CompressError("the latency gate got a latency that is not a finite number > 0")
    if not 0 < confidence < 1:
        raise CompressError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 100:
        raise CompressError(f"resamples must be >= 100, got {resamples}")
    ratios = c / b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ratios), size=(int(resamples), len(ratios)))
    boot = np.median(ratios[idx], axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = (float(v) for v in np.quantile(boot, [alpha, 1.0 - alpha]))
    ratio = float(np.median(ratios))
    limit = 1.0 + float(max_regression)
    passed = not low > limit
    message = (f"slowdown {ratio:.2f}x [{low:.2f}, {high:.2f}] {100 * confidence:g}% CI over {len(ratios)} rounds; "
               f"limit {limit:.2f}x: {'pass' if passed else 'FAIL'}")
    return {"ratio": ratio, "ci_low": low, "ci_high": high, "confidence": float(confidence),
            "rounds": int(len(ratios)), "resamples": int(resamples), "seed": int(seed), "max_ratio": limit,
            "passed": bool(passed), "message": message}


def _ratio(value) -> float:
    """:func:`export.bench.parse_ratio` (text ``"10%"``/``"0.1"``, or an already parsed fraction)."""
    from .bench import parse_ratio

    return parse_ratio(value)


# --------------------------------------------------------- interleaved timing
def compare_latency(candidate, baseline, *, rounds: int = DEFAULT_ROUNDS, batch_sizes=(1,), batch: int | None = None,
                    threads: int | None = None, provider: str = "cpu", precision: str = "f32",
                    graph_optimization: str = "all", warmup: int = 5, burst_seconds: float = BURST_SECONDS,
                    max_regression=0.10, max_cost_regression=None, resamples: int = RESAMPLES,
                    confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """Time ``candidate`` and ``baseline`` (.onnx) interleaved in one process; decide with :func:`decide`.

    Both sessions get the same settings and the same random batch. After
    ``warmup`` calls each, every round times a burst of each file (one
    untimed call, then ``burst_seconds`` of calls, at least 10; the order
    alternates between rounds) and keeps the burst's median; one decision per
    batch size (``batch`` is a shorthand for ``batch_sizes=(batch,)``). The
    graph costs are compared too (gated with ``max_cost_regression``).
    Returns the gate report (``schema: compress.gate/1``); ``report["passed"]``
    is the verdict of all its gates.
    """
    from .bench import latency_stats, model_entry, open_models, time_engines
    from .machine import default_threads, machine_info, versions

    limit = _ratio(max_regression)
    sizes = [int(batch)] if batch is not None else [int(b) for b in batch_sizes]
    if int(rounds) < 5:
        raise CompressError(f"--rounds must be >= 5 for a confidence interval, got {rounds}")
    if not sizes or min(sizes) < 1:
        raise CompressError(f"batch sizes must be >= 1, got {sizes}")
    if warmup < 0 or not burst_seconds > 0:
        raise CompressError(f"warmup must be >= 0 and burst_seconds > 0, got {warmup}, {burst_seconds}")
    threads = int(threads) if threads else default_threads()
    if threads < 1:
        raise CompressError(f"threads must be >= 1, got {threads}")
    cost = compare_cost(graph_cost(candidate), graph_cost(baseline), max_cost_regression)
    models = open_models(candidate, baseline, roles=("candidate", "baseline"), threads=threads, providers=provider,
                         graph_optimization=graph_optimization, precision=precision)
    cand, base = models["candidate"], models["baseline"]

    batches, results, gates = [], [], []
    for b in sizes:
        x = cand.random_input(b, seed=seed)
        fns = {role: (lambda m=m: m.predict(x)) for role, m in models.items()}
        time_engines(fns, warmup=warmup, iters=1, seconds=None, rounds=1)
        medians = {role: [] for role in fns}
        samples = {role: [] for role in fns}
        for r in range(int(rounds)):
            order = ("candidate", "baseline") if r % 2 == 0 else ("baseline", "candidate")
            for role in order:  # a burst: one untimed call, then burst_seconds of calls (at least MIN_ITERS)
                s = time_engines({role: fns[role]}, warmup=1, iters=None, seconds=burst_seconds, rounds=1)[role]
                medians[role].append(float(np.median(s)))
                samples[role].extend(s)
        decision = decide(medians["candidate"], medians["baseline"], limit, resamples=resamples,
                          confidence=confidence, seed=seed)
        batches.append({"batch_size": b, "round_medians_ms": medians, **decision})
        results += [{"role": "model" if role == "candidate" else "compare", "engine": "onnxruntime",
                     "path": str(models[role].path), "batch_size": b, **latency_stats(samples[role], b)}
                    for role in ("candidate", "baseline")]
        gates.append({"kind": "latency_ci", "batch_size": b, **{k: decision[k] for k in (
            "ratio", "ci_low", "ci_high", "confidence", "rounds", "max_ratio", "passed")},
            "message": f"latency gate {'PASS' if decision['passed'] else 'FAIL'} (batch {b}): {decision['message']}"})
    if max_cost_regression is not None:
        grew = [f"{r['metric']} {r['ratio']:.2f}x" for r in cost["rows"] if not r["passed"]]
        gates.append({"kind": "cost", "max_ratio": cost["max_ratio"], "passed": cost["passed"],
                      "message": f"graph cost gate {'PASS' if cost['passed'] else 'FAIL'}: "
                                 + (", ".join(grew) + f" > limit {cost['max_ratio']:.2f}x" if grew else
                                    f"MACs, params, nodes and bytes within {cost['max_ratio']:.2f}x of the baseline")})
    return {
        "schema": SCHEMA,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "candidate": model_entry(cand), "baseline": model_entry(base),
        "machine": machine_info(), "versions": versions(),
        "provider": cand.provider, "precision": cand.precision, "graph_optimization": cand.graph_optimization,
        "threads": threads, "warmup": int(warmup), "rounds": int(rounds), "burst_seconds": float(burst_seconds),
        "batch_sizes": sizes, "batches": batches, "results": results, "cost": cost, "gates": gates,
        "passed": all(g["passed"] for g in gates),
    }


def format_gate(report: dict) -> str:
    """The printed form of a :func:`compare_latency` report (its gates' lines last)."""
    head = f"{'file':<10} {'path':<34} {'batch':>5} {'p50 ms':>9} {'cv':>6} {'img/s':>10} {'iters':>6}"
    lines = [f"{report['machine']['cpu']} | {report['provider']} | {report['threads']} threads | "
             f"graph opt {report['graph_optimization']} | interleaved in {report['rounds']} rounds",
             head, "-" * len(head)]
    for r in report["results"]:
        who = "candidate" if r["role"] == "model" else "baseline"
        lines.append(f"{who:<10} {Path(r['path']).name[:34]:<34} {r['batch_size']:>5} {r['p50_ms']:>9.3f} "
                     f"{r['cv']:>6.2f} {r['throughput_ips']:>10.1f} {r['iterations']:>6}")
    lines.append("img/s = batch / p50; cv = std / mean of single calls")
    lines.append(format_cost(report["cost"]))
    lines += [g["message"] for g in report.get("gates", [])]
    return "\n".join(lines)


# ---------------------------------------------------------------- graph cost
def _static_model(proto):
    """A copy of ``proto`` whose graph inputs have batch 1 (a symbolic first dim set to 1), shapes inferred."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    init_names = {t.name for t in m.graph.initializer}
    for inp in m.graph.input:
        if inp.name in init_names:
            continue
        dims = inp.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1
    try:
        return onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # inference is best effort: unknown shapes leave MACs unknown, counted below
        return m


def _shapes(graph) -> dict:
    out = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for t in graph.initializer:
        out[t.name] = list(t.dims)
    return out


def _prod(dims) -> int | None:
    if dims is None or any(d is None for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64)) if dims else 1


# op -> (index of the data input X / A, index of the weight input W), MACs per output element from them
_CONV = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
_MATMUL = {"MatMul": 0, "MatMulInteger": 0, "QLinearMatMul": 0}


def _node_macs(node, shapes) -> int | None:
    """Multiply-accumulates of one node at batch 1 (0 for ops that are not Conv/Gemm/MatMul; None: unknown)."""
    op = node.op_type
    if op in _CONV or op == "ConvTranspose":
        w = shapes.get(node.input[_CONV.get(op, 1)]) if len(node.input) > _CONV.get(op, 1) else None
        # Conv: every output element sums over C_in/group x kH x kW (= W.shape[1:]);
        # ConvTranspose: every input element spreads over C_out/group x kH x kW (= W.shape[1:]).
        ref = shapes.get(node.output[0]) if op != "ConvTranspose" else shapes.get(node.input[0])
        a, k = _prod(ref), _prod(w[1:] if w else None)
        return a * k if a is not None and k is not None else None
    if op == "Gemm":
        a = shapes.get(node.input[0])
        trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
        y = _prod(shapes.get(node.output[0]))
        if not a or len(a) != 2 or a[1 - trans_a] is None or y is None:
            return None
        return y * int(a[1 - trans_a])
    if op in _MATMUL:
        a = shapes.get(node.input[_MATMUL[op]])
        y = _prod(shapes.get(node.output[0]))
        if not a or a[-1] is None or y is None:
            return None
        return y * int(a[-1])
    return 0


def graph_cost(path) -> dict:
    """Cost of an ONNX graph without running it.

    ``macs``: multiply-accumulates of Conv / ConvTranspose / Gemm / MatMul (and
    their integer and QLinear forms) for ONE image, from shapes inferred with
    ``onnx.shape_inference`` after setting a symbolic batch dimension to 1;
    ``params``: elements of the initializers (int64 ones, which hold shapes and
    axes, left out; INT8 weights, scales and int32 biases counted); ``nodes``: nodes of the main
    graph; ``bytes``: size of the .onnx file. ``macs_unknown`` counts the
    Conv/Gemm/MatMul nodes whose shapes could not be inferred (their MACs are
    left out of ``macs``).
    """
    import onnx

    from .runtime import check_onnx_file

    p = check_onnx_file(path)
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:
        raise CompressError(f"{p}: not a loadable ONNX model ({str(exc).strip()[:200]}); "
                            f"export one with 'compress export --onnx'") from None
    params = sum(_prod(list(t.dims)) or 0 for t in proto.graph.initializer if t.data_type != onnx.TensorProto.INT64)
    inferred = _static_model(proto)
    shapes = _shapes(inferred.graph)
    macs, unknown = 0, 0
    for node in inferred.graph.node:
        n = _node_macs(node, shapes)
        if n is None:
            unknown += 1
        else:
            macs += n
    return {"macs": int(macs), "params": int(params), "nodes": len(proto.graph.node),
            "bytes": int(p.stat().st_size), "macs_unknown": unknown}


def compare_cost(candidate: dict, baseline: dict, max_regression=None) -> dict:
    """Candidate vs baseline :func:`graph_cost`; with ``max_regression`` (a ratio, ``"10%"``),
    ``passed`` is False when any of MACs, params, nodes or bytes grew by more than that."""
    limit = None if max_regression is None else _ratio(max_regression)
    rows = []
    for key in COST_FIELDS:
        c, b = int(candidate[key]), int(baseline[key])
        ratio = c / b if b > 0 else (1.0 if c == 0 else math.inf)
        ok = limit is None or ratio <= 1.0 + limit + 1e-12
        rows.append({"metric": key, "candidate": c, "baseline": b, "ratio": ratio, "passed": bool(ok)})
    return {"candidate": candidate, "baseline": baseline, "max_ratio": None if limit is None else 1.0 + limit,
            "rows": rows, "passed": all(r["passed"] for r in rows)}


def format_cost(cost: dict) -> str:
    limit = cost.get("max_ratio")
    lines = [f"graph cost (candidate vs baseline{'' if limit is None else f', limit {limit:.2f}x'}):"]
    for r in cost["rows"]:
        verdict = "" if limit is None else ("  pass" if r["passed"] else "  FAIL")
        lines.append(f"  {r['metric']:<7} {r['candidate']:>14,} vs {r['baseline']:>14,}  {r['ratio']:>6.2f}x{verdict}")
    unknown = cost["candidate"].get("macs_unknown", 0) + cost["baseline"].get("macs_unknown", 0)
    if unknown:
        lines.append(f"  note: {unknown} matmul/conv node(s) without static shapes are not in the MACs")
    return "\n".join(lines)


# ------------------------------------------------------ baseline context check
def run_context(model, *, provider: str = "cpu", precision: str = "f32", threads: int | None = None,
                graph_optimization: str = "all") -> dict:
    """What a ``bench`` run of ``model`` with these settings will record (before timing anything)."""
    from compressor.checkpoint import check_readable_file

    from .bench import file_sha
    from .machine import cpu_model, default_threads
    from .providers import OPENVINO_EP, PROVIDER_ALIASES

    names = {**PROVIDER_ALIASES, "openvino": OPENVINO_EP}  # as the session reports it (report["provider"])
    return {"sha256": file_sha(check_readable_file(model, "ONNX model")),
            "provider": names.get(str(provider).lower(), str(provider)),
            "precision": str(precision).lower(), "threads": int(threads) if threads else default_threads(),
            "graph_optimization": str(graph_optimization).lower(), "cpu": cpu_model()}


def report_context(report: dict) -> dict:
    """The :data:`CONTEXT_FIELDS` a ``bench --json`` report recorded (``None`` where it did not)."""
    models = report.get("models") if isinstance(report.get("models"), list) else []
    main = next((m for m in models if isinstance(m, dict) and m.get("role", "model") == "model"), {})
    machine = report.get("machine") if isinstance(report.get("machine"), dict) else {}
    return {"sha256": main.get("sha256"), "provider": report.get("provider"), "precision": report.get("precision"),
            "threads": report.get("threads"), "graph_optimization": report.get("graph_optimization"),
            "cpu": machine.get("cpu")}


def context_mismatch(baseline: dict, now: dict) -> list[str]:
    """``["threads 4 (now 2)", ...]``: the fields where the baseline's context differs from now."""
    out = []
    for key in CONTEXT_FIELDS:
        b, n = baseline.get(key), now.get(key)
        if b != n:
            def show(v):
                return "not recorded" if v is None else (str(v)[:12] if key == "sha256" else str(v))
            out.append(f"{'model sha256' if key == 'sha256' else key} {show(b)} (now {show(n)})")
    return out


def check_baseline_context(baseline: dict, now: dict, *, allow: bool = False, source: str = "baseline") -> str:
    """Refuse (exit 2, one line) a baseline measured in another context; '' when it matches.

    With ``allow`` the same line is returned as a note instead of raised.
    """
    diff = context_mismatch(report_context(baseline), now)
    if not diff:
        return ""
    line = f"{source} was measured in another context: {'; '.join(diff)}"
    if allow:
        return f"note: {line}; compared anyway (--allow-baseline-mismatch)"
    raise CompressError(f"{line}; re-measure the baseline with the same settings, gate a changed model with "
                        f"--baseline-model OLD.onnx, or pass --allow-baseline-mismatch")


# ------------------------------------------------------------- the command
def gate_command(model, baseline_model, *, batch_sizes=(1,), threads=None, warmup: int = 5, provider: str = "cpu",
                 precision: str = "f32", graph_optimization: str = "all", rounds=None, max_regression=None,
                 max_cost_regression=None, budget_ms=None, percentile: str = "p50", json_out=None,
                 conflicts: dict | None = None, echo=print) -> dict:
    """``compress bench MODEL --baseline-model OLD.onnx``: run :func:`compare_latency`, print it,
    write ``--json``; raise :class:`CheckFailed` (exit 1) when a gate fails."""
    from compressor.errors import CheckFailed
    from compressor.fileio import check_output_path

    from .bench import check_budget, write_report

    if not baseline_model:
        raise CompressError("--rounds/--max-cost-regression compare against another file; "
                            "add --baseline-model OLD.onnx")
    given = [name for name, value in (conflicts or {}).items() if value not in (None, False, ())]
    if given:
        raise CompressError(f"--baseline-model times MODEL and OLD.onnx interleaved itself; drop {', '.join(given)}")
    if budget_ms is not None and not budget_ms > 0:
        raise CompressError(f"--budget-ms must be > 0, got {budget_ms:g}")
    if json_out:
        check_output_path(json_out, inputs=[model, baseline_model])
    report = compare_latency(model, baseline_model, rounds=DEFAULT_ROUNDS if rounds is None else rounds,
                             batch_sizes=batch_sizes, threads=threads, warmup=warmup, provider=provider,
                             precision=precision, graph_optimization=graph_optimization,
                             max_regression="10%" if max_regression is None else max_regression,
                             max_cost_regression=max_cost_regression)
    if budget_ms is not None:
        check_budget(report, budget_ms, percentile, raise_on_fail=False)
        report["passed"] = all(g["passed"] for g in report["gates"])
    echo(format_gate(report))
    if json_out:
        echo(f"wrote {write_report(report, json_out)}")
    failed = [g for g in report["gates"] if not g["passed"]]
    if failed:
        raise CheckFailed("; ".join(g["message"] for g in failed))
    return report
