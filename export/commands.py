"""Click commands ``compress export`` and ``compress bench``.

They are thin: parse options, call the library, print. Bad input raises
:class:`CompressError` (exit 2), a failed check :class:`CheckFailed` (exit 1);
``compressor.cli.main`` maps them to exit codes.
"""
from __future__ import annotations

from pathlib import Path

import click

from compressor.errors import CheckFailed, CompressError

from .options import GRAPH_OPT_LEVELS, PRECISIONS, PROVIDERS


def _parse_batch_sizes(values) -> list[int]:
    out = []
    for v in values or ():
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                b = int(part)
            except ValueError:
                raise CompressError(f"--batch-size {part!r} is not an integer; e.g. --batch-size 1,64") from None
            if b < 1:
                raise CompressError(f"--batch-size must be >= 1, got {b}")
            if b not in out:
                out.append(b)
    return out or [1]


def _kb(path) -> str:
    return f"{Path(path).stat().st_size / 1024:.0f} KB"


# ------------------------------------------------------------------ export
@click.command("export")
@click.argument("model", required=False)
@click.option("--onnx", "onnx_flag", is_flag=True, help="export to ONNX (the only format; the flag may be left out)")
@click.option("--out", default=None, help="output .onnx path  [default: the checkpoint path with .onnx]")
@click.option("--opset", type=int, default=None, help="ONNX opset  [default: the exporter's recommended one]")
@click.option("--legacy", is_flag=True, help="use the TorchScript exporter  [default: per model family, the one that "
                                             "agrees in every runtime; see docs/deployment.md]")
@click.option("--runtimes", default="installed", show_default=True,
              help="parity: runtimes checked besides onnxruntime, a comma list of openvino, opencv, opencv-classic "
                   "(installed: every one installed; onnxruntime: none)")
@click.option("--include-preprocessing", is_flag=True,
              help="fold (x - mean) / std into the graph; the input becomes float images in [0, 1]")
@click.option("--data", default=None, help="validate on 32 of this data's test images (and calibrate --quantize on "
                                           "its train images); only sampled images are decoded")
@click.option("--no-validate", is_flag=True, help="skip the checker and the onnxruntime-vs-PyTorch parity check")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="parity: absolute tolerance on logits")
@click.option("--rtol", type=float, default=1e-3, show_default=True, help="parity: relative tolerance on logits")
@click.option("--min-agreement", type=float, default=100.0, show_default=True,
              help="parity: minimum top-1 agreement, percent")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="also write NAME.int8.onnx (static INT8, QDQ, calibrated on --data) and compare it")
@click.option("--calibration-size", type=int, default=512, show_default=True,
              help="--quantize: number of training images used for calibration (spread over the classes)")
@click.option("--max-accuracy-drop", type=float, default=None,
              help="--quantize: try calibration methods (minmax, entropy, percentile), then the first conv and last "
                   "layer in float, until top-1 is at most this many points below fp32; exit 1 if none is; kept only "
                   "if also faster than fp32 (batch 1, timed interleaved). "
                   "--target: the accuracy budget of every candidate  [default: 0.5]")
@click.option("--eval-images", type=int, default=None,
              help="--quantize: compare fp32 and INT8 top-1 on N test images spread over the classes  "
                   "[default: 1000]")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads for checks and the INT8 report; "
                                                       "--target: the one count to try  [default: 1, 2, 4 ... cores]")
@click.option("--arch", default=None, help="the file.py:NAME a checkpoint of your own model names (runs that code)")
@click.option("--trust-code", is_flag=True, help="I trust the code this checkpoint names (file.py:NAME): import it")
@click.option("--target", type=click.Choice(["cpu"]), default=None,
              help="write a deploy bundle folder (--out DIR; model.onnx, deploy.json, predict.py) with the fastest "
                   "provider x precision x threads that passes validation on --data; see docs/deployment.md")
@click.option("--batch-size", "deploy_batch", type=int, default=1, show_default=True,
              help="--target: the batch size the configuration is picked for")
@click.option("--provider", "deploy_provider", type=click.Choice(["cpu", "openvino", "all"], case_sensitive=False),
              default="all", show_default=True, help="--target: the execution providers to try (all: every usable one)")
def export_cmd(model, onnx_flag, out, opset, legacy, include_preprocessing, data, no_validate, atol, rtol,
               min_agreement, quantize, calibration_size, max_accuracy_drop, eval_images, threads, arch,
               trust_code, target=None, deploy_batch=1, deploy_provider="all", runtimes="installed"):
    """Export a checkpoint to ONNX, check it against PyTorch, optionally quantise to INT8.

    MODEL is a .safetensors checkpoint or a run folder (its student.safetensors);
    without MODEL, runs/latest/student.safetensors. Exit 1 when the parity check
    fails (the file is then renamed NAME.invalid.onnx) or no INT8 candidate
    meets --max-accuracy-drop (the best one is still written), 2 on bad input.

    \b
    Example:  compress export --onnx runs/latest --out student.onnx --data demo --quantize int8
    Example:  compress export runs/latest --data demo --quantize int8 --max-accuracy-drop 0.5
    Example:  compress export runs/latest --target cpu --data demo --out deploy/
    """
    from compressor.checkpoint import load_model
    from compressor.fileio import check_output_path

    from .onnx_export import default_onnx_path, export_onnx, resolve_checkpoint
    from .validate import validate_onnx

    if target:
        return _export_target(model, target, out, data, deploy_batch, deploy_provider.lower(), max_accuracy_drop,
                              threads, calibration_size, opset, legacy, include_preprocessing, arch, trust_code,
                              conflicts={"--quantize": quantize, "--no-validate": no_validate,
                                         "--eval-images": eval_images})
    if deploy_batch != 1 or deploy_provider.lower() != "all":
        raise CompressError("--batch-size/--provider choose the deploy bundle's configuration; add --target cpu")
    if quantize and not data:
        raise CompressError("--quantize int8 needs --data for calibration images (e.g. --data demo)")
    from .parity import resolve_runtimes

    runtimes = resolve_runtimes(runtimes)  # an unknown or missing runtime fails before the export
    if not 0 <= min_agreement <= 100:
        raise CompressError(f"--min-agreement is a percentage in [0, 100], got {min_agreement:g}")
    if atol < 0 or rtol < 0:
        raise CompressError(f"--atol/--rtol must be >= 0, got {atol:g}/{rtol:g}")
    if calibration_size < 1:
        raise CompressError(f"--calibration-size must be >= 1, got {calibration_size}")
    if (max_accuracy_drop is not None or eval_images is not None) and quantize != "int8":
        raise CompressError("--max-accuracy-drop/--eval-images tune INT8 quantisation; add --quantize int8 --data DATA")
    if max_accuracy_drop is not None and max_accuracy_drop < 0:
        raise CompressError(f"--max-accuracy-drop is in top-1 points and must be >= 0, got {max_accuracy_drop:g}")
    if eval_images is not None and eval_images < 1:
        raise CompressError(f"--eval-images must be >= 1, got {eval_images}")
    ckpt = resolve_checkpoint(model)
    out_path = check_output_path(out if out else default_onnx_path(ckpt), inputs=[ckpt])
    if out_path.suffix != ".onnx":
        raise CompressError(f"--out {str(out_path)!r} should end in .onnx")

    from compressor.checkpoint import file_sha256

    torch_model, meta = load_model(ckpt, arch=arch, trust_code=trust_code)
    from compressor.fileio import shorten

    click.echo(f"{ckpt}: sha256 {file_sha256(ckpt)}, source: {shorten(meta.source) or 'not recorded'}")
    bundle = None
    if data:
        from .quantize import DEFAULT_EVAL_IMAGES
        from .runtime import load_bundle
        from .validate import VALIDATION_IMAGES

        # At the model's size, before the slow export (bad --data fails first). Only sampled images
        # are decoded (seeded, spread over the classes): the validation inputs and, with --quantize,
        # the INT8 evaluation images; the train split is read only with --quantize (calibration).
        n_test = max(VALIDATION_IMAGES, eval_images or DEFAULT_EVAL_IMAGES) if quantize else VALIDATION_IMAGES
        bundle = load_bundle(data, meta, splits=("test",), sample=n_test)
        if quantize:
            calibration = load_bundle(data, meta, splits=("train",), sample=calibration_size)
            if calibration is not bundle:
                bundle.train = calibration.train
        for note in bundle.notes:
            click.echo(f"data: {note}")
    written = export_onnx((torch_model, meta), out_path, opset=opset, legacy=legacy,
                          include_preprocessing=include_preprocessing, source_path=ckpt)
    from .runtime import OnnxModel

    info = OnnxModel(written, threads=1).metadata
    click.echo(f"exported {written} ({meta.arch}, opset {info.get('opset')}, {_kb(written)}, "
               f"preprocessing {info.get('preprocessing')}, "
               f"{'TorchScript' if 'TorchScript' in info.get('exporter', '') else 'dynamo'} exporter: "
               f"{info.get('exporter_choice', '')})")
    if no_validate:
        click.echo("validation skipped (--no-validate)")
    else:
        report = validate_onnx(written, torch_model, meta, data=bundle, atol=atol, rtol=rtol, runtimes=runtimes,
                               min_agreement=min_agreement / 100.0, threads=threads, data_label=data)
        click.echo(report.summary())

    if quantize == "int8":
        from .quantize import calibration_images, format_int8_report, int8_path, int8_report, quantize_static_int8

        q_out = int8_path(written)
        if max_accuracy_drop is not None:
            _int8_search(written, q_out, bundle, max_accuracy_drop, calibration_size, eval_images, threads)
            return
        calib = calibration_images(bundle, calibration_size)
        quantize_static_int8(written, q_out, calib)
        click.echo(f"quantised {q_out} (static INT8, QDQ per-channel, {len(calib)} calibration images, {_kb(q_out)})")
        rep = int8_report(written, q_out, bundle, threads=threads, eval_images=eval_images or DEFAULT_EVAL_IMAGES)
        click.echo(format_int8_report(rep))


def _export_target(model, target, out, data, batch, provider, max_accuracy_drop, threads, calibration_size, opset,
                   legacy, include_preprocessing, arch, trust_code, conflicts) -> None:
    """``export --target``: search the fastest validated configuration and write the bundle (export.bundle)."""
    from .bundle import DEFAULT_BUDGET, build_bundle, default_bundle_path
    from .onnx_export import resolve_checkpoint
    from .options import PROVIDERS

    given = [name for name, value in conflicts.items() if value]
    if given:
        raise CompressError(f"{', '.join(given)} do not apply to --target (it validates and tries INT8 itself); "
                            f"drop {'them' if len(given) > 1 else 'it'}")
    if threads is not None and threads < 1:
        raise CompressError(f"--threads must be >= 1, got {threads}")
    ckpt = resolve_checkpoint(model)
    build_bundle(ckpt, out or default_bundle_path(ckpt, target), data, target=target, batch=batch,
                 max_accuracy_drop=DEFAULT_BUDGET if max_accuracy_drop is None else max_accuracy_drop,
                 providers=PROVIDERS if provider == "all" else (provider,), threads=threads,
                 calibration_size=calibration_size, opset=opset, legacy=legacy,
                 include_preprocessing=include_preprocessing, arch=arch, trust_code=trust_code, data_label=data,
                 echo=click.echo)


def _int8_search(written, q_out, bundle, max_drop, calibration_size, eval_images, threads) -> None:
    from .quantize import quantize_accuracy_aware

    res = quantize_accuracy_aware(written, q_out, bundle, max_drop, calibration_size=calibration_size,
                                  eval_images=eval_images, threads=threads, echo=click.echo)
    best = res["candidates"][res["best"]]
    if not res["kept"]:  # within budget but not faster than fp32: the search printed why
        return
    what = (f"{best['candidate']}, top-1 {best['top1']:.2f}% (drop {best['drop']:+.2f} points), "
            f"batch-1 {best['speedup']:.2f}x fp32, {_kb(q_out)}")
    if not res["passed"]:
        raise CheckFailed(f"no INT8 candidate within {max_drop:g} top-1 points of fp32 after "
                          f"{len(res['candidates'])} tries; the best ({what}) is written to {q_out}")
    click.echo(f"quantised {q_out} ({what})")


# ------------------------------------------------------------------- bench
def find_torch_checkpoint(onnx_path, checkpoint=None, *, metadata: dict | None = None) -> Path:
    """The .safetensors an ONNX file came from: ``checkpoint``, else its metadata
    (``source_checkpoint``, relative to the ONNX file), else ``NAME.safetensors`` beside it.
    ``metadata``: the file's metadata when the caller has read it already."""
    from compressor.checkpoint import check_readable_file

    from .runtime import OnnxModel

    if checkpoint:
        return check_readable_file(checkpoint, "checkpoint")
    onnx_path = Path(onnx_path)
    meta = metadata if metadata is not None else OnnxModel(onnx_path, threads=1).metadata
    candidates = []
    src = meta.get("source_checkpoint")
    if src:
        p = Path(src)
        candidates.append(p if p.is_absolute() else onnx_path.parent / p)
    candidates.append(onnx_path.with_suffix(".safetensors"))
    for c in candidates:
        if c.is_file():
            return c
    raise CompressError(
        f"--torch needs the PyTorch checkpoint of {onnx_path} and none was found "
        f"(looked at {', '.join(str(c) for c in candidates)}); pass --checkpoint MODEL.safetensors"
    )


def load_torch_for(onnx_path, checkpoint=None, *, echo=click.echo, trust_code: bool = False):
    """Load the PyTorch model for ``--torch``, checking it is the exported architecture."""
    from compressor.checkpoint import file_sha256, load_model

    from .runtime import OnnxModel

    props = OnnxModel(onnx_path, threads=1).metadata
    ckpt = find_torch_checkpoint(onnx_path, checkpoint, metadata=props)
    model, meta = load_model(ckpt, trust_code=trust_code)
    if props.get("arch") and props["arch"] != meta.arch:
        raise CompressError(f"{ckpt} is a {meta.arch} but {onnx_path} is a {props['arch']}; "
                            f"pass the matching --checkpoint")
    if props.get("source_sha256") and props["source_sha256"] != file_sha256(ckpt):
        echo(f"note: {ckpt} is not the exact file {onnx_path} was exported from (sha256 differs); "
             f"same architecture, so the latency comparison holds", err=True)
    return model, ckpt


@click.command("bench")
@click.argument("model")
@click.option("--compare", default=None, help="another .onnx timed in the same run (e.g. the INT8 or the old model)")
@click.option("--torch", "with_torch", is_flag=True, help="also time PyTorch eager on the same inputs")
@click.option("--checkpoint", default=None, help="--torch: the .safetensors  [default: from the ONNX metadata]")
@click.option("--batch-size", "batch_sizes", multiple=True, help="batch size(s): repeat or comma list  [default: 1]")
@click.option("--threads", type=int, default=None,
              help="intra-op threads  [default: usable cores, at most 8; --provider all: 1, 2, 4 ... cores]")
@click.option("--warmup", type=int, default=10, show_default=True, help="untimed runs per engine first")
@click.option("--iters", type=int, default=None, help="timed runs per engine and batch size")
@click.option("--seconds", type=float, default=None, help="time per engine and batch size instead of --iters  [default: 1]")
@click.option("--provider", type=click.Choice([*PROVIDERS, "all"], case_sensitive=False), default="cpu",
              show_default=True, help="onnxruntime execution provider; all: one table of every available provider "
                                      "x fp32/bf16/int8 file x batch size, checked against cpu fp32")
@click.option("--precision", type=click.Choice(PRECISIONS, case_sensitive=False), default="f32", show_default=True,
              help="--provider openvino: inference precision hint")
@click.option("--data", default=None, help="--provider all: check parity (top-1) on this data's test images")
@click.option("--graph-opt", type=click.Choice(GRAPH_OPT_LEVELS, case_sensitive=False), default="all",
              show_default=True, help="onnxruntime graph optimisation level")
@click.option("--budget-ms", type=float, default=None, help="gate: exit 1 if the latency exceeds this (ms)")
@click.option("--percentile", type=click.Choice(["p50", "p90", "p99"]), default="p50", show_default=True,
              help="which latency the gates compare")
@click.option("--baseline", default=None, help="gate: an earlier 'bench --json' report to compare against")
@click.option("--max-regression", default=None,
              help="gate: allowed slow-down vs --baseline / --baseline-model, e.g. 10%  [default: 10%]")
@click.option("--baseline-model", default=None,
              help="gate: OLD.onnx timed interleaved with MODEL in this run; exit 1 only when the slowdown's 95% CI "
                   "lower bound exceeds 1 + --max-regression (the gate for noisy CI runners)")
@click.option("--rounds", type=int, default=None, help="--baseline-model: interleaved rounds  [default: 15]")
@click.option("--max-cost-regression", default=None,
              help="--baseline-model: also exit 1 when MACs, parameters, nodes or file bytes grow by more, e.g. 10%")
@click.option("--allow-baseline-mismatch", is_flag=True,
              help="--baseline: compare although its model sha256, provider, precision, threads, graph level or CPU "
                   "differ from this run (the differences are printed)")
@click.option("--json", "json_out", default=None, help="write the full report (JSON) here")
@click.option("--trust-code", is_flag=True, help="--torch: I trust the code the checkpoint names (file.py:NAME)")
def bench_cmd(model, compare, with_torch, checkpoint, batch_sizes, threads, warmup, iters, seconds, provider,
              precision, data, graph_opt, budget_ms, percentile, baseline, max_regression, json_out, trust_code,
              baseline_model=None, rounds=None, max_cost_regression=None, allow_baseline_mismatch=False):
    """Latency of an ONNX model with onnxruntime (p50/p90/p99, throughput), with CI gates.

    Exit 1 when --budget-ms is exceeded or the model is slower than --baseline by
    more than --max-regression; the --json report is written first either way.
    --provider all compares the usable providers (NAME.int8.onnx beside MODEL is
    included) and names the fastest row that passes parity; an unavailable
    --provider is exit 2 with the install hint.

    \b
    Example:  compress bench student.onnx --torch --budget-ms 2 --baseline main.json --max-regression 10% --json bench.json
    Example:  compress bench new.onnx --baseline-model old.onnx --max-regression 10% --max-cost-regression 10%
    Example:  compress bench student.onnx --provider all --batch-size 1,64 --data demo
    """
    from compressor.fileio import check_output_path

    from .bench import benchmark_onnx, check_baseline, check_budget, format_table, load_baseline, parse_ratio, write_report
    from .providers import check_precision

    sizes = _parse_batch_sizes(batch_sizes)
    if iters is not None and seconds is not None:
        raise CompressError("give --iters or --seconds, not both")
    provider, precision = provider.lower(), precision.lower()
    if data and provider != "all":
        raise CompressError("--data is for --provider all (parity on test images); drop it or add --provider all")
    if provider == "all":
        if (compare or with_torch or checkpoint or budget_ms is not None or baseline or max_regression
                or baseline_model or rounds is not None or max_cost_regression):
            raise CompressError("--provider all prints the provider table only; --compare/--torch and the gates "
                                "need one --provider")
        return _bench_all_providers(model, batch_sizes, sizes, threads, warmup, iters, seconds, data, json_out)
    check_precision(provider, precision)
    if baseline_model or rounds is not None or max_cost_regression is not None:
        from .gate import gate_command

        gate_command(model, baseline_model, batch_sizes=sizes, threads=threads, warmup=warmup, provider=provider,
                     precision=precision, graph_optimization=graph_opt.lower(), rounds=rounds,
                     max_regression=max_regression, max_cost_regression=max_cost_regression, budget_ms=budget_ms,
                     percentile=percentile, json_out=json_out, echo=click.echo,
                     conflicts={"--baseline": baseline, "--compare": compare, "--torch": with_torch,
                                "--checkpoint": checkpoint, "--iters": iters, "--seconds": seconds,
                                "--allow-baseline-mismatch": allow_baseline_mismatch})
        return
    if max_regression is not None and baseline is None:
        raise CompressError("--max-regression needs --baseline OLD.json or --baseline-model OLD.onnx")
    if checkpoint and not with_torch:
        raise CompressError("--checkpoint is only used with --torch")
    ratio = parse_ratio(max_regression if max_regression is not None else "10%")
    if budget_ms is not None and not budget_ms > 0:
        raise CompressError(f"--budget-ms must be > 0, got {budget_ms:g}")
    base = load_baseline(baseline) if baseline else None  # malformed baseline: fail before timing
    if json_out:
        check_output_path(json_out, inputs=[model, compare, checkpoint, baseline])
    if base is not None:  # a baseline measured on another model, provider, precision, threads, level or CPU
        from .gate import check_baseline_context, run_context

        note = check_baseline_context(base, run_context(model, provider=provider, precision=precision, threads=threads,
                                                        graph_optimization=graph_opt), source=f"baseline {baseline}",
                                      allow=allow_baseline_mismatch)
        if note:
            click.echo(note, err=True)

    torch_model = ckpt = None
    if with_torch:
        torch_model, ckpt = load_torch_for(model, checkpoint, trust_code=trust_code)
    report = benchmark_onnx(model, batch_sizes=sizes, threads=threads, warmup=warmup, iters=iters,
                            seconds=seconds, providers=provider, graph_optimization=graph_opt.lower(),
                            torch_model=torch_model, compare=compare, precision=precision)
    if ckpt is not None:
        report["torch_checkpoint"] = str(ckpt)

    gates = []
    if budget_ms is not None:
        gates += check_budget(report, budget_ms, percentile, raise_on_fail=False)
    if base is not None:
        gates += check_baseline(report, base, ratio, percentile, raise_on_fail=False)
        for g in gates:
            if g["kind"] == "baseline":
                g["baseline"] = str(baseline)
    click.echo(format_table(report))
    if json_out:
        click.echo(f"wrote {write_report(report, json_out)}")
    failed = [g for g in gates if not g["passed"]]
    if failed:
        raise CheckFailed("; ".join(g["message"] for g in failed))


def _bench_all_providers(model, given_sizes, sizes, threads, warmup, iters, seconds, data, json_out) -> None:
    from compressor.fileio import check_output_path, write_json

    from .provider_table import format_provider_table, provider_table

    if json_out:
        check_output_path(json_out, inputs=[model])
    rep = provider_table(model, batch_sizes=sizes if given_sizes else (1, 64), threads=threads or "search",
                         warmup=warmup,
                         iters=iters, seconds=seconds if seconds is not None or iters is not None else 1.0,
                         data=data)
    click.echo(format_provider_table(rep))
    if json_out:
        write_json(json_out, rep)
        click.echo(f"wrote {json_out}")
