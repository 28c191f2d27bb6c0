"""timm models by name: ``timm:NAME`` (e.g. ``timm:resnet18``, ``timm:mobilenetv3_small_050``).

``NAME`` is any name ``timm.list_models()`` knows, optionally with its pretrained tag
(``timm:resnet18.a1_in1k``: the tag picks which ``pretrained_cfg`` applies). The model is
``timm.create_model(NAME, pretrained=False, num_classes=..., in_chans=..., **options)``:
compress never downloads weights (start from local ones with ``--init PATH`` or
``compress import FILE --arch timm:NAME``), and hub names (``hf-hub:...``) are refused.

A name is not code, so no trust flag is needed (:func:`compressor.trust.is_code_ref` says
no for ``timm:`` names). A checkpoint records the name, the options and the timm version
(``timm_version``) and is rebuilt from the name; a timm upgrade that builds the model
with other tensor names or shapes is refused on load, naming both versions.

The model's ``pretrained_cfg`` (:func:`preprocessing`) gives its defaults where the
command line gives none: the normalisation (mean/std, :func:`pretrained_normalisation`),
the input size (the entry's), and for ``compress import`` the evaluation policy closest to
its center crop (:func:`eval_policy`). The whole cfg is recorded in the checkpoint
(``metrics["pretrained_cfg"]``); a ``crop_pct`` other than 0.875 and a bicubic
``interpolation`` are recorded, not applied (compress's evaluation view crops 0.875, bilinear).

timm is an optional dependency (``pip install 'compress[timm]'``); it is imported only
when a ``timm:`` name is used.
"""
from __future__ import annotations

import difflib
import functools
import re

from torch import nn

from ..errors import CompressError

PREFIX = "timm:"
FAMILY = "timm"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
# Options that would load weights or files, or change what the model returns (features, not logits).
REFUSED_OPTIONS = {
    "pretrained_cfg": "it replaces the model's pretrained_cfg",
    "pretrained_cfg_overlay": "it replaces the model's pretrained_cfg",
    "checkpoint_path": "it loads a file with timm's loader",
    "pretrained_strict": "it only applies to downloaded weights",
    "cache_dir": "it only applies to downloaded weights",
    "features_only": "the model must return logits",
}
#: The keys of a ``pretrained_cfg`` compress uses (see :func:`preprocessing`).
PREPROCESSING_KEYS = ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")


def is_timm_ref(name) -> bool:
    """``timm:NAME`` (a timm model name, not code)."""
    return isinstance(name, str) and name.strip().startswith(PREFIX)


def _timm():
    try:
        import timm
    except ImportError:
        raise CompressError("timm: model names need the timm package; install it with "
                            "pip install 'compress[timm]' (or pip install timm==1.0.31)") from None
    return timm


def timm_version() -> str:
    return str(_timm().__version__)


def timm_name(ref: str) -> str:
    """The timm model name of ``timm:NAME`` (checked: no hub or file prefixes, a known model)."""
    name = ref.strip()[len(PREFIX):].strip()
    if not name:
        raise CompressError(f"{ref!r} names no model; write timm:NAME, e.g. timm:resnet18")
    if not _NAME_RE.match(name):
        raise CompressError(f"{ref!r}: {name!r} is not a timm model name (hub and file names such as hf-hub:... "
                            f"are refused: compress never downloads); write timm:NAME, e.g. timm:resnet18, and "
                            f"start from local weights with --init PATH")
    timm = _timm()
    if not timm.is_model(name):
        base = name.split(".", 1)[0]
        close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(PREFIX + c for c in close)}?)" if close else \
            " (timm.list_models() lists them)"
        raise CompressError(f"timm has no model {name!r}{hint}; fix the name after 'timm:'")
    return name


@functools.lru_cache(maxsize=None)
def _preprocessing(name: str) -> tuple:
    cfg = _timm().models.get_pretrained_cfg(name)
    if cfg is None:  # a model without any pretrained config: timm's own defaults
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        values = {"input_size": (3, 224, 224), "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
                  "crop_pct": 0.875, "crop_mode": "center", "interpolation": "bilinear"}
    else:
        values = {k: getattr(cfg, k, None) for k in PREPROCESSING_KEYS}
    out = {"input_size": [int(v) for v in values["input_size"]],
           "mean": [float(v) for v in values["mean"]], "std": [float(v) for v in values["std"]],
           "crop_pct": float(values["crop_pct"] if values["crop_pct"] is not None else 0.875),
           "crop_mode": str(values["crop_mode"] or "center"),
           "interpolation": str(values["interpolation"] or "bilinear")}
    return tuple(out.items())


def preprocessing(ref: str) -> dict:
    """What timm's ``pretrained_cfg`` of ``timm:NAME`` says about inputs: ``input_size`` [C, H, W],
    ``mean``, ``std``, ``crop_pct``, ``crop_mode`` and ``interpolation`` (JSON-ready values)."""
    return {k: (list(v) if isinstance(v, list) else v) for k, v in _preprocessing(timm_name(ref))}


def pretrained_normalisation(ref: str, channels: int, mean=None, std=None) -> tuple[list, list, str]:
    """``(mean, std, line)``: the ``pretrained_cfg``'s mean/std where ``mean``/``std`` (the command
    line's) are not given, averaged over channels for 1-channel data, and the line to print."""
    pre = preprocessing(ref)
    m, s = list(pre["mean"]), list(pre["std"])
    if channels != len(m):
        m, s = [sum(m) / len(m)] * channels, [sum(s) / len(s)] * channels
    m, s = [float(v) for v in (mean or m)], [float(v) for v in (std or s)]
    line = (f"normalisation: mean {','.join(f'{v:g}' for v in m)}  std {','.join(f'{v:g}' for v in s)}, "
            f"{ref}'s pretrained_cfg (--mean/--std to override; its input {'x'.join(map(str, pre['input_size']))}, "
            f"crop_pct {pre['crop_pct']:g}, {pre['interpolation']} are recorded)")
    return m, s, line


def eval_policy(ref: str, size) -> tuple[str, str]:
    """``(policy, why)``: the evaluation policy (:mod:`compressor.data.view`) closest to the
    ``pretrained_cfg``'s center crop at ``size`` (C, H, W): ``none`` (resize, no crop margin) for
    ``crop_pct`` 1, else ``imagenet`` (resize to size / 0.875, center crop) from 64 px, else ``cifar``."""
    pre = preprocessing(ref)
    crop, side = float(pre["crop_pct"]), min(int(v) for v in tuple(size)[-2:])
    if crop >= 0.999:
        return "none", f"{ref}'s pretrained_cfg crop_pct 1: the whole image"
    if side >= 64:
        return "imagenet", (f"{ref}'s pretrained_cfg crop_pct {crop:g}: resize to size / 0.875, center crop"
                            + ("" if abs(crop - 0.875) < 1e-6 else " (compress's center crop is 0.875)"))
    return "cifar", f"{side}-px input: no crop margin"


def check_options(ref: str, options: dict) -> None:
    """Refuse ``pretrained=True`` (a download) and options that load files or change the output."""
    if options.get("pretrained") not in (None, False):
        raise CompressError(f"{ref}: pretrained={options['pretrained']!r} would download weights and compress never "
                            f"downloads; drop the option and start from local weights with --init PATH "
                            f"(or compress import FILE --arch {ref})")
    for key, why in REFUSED_OPTIONS.items():
        if key in options:
            raise CompressError(f"{ref}: option {key} is not accepted ({why}); drop --option {key}=...")


def build_timm(name: str, *, num_classes: int, in_chans: int, **options) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=..., in_chans=..., **options)``."""
    ref = PREFIX + name
    check_options(ref, options)
    options.pop("pretrained", None)
    timm = _timm()
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **options)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        shown = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "no options"
        raise CompressError(f"timm could not build {ref} with {shown} ({type(exc).__name__}: {reason}); "
                            f"fix --option") from None
    return model


def timm_entry(ref: str):
    """A zoo-like :class:`~compressor.models.registry.ModelEntry` for ``timm:NAME``."""
    from .registry import ModelEntry

    name = timm_name(ref)
    pre = dict(_preprocessing(name))
    size = tuple(int(v) for v in pre["input_size"])
    return ModelEntry(name=PREFIX + name, family=FAMILY, builder=functools.partial(build_timm, name),
                      input_size=size, description=f"timm {name} (timm {timm_version()})", norm="imagenet",
                      timm_name=name)


def check_rebuilt(meta, model: nn.Module, state: dict, path) -> None:
    """A ``timm:`` checkpoint saved with another timm version (``meta.timm_version``) whose tensors
    this timm names or shapes differently (``model``, rebuilt from the name, vs ``state``, the
    file's) is refused in one line naming both versions. Same version, or same tensors: nothing."""
    saved, current = meta.timm_version, timm_version()
    if not saved or saved == current:
        return
    own = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    theirs = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    reshaped = [f"{k} {theirs[k]} vs {own[k]}" for k in own if k in theirs and theirs[k] != own[k]]
    if not (missing or unexpected or reshaped):
        return
    parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
             (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)) if v]
    raise CompressError(f"{path}: timm {current} builds {meta.arch} with other tensors than timm {saved}, which "
                        f"saved it ({'; '.join(parts)}); install that version (pip install timm=={saved}) to use "
                        f"this checkpoint, or retrain / re-import it with timm {current}")


__all__ = ["PREFIX", "FAMILY", "is_timm_ref", "timm_name", "timm_version", "preprocessing",
           "pretrained_normalisation", "eval_policy", "check_options",
           "build_timm", "timm_entry", "check_rebuilt"]
