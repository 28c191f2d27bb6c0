"""Export a checkpoint to one self-contained ONNX file that describes itself.

The file has one input ``input`` (float32, ``[batch, C, H, W]``) and one output
``logits`` (``[batch, num_classes]``); the batch axis is dynamic. Its
``metadata_props`` carry the checkpoint metadata (see :data:`METADATA_KEYS`),
so ``compress eval model.onnx`` and ``compress bench`` need nothing else.

With ``include_preprocessing=True`` the normalisation ``(x - mean) / std`` is
part of the graph and the input is float images in ``[0, 1]``
(``metadata_props["preprocessing"] == "normalize"``); otherwise the input is
already normalised (``"none"``).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from compressor.checkpoint import CheckpointMeta, check_readable_file, file_sha256, load_model
from compressor.errors import CompressError
from compressor.fileio import atomic_write, check_output_path

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_LEGACY_OPSET = 17
PREPROCESSING = ("none", "normalize")
DEFAULT_RUN_CHECKPOINT = Path("runs") / "latest" / "student.safetensors"

#: Keys written to ``metadata_props`` (all values are strings; structured ones JSON).
METADATA_KEYS = (
    "arch", "num_classes", "in_chans", "input_size", "mean", "std", "class_names", "model_kwargs",
    "metrics", "source", "format_version",          # copied from the checkpoint metadata
    "source_checkpoint", "source_sha256",            # where the weights came from
    "opset", "exporter", "exporter_choice", "preprocessing", "input_name", "output_name",
)

EXPORTERS = ("auto", "dynamo", "legacy")
#: The opset the dynamo exporter translates to; below it, it converts down, which fails for most graphs
#: (onnx has no Pad-18 -> 17 adapter and onnxscript converts only 18 and up).
DYNAMO_MIN_OPSET = 18

#: The exporter path each zoo family is exported with by default (``exporter="auto"``) and why.
#: Measured with every family's smallest member (cifar stem, 32 px), BN statistics from demo images, 256 demo
#: test images, both exporters (torch 2.14.1, onnxruntime 1.32.0, OpenVINO 2026.4.1 f32, OpenCV 5.0.0 default
#: and classic engines; the table in docs/deployment.md#runtimes, the check in tests/test_runtime_parity.py). Families not listed: both paths agree with PyTorch in every runtime, and
#: dynamo is torch's maintained exporter, so it is first (TorchScript is the fallback when dynamo cannot
#: trace the model or reach the requested opset). A table rather than "export twice and keep what agrees":
#: the choice is known before exporting, costs one export, and the same checkpoint always gives the same graph.
FAMILY_EXPORTER = {
    "mobilenetv3": ("legacy", "OpenCV DNN (every engine) computes the dynamo graph's squeeze-excitation "
                              "(ReduceMean with an axes input, then HardSigmoid * x) wrong: 0 % top-1; the "
                              "TorchScript graph (GlobalAveragePool) agrees in every runtime"),
    "shufflenetv2": ("dynamo", "OpenCV's classic engine cannot load the TorchScript graph's channel shuffle "
                               "(permute_layer assertion); the dynamo graph agrees in every runtime"),
}
DEFAULT_EXPORTER_REASON = "both exporters agree in every runtime for this family; dynamo is torch's maintained one"


class NormalizedModel(nn.Module):
    """``model((x - mean) / std)``: folds the input normalisation into the graph."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        c = len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


def resolve_checkpoint(model_arg: str | os.PathLike | None) -> Path:
    """``None`` -> ``runs/latest/student.safetensors``; a run folder -> its ``student.safetensors``."""
    if model_arg is None:
        p = DEFAULT_RUN_CHECKPOINT
        if not p.exists():
            raise CompressError(
                f"no MODEL given and {str(p)!r} does not exist; pass a .safetensors checkpoint or a run "
                f"folder (e.g. 'compress export --onnx runs/NAME'), or run 'compress distill' first"
            )
        return check_readable_file(p, "checkpoint")
    p = Path(model_arg)
    if p.is_dir():
        student = p / "student.safetensors"
        if not student.exists():
            raise CompressError(
                f"{str(p)!r} is a folder without student.safetensors; pass the checkpoint file itself "
                f"or a finished run folder"
            )
        return check_readable_file(student, "checkpoint")
    if p.suffix == ".onnx":
        raise CompressError(f"{str(p)!r} is already an ONNX file; export takes a .safetensors checkpoint")
    return check_readable_file(p, "checkpoint")


def default_onnx_path(checkpoint: str | os.PathLike) -> Path:
    return Path(checkpoint).with_suffix(".onnx")


def invalid_path(path: str | os.PathLike) -> Path:
    """``student.onnx`` -> ``student.invalid.onnx`` (where a file that failed validation goes)."""
    p = Path(path)
    stem = p.name[: -len(".onnx")] if p.name.endswith(".onnx") else p.name
    return p.with_name(stem + ".invalid.onnx")


def _quiet(fn, *args, **kwargs):
    """Run ``fn`` with the exporter's progress chatter captured; show it only on failure."""
    buf = io.StringIO()
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    except CompressError:
        raise
    except Exception as exc:
        log = buf.getvalue().strip().splitlines()[-5:]
        detail = f" (exporter log: {' | '.join(log)})" if log else ""
        raise CompressError(
            f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{detail}. "
            f"Try --legacy (TorchScript exporter) or another --opset"
        ) from exc
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def onnx_metadata(meta: CheckpointMeta, *, opset: int, exporter: str, preprocessing: str,
                  source_checkpoint: str = "", source_sha256: str = "") -> dict[str, str]:
    """The ``metadata_props`` of an exported file (str -> str)."""
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"preprocessing must be one of {PREPROCESSING}")
    props = dict(meta.to_strings())
    props.update({
        "source_checkpoint": source_checkpoint,
        "source_sha256": source_sha256,
        "opset": str(int(opset)),
        "exporter": exporter,
        "preprocessing": preprocessing,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
    })
    return props


def set_metadata(model_proto, props: dict[str, str]) -> None:
    """Replace ``metadata_props`` entries named in ``props`` (others are kept)."""
    keep = [(p.key, p.value) for p in model_proto.metadata_props if p.key not in props]
    del model_proto.metadata_props[:]
    for k, v in keep + sorted(props.items()):
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = k, str(v)


def read_metadata(model_proto) -> dict[str, str]:
    return {p.key: p.value for p in model_proto.metadata_props}


def main_opset(model_proto) -> int:
    for imp in model_proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def model_family(arch: str) -> str:
    """The zoo family of ``arch``; ``""`` for timm models and user code (never imported here)."""
    from compressor.models.registry import MODELS

    if not arch or ":" in str(arch):  # zoo names never contain ':'; code and timm references do
        return ""
    try:
        return MODELS.get(arch).family
    except (CompressError, KeyError, ValueError):
        return ""


def exporter_plan(arch: str, opset: int | None = None, exporter: str = "auto") -> list[tuple[str, str]]:
    """``[(path, why), ...]``: the exporter paths to try in order (the next one when a path cannot export).

    ``exporter="dynamo"``/``"legacy"`` is that path only. ``"auto"``: the family's entry in
    :data:`FAMILY_EXPORTER` (else dynamo), then the other path; with ``opset`` below
    :data:`DYNAMO_MIN_OPSET` TorchScript comes first (dynamo would export at 18 and then fail to convert
    down, after 5-30 s): for ShuffleNetV2 that graph then fails OpenCV's classic engine in validation.
    """
    if exporter not in EXPORTERS:
        raise CompressError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if exporter != "auto":
        return [(exporter, f"{exporter} requested")]
    family = model_family(arch)
    first, why = FAMILY_EXPORTER.get(family, ("dynamo", DEFAULT_EXPORTER_REASON))
    why = f"{family} family: {why}" if family else "not a zoo family: dynamo first, TorchScript as the fallback"
    if opset is not None and int(opset) < DYNAMO_MIN_OPSET and first == "dynamo":
        first, why = "legacy", (f"opset {opset}: the dynamo exporter writes opset {DYNAMO_MIN_OPSET}+ and cannot "
                                f"convert most graphs down (Pad, ReduceMean; measured for every zoo family but "
                                f"the plain CNNs)")
    other = "legacy" if first == "dynamo" else "dynamo"
    return [(first, f"auto ({why})"), (other, f"auto (fallback: {first} could not export)")]


def _export_dynamo(module: nn.Module, example: torch.Tensor, opset: int | None):
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        module, (example,), None, dynamo=True, external_data=False, opset_version=opset,
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
    )
    proto = program.model_proto
    if opset is not None and main_opset(proto) != int(opset):
        # torch.export's translator starts at opset 18; down-conversion can fail silently
        raise CompressError(
            f"the dynamo exporter could not produce opset {opset} (the graph is opset {main_opset(proto)}); "
            f"use --opset {max(18, main_opset(proto))} or higher, or --legacy for older opsets"
        )
    return proto


def _export_legacy(module: nn.Module, example: torch.Tensor, opset: int | None, tmpdir: Path):
    import onnx

    tmp = tmpdir / "legacy.onnx"
    torch.onnx.export(
        module, (example,), str(tmp), dynamo=False, opset_version=opset or DEFAULT_LEGACY_OPSET,
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
    )
    return onnx.load(str(tmp))


def export_onnx(source, out_path: str | os.PathLike, *, opset: int | None = None, example_batch: int = 2,
                legacy: bool = False, include_preprocessing: bool = False, source_path=None,
                exporter: str | None = None) -> Path:
    """Export ``source`` (a checkpoint path or ``(model, meta)``) to ``out_path``.

    Writes one self-contained file atomically. ``exporter``: ``"auto"`` (the
    default; ``legacy=True`` means ``"legacy"``) picks the path per zoo family
    (:func:`exporter_plan`, :data:`FAMILY_EXPORTER`): the ``torch.export``-based
    exporter (``"dynamo"``) or the TorchScript one (``"legacy"``), falling back
    to the other when the first cannot export (e.g. dynamo below opset 18).
    The path used and why are recorded in the ``exporter`` and
    ``exporter_choice`` metadata. ``example_batch`` must be >= 2 (torch.export specialises a batch
    of 1). ``source_path``: with ``(model, meta)``, the checkpoint file they
    were loaded from, recorded (with its sha256) as provenance. Returns the
    written path. The file is *not* validated here: call
    :func:`export.validate.validate_onnx`.
    """
    import tempfile

    import onnx

    if isinstance(source, (tuple, list)):
        model, meta = source
        ckpt_path, sha = "", ""
        if source_path is not None:
            ckpt_path = str(check_readable_file(source_path, "checkpoint"))
            sha = file_sha256(ckpt_path)
    else:
        ckpt = check_readable_file(source, "checkpoint")
        model, meta = load_model(ckpt)
        sha = file_sha256(ckpt)
        ckpt_path = str(ckpt)
    if not isinstance(meta, CheckpointMeta):
        raise CompressError("export_onnx needs (model, CheckpointMeta) or a checkpoint path")
    if int(example_batch) < 2:
        raise CompressError(f"example_batch must be >= 2 (torch.export fixes a batch of 1), got {example_batch}")
    if opset is not None and not 7 <= int(opset) <= 30:
        raise CompressError(f"--opset {opset} is out of range; use a value such as 17 or 18 (or leave it out)")
    out = check_output_path(out_path, inputs=[ckpt_path])
    if ckpt_path:
        # Stored relative to the ONNX file so a folder can move as a whole.
        ckpt_path = os.path.relpath(os.path.abspath(ckpt_path), os.path.abspath(out.parent))

    model = model.eval()
    module: nn.Module = NormalizedModel(model, meta.mean, meta.std).eval() if include_preprocessing else model
    shape = (int(example_batch), *tuple(meta.input_size))
    # [0, 1] images when the graph normalises, else already-normalised inputs.
    example = torch.rand(shape) if include_preprocessing else torch.randn(shape)

    if exporter is None:
        exporter = "legacy" if legacy else "auto"
    elif legacy and exporter != "legacy":
        raise CompressError(f"legacy=True and exporter={exporter!r} disagree; pass one of them")
    plan = exporter_plan(meta.arch, opset, exporter)
    errors = []
    with tempfile.TemporaryDirectory(prefix="compress-export-") as tmpdir:
        for path, why in plan:
            try:
                if path == "legacy":
                    proto = _quiet(_export_legacy, module, example, opset, Path(tmpdir))
                    used = f"torch.onnx TorchScript (torch {torch.__version__})"
                else:
                    proto = _quiet(_export_dynamo, module, example, opset)
                    used = f"torch.onnx dynamo (torch {torch.__version__})"
            except CompressError as exc:
                errors.append(str(exc))
                if len(errors) == len(plan):
                    raise CompressError(" | ".join(errors)) from None
                continue
            choice = why if not errors else f"{why}: {errors[-1][:300]}"
            break
    props = onnx_metadata(
        meta, opset=main_opset(proto), exporter=used,
        preprocessing="normalize" if include_preprocessing else "none",
        source_checkpoint=ckpt_path, source_sha256=sha,
    )
    props["exporter_choice"] = choice
    set_metadata(proto, props)
    with atomic_write(out, suffix=".onnx") as tmp:
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
    return out


def meta_from_onnx_props(props: dict[str, str], path: str = "") -> CheckpointMeta:
    """Rebuild a :class:`CheckpointMeta` from ``metadata_props``."""
    if "arch" not in props or "num_classes" not in props:
        raise CompressError(
            f"{path}: ONNX file has no compress metadata (arch, num_classes); export it with 'compress export --onnx'")
    return CheckpointMeta.from_strings(props, path)  # malformed metadata: its own message


def props_json(props: dict[str, str], key: str, default=None):
    try:
        return json.loads(props[key]) if key in props else default
    except ValueError:
        return default
