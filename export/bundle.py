"""Deploy bundle: ``compress export --target cpu`` picks the fastest validated configuration and
writes it as a folder a server can use without compress (numpy + Pillow + onnxruntime).

The search (:func:`build_bundle`): export the checkpoint to ONNX fp32 and check it against
PyTorch; quantise a static INT8 file calibrated on the data; run the provider table
(:func:`export.provider_table.provider_table`) over providers (cpu, OpenVINO when usable),
precisions (fp32; OpenVINO's bf16 hint; INT8) and thread counts (1, 2, 4, ... the usable
cores) at the deployment batch size, each row validated on a spread sample of the test
split (up to 1,000 images; fp32 rows: logits within tolerance of cpu fp32, bf16/INT8 rows:
top-1 at most ``max_accuracy_drop`` points below it). :func:`choose_config` then takes the
row with the lowest p50 latency among those that pass -- an INT8 row only when it is also
faster than fp32 on its own provider and thread count -- and says why INT8 was or was not kept.

The bundle (:data:`BUNDLE_FILES`), written atomically as a whole (:func:`staged_folder`):
``model.onnx`` (the chosen file), ``deploy.json`` (:data:`SCHEMA`, layout in
docs/deployment.md) and ``predict.py`` (:mod:`export.bundle_predict`, whose preprocessing is
the recipe of docs/preprocessing.md).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from compressor.errors import CompressError

SCHEMA = "compress.deploy/1"
TARGETS = ("cpu",)
BUNDLE_FILES = ("model.onnx", "deploy.json", "predict.py")
PREDICT_TEMPLATE = Path(__file__).with_name("bundle_predict.py")
DEFAULT_BUDGET = 0.5  # top-1 points below fp32


# ---------------------------------------------------------------------- choice
def _row_brief(r: dict) -> str:
    return f"{r['provider']} {r['variant']} x {r['threads']} thread{'s' if r['threads'] != 1 else ''}"


def choose_config(table: dict, batch: int = 1) -> dict:
    """The fastest validated row of a provider-table report at ``batch`` (pure; no timing here).

    Candidates: rows that pass validation; an ``int8`` row only when its p50 is below the
    ``fp32`` row's on the same provider and thread count. Returns ``{"chosen": row,
    "baseline": cpu fp32 row at the reference thread count, "int8": why INT8 was kept or
    not (one line), "reasons": [one line per rejected row kind]}``.
    """
    rows = [r for r in table["rows"] if r["batch_size"] == int(batch)]
    if not rows:
        raise CompressError(f"the provider table has no row at batch {batch}; time that batch size")
    fp32 = {(r["provider"], r["threads"]): r for r in rows if r["variant"] == "fp32"}
    candidates = []
    for r in rows:
        if not r["parity_passed"]:
            continue
        ref = fp32.get((r["provider"], r["threads"]))
        if r["variant"] == "int8" and ref is not None and not r["p50_ms"] < ref["p50_ms"]:
            continue
        candidates.append(r)
    if not candidates:
        raise CompressError("no configuration passed validation (not even cpu fp32); check the model and the data")
    best = min(candidates, key=lambda r: r["p50_ms"])
    base_threads = table.get("reference_threads", table.get("threads"))
    baseline = next((r for r in rows if r["provider"] == "cpu" and r["variant"] == "fp32"
                     and r["threads"] == base_threads), None)
    return {"chosen": best, "baseline": baseline, "int8": _int8_note(rows, best, fp32, table),
            "candidates": len(candidates)}


def _int8_note(rows, best, fp32, table) -> str:
    """Why INT8 is or is not the deployed precision, judged on the chosen runtime."""
    budget = table.get("rules", {}).get("max_accuracy_drop", DEFAULT_BUDGET)
    key = (best["provider"], best["threads"])
    q = next((r for r in rows if r["variant"] == "int8" and (r["provider"], r["threads"]) == key), None)
    f = fp32.get(key)
    if q is None:
        return "INT8 not tried (no INT8 file)" if not any(r["variant"] == "int8" for r in rows) else \
            f"INT8 not run on {best['provider']}"
    ref_top1 = table.get("reference_top1")
    acc = (f"top-1 {q['top1']:.2f}% vs fp32 {ref_top1:.2f}%" if q.get("top1") is not None and ref_top1 is not None
           else f"top-1 agreement {100 * q['top1_agreement']:.2f}%")
    speed = f"p50 {q['p50_ms']:.3f} ms vs fp32 {f['p50_ms']:.3f} ms" if f else f"p50 {q['p50_ms']:.3f} ms"
    runtime = f"{best['provider']} x {best['threads']} thread{'s' if best['threads'] != 1 else ''}"
    if best is q:
        return f"INT8 kept: within the {budget:g}-point budget ({acc}) and faster than fp32 on {runtime} ({speed})"
    if not q["parity_passed"]:
        return f"INT8 rejected: outside the {budget:g}-point accuracy budget ({acc})"
    if f is not None and not q["p50_ms"] < f["p50_ms"]:
        return f"INT8 rejected: not faster than fp32 on {runtime} ({speed})"
    return f"INT8 not chosen: valid and faster than fp32 on {runtime} ({speed}), but {_row_brief(best)} is faster"


# ---------------------------------------------------------------------- folder
@contextlib.contextmanager
def staged_folder(out):
    """Yield an empty temporary folder beside ``out``; on success it replaces ``out`` (an earlier
    bundle) in one rename, on any failure it is deleted and ``out`` is left as it was."""
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".compress-tmp.{os.getpid()}.{out.name[:100]}.", dir=out.parent))
    old = None
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if out.exists():
            old = tmp.with_name(tmp.name + ".old")
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not out.exists():
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_bundle_out(out, inputs=()) -> Path:
    """``out`` may be written as a bundle folder: new, or an earlier bundle (it holds deploy.json)."""
    from compressor.fileio import shorten

    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CompressError(f"output folder {shorten(str(parent))!r} does not exist; create it first or choose "
                            f"another --out")
    if not os.access(parent, os.W_OK):
        raise CompressError(f"output folder {shorten(str(parent))!r} is not writable; choose another --out")
    if out.exists() and not out.is_dir():
        raise CompressError(f"--out {shorten(str(out))!r} is a file; a bundle is a folder: choose a new name")
    if out.is_dir() and any(out.iterdir()) and not (out / "deploy.json").is_file():
        raise CompressError(f"--out {shorten(str(out))!r} is a folder that is not a deploy bundle; refusing to "
                            f"replace it: choose a new folder name")
    for src in inputs:
        if src is not None and Path(src).resolve().is_relative_to(out.resolve()):
            raise CompressError(f"--out {shorten(str(out))!r} holds the input {shorten(str(src))!r}; replacing "
                                f"it would destroy the input: choose another folder")
    return out


def default_bundle_path(checkpoint, target: str = "cpu") -> Path:
    """``NAME-deploy-cpu/`` beside the checkpoint ``NAME.safetensors``."""
    ckpt = Path(checkpoint)
    return ckpt.with_name(f"{ckpt.stem}-deploy-{target}")


# ---------------------------------------------------------------------- deploy.json
def preprocessing_spec(meta, normalize_in_graph: bool) -> dict:
    """deploy.json's ``preprocessing``: the evaluation view of the model's policy
    (:func:`compressor.data.view.eval_view` for an image folder), the normalisation, the channel order."""
    from compressor.data.view import eval_view

    c, h, w = (int(v) for v in meta.input_size)
    policy = (meta.metrics or {}).get("augment", "cifar")
    view = eval_view(policy, (h, w))
    return {"policy": policy, "channels": c, "color_order": "RGB" if c == 3 else "L",
            "decode": "Pillow, .convert('RGB') (or 'L'); EXIF orientation not applied",
            "store": list(view.store), "size": [h, w], "crop": view.crop,
            "interpolation": f"{view.interpolation}, antialiased (torch's uint8 kernel: fixed point, width then "
                             f"height)", "resize": "aspect ratio kept, to just cover size / crop; then center crop",
            "scale": "1/255", "mean": [float(v) for v in meta.mean], "std": [float(v) for v in meta.std],
            "normalize_in_graph": bool(normalize_in_graph), "layout": "NCHW float32",
            "recipe": "docs/preprocessing.md"}


def _latency(r: dict | None) -> dict | None:
    if r is None:
        return None
    return {"provider": r["provider"], "precision": r["variant"], "threads": r["threads"], "p50_ms": r["p50_ms"],
            "throughput_ips": r["throughput_ips"], "cv": r["cv"]}


def deploy_record(*, meta, onnx_file: Path, table: dict, choice: dict, batch: int, data_label: str,
                  graph_optimization: str, normalize_in_graph: bool, target: str = "cpu", source=None) -> dict:
    """The deploy.json dict (schema :data:`SCHEMA`)."""
    from compressor.checkpoint import file_sha256

    best, base = choice["chosen"], choice["baseline"]
    c, h, w = (int(v) for v in meta.input_size)
    ref_top1 = table.get("reference_top1")
    top1 = best.get("top1")
    latency = {"batch": int(batch), **_latency(best), "baseline": _latency(base),
               "p50_speedup_vs_baseline": (base["p50_ms"] / best["p50_ms"]) if base else None,
               "throughput_vs_baseline": (best["throughput_ips"] / base["throughput_ips"]) if base else None,
               "machine": table.get("machine"), "onnxruntime": table.get("versions", {}).get("onnxruntime")}
    return {
        "schema": SCHEMA,
        "target": target,
        "model": {"file": "model.onnx", "sha256": file_sha256(onnx_file), "arch": meta.arch,
                  "precision": "int8" if best["variant"] == "int8" else "fp32",
                  "source_checkpoint": str(source) if source else None},
        "runtime": {"engine": "onnxruntime", "provider": best["provider"], "precision": best["variant"],
                    "precision_hint": best["precision"], "threads": int(best["threads"]),
                    "graph_optimization": graph_optimization, "batch": int(batch)},
        "input": {"shape": [int(batch), c, h, w], "channels": c, "size": [h, w], "dtype": "float32",
                  "layout": "NCHW"},
        "preprocessing": preprocessing_spec(meta, normalize_in_graph),
        "class_names": [str(n) for n in meta.class_names] or [str(i) for i in range(int(meta.num_classes))],
        "latency": latency,
        "accuracy": {"data": data_label, "split": "test", "images": table.get("parity_inputs"),
                     "top1": top1, "fp32_top1": ref_top1,
                     "drop_points": (ref_top1 - top1) if top1 is not None and ref_top1 is not None else None,
                     "budget_points": table.get("rules", {}).get("max_accuracy_drop")},
        "decision": {"int8": choice["int8"], "candidates_passing": choice["candidates"],
                     "rule": "lowest p50 at the batch among rows that pass validation; INT8 only when also faster "
                             "than fp32 on its provider and thread count"},
        "search": [{k: r.get(k) for k in ("provider", "variant", "precision", "threads", "batch_size", "p50_ms",
                                           "throughput_ips", "cv", "top1", "top1_agreement", "max_abs_diff",
                                           "parity_passed")} for r in table["rows"]],
    }


# ---------------------------------------------------------------------- build
def build_bundle(checkpoint, out, data, *, target: str = "cpu", batch: int = 1,
                 max_accuracy_drop: float = DEFAULT_BUDGET, providers=None, threads=None, int8: bool = True,
                 calibration_size: int = 512, parity_images: int | None = None, seconds: float | None = 1.0,
                 iters: int | None = None, warmup: int = 10, opset: int | None = None, legacy: bool = False,
                 include_preprocessing: bool = False, arch: str | None = None, trust_code: bool = False,
                 data_label: str | None = None, echo=print, timer=None, model=None) -> dict:
    """Search the fastest validated configuration of ``checkpoint`` and write the bundle folder ``out``.

    ``data``: a data spec (validation, calibration, accuracy). ``threads``: ``None`` searches
    (:func:`export.provider_table.thread_counts`), an int fixes it. ``providers``: default every
    usable one. ``timer``: times the candidates' sessions
    (:func:`export.provider_table.time_interleaved`; tests inject one). ``model``: an already loaded
    ``(torch_model, meta)``. Returns the deploy.json dict.
    """
    from compressor.checkpoint import load_model

    from .onnx_export import export_onnx
    from .options import PROVIDERS
    from .provider_table import format_provider_table, provider_table, time_interleaved
    from .quantize import calibration_images, quantize_static_int8
    from .validate import validate_onnx

    if target not in TARGETS:
        raise CompressError(f"unknown --target {target!r}; use one of {', '.join(TARGETS)}")
    if int(batch) < 1:
        raise CompressError(f"--batch-size must be >= 1, got {batch}")
    if max_accuracy_drop < 0:
        raise CompressError(f"--max-accuracy-drop is in top-1 points and must be >= 0, got {max_accuracy_drop:g}")
    if data is None:
        raise CompressError("--target needs --data DATA: every candidate is validated on its test images "
                            "(e.g. --data demo)")
    out = check_bundle_out(out, inputs=[checkpoint])
    torch_model, meta = model if model is not None else load_model(checkpoint, arch=arch, trust_code=trust_code)
    with staged_folder(out) as tmp:
        fp32 = export_onnx((torch_model, meta), tmp / "model.fp32.onnx", opset=opset, legacy=legacy,
                           include_preprocessing=include_preprocessing, source_path=checkpoint)
        report = validate_onnx(fp32, torch_model, meta, data=data, rename_invalid=False, data_label=data_label)
        echo(report.summary())
        q = None
        if int8:
            # metadata paths relative to tmp, a sibling of out that becomes it: valid in the bundle
            q = quantize_static_int8(fp32, tmp / "model.int8.onnx",
                                     calibration_images(data, calibration_size, meta=meta))
        table = provider_table(fp32, int8=q, batch_sizes=(int(batch),), threads=threads or "search",
                               warmup=warmup, iters=iters, seconds=seconds, data=data, parity_images=parity_images,
                               max_accuracy_drop=max_accuracy_drop, providers=providers or PROVIDERS,
                               timer=timer or time_interleaved)
        echo(format_provider_table(table))
        choice = choose_config(table, batch)
        best = choice["chosen"]
        chosen = Path(best["path"])
        os.replace(chosen, tmp / "model.onnx")
        # an INT8 winner keeps the fp32 file it was validated against (its metadata's fp32_source)
        for leftover in ((q,) if best["variant"] == "int8" else (fp32, q)):
            if leftover is not None and Path(leftover).exists():
                Path(leftover).unlink()
        record = deploy_record(meta=meta, onnx_file=tmp / "model.onnx", table=table, choice=choice, batch=batch,
                               data_label=data_label or str(data), graph_optimization="all",
                               normalize_in_graph=include_preprocessing, target=target,
                               source=os.path.relpath(os.path.abspath(checkpoint), os.path.abspath(out)))
        (tmp / "deploy.json").write_text(json.dumps(record, indent=2) + "\n")
        shutil.copyfile(PREDICT_TEMPLATE, tmp / "predict.py")
    echo(format_choice(record, out))
    return record


def format_choice(record: dict, out) -> str:
    lat, acc, rt = record["latency"], record["accuracy"], record["runtime"]
    base = lat.get("baseline")
    lines = [f"chosen for batch {rt['batch']}: {rt['provider']} {rt['precision']} x {rt['threads']} thread(s): "
             f"p50 {lat['p50_ms']:.3f} ms, {lat['throughput_ips']:.0f} img/s"
             + (f" ({lat['p50_speedup_vs_baseline']:.2f}x onnxruntime cpu fp32 x {base['threads']} "
                f"thread{'s' if base['threads'] != 1 else ''}, "
                f"p50 {base['p50_ms']:.3f} ms)" if base else "")]
    if acc["top1"] is not None:
        lines.append(f"accuracy: top-1 {acc['top1']:.2f}% vs fp32 {acc['fp32_top1']:.2f}% on {acc['images']} test "
                     f"images of {acc['data']} (budget {acc['budget_points']:g} points)")
    lines.append(record["decision"]["int8"])
    files = BUNDLE_FILES + (("model.fp32.onnx",) if record["model"]["precision"] == "int8" else ())
    lines.append(f"wrote {out}/ ({', '.join(files)}); try: python {Path(out) / 'predict.py'} IMAGE_OR_FOLDER")
    return "\n".join(lines)
