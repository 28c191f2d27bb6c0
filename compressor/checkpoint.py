"""safetensors checkpoints that describe themselves.

A checkpoint holds the model's state dict plus string metadata (safetensors
only stores ``str -> str``; structured values are JSON-encoded):

==============  ==========================================================
key             value
==============  ==========================================================
format_version  ``"1"``
arch            zoo name, e.g. ``resnet56``
model_kwargs    JSON object of constructor options, e.g. ``{"shortcut": "A"}``
num_classes     integer
in_chans        integer
input_size      JSON ``[C, H, W]``
mean, std       JSON lists, the input normalisation the model was trained with
class_names     JSON list of strings
metrics         JSON object (test accuracy, epochs, ...)
source          free text: where the weights came from
code_sha256     for user code (arch ``file.py:NAME``): sha256 of that file
timm_version    for timm models (arch ``timm:NAME``): the timm that built it
==============  ==========================================================

:func:`load_model` rebuilds the model from the file alone and verifies every
tensor name and shape, so a truncated or mismatched file is caught on load.
A checkpoint whose arch is user code is rebuilt only when the caller names the
same code or trusts it (:func:`ensure_code_trusted`): no code runs because a
file says so. A ``timm:NAME`` checkpoint is rebuilt from the name (no trust
needed); tensors another timm version names or shapes differently are refused
naming both versions.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import CompressError
from .fileio import atomic_write, shorten
from .models import create_model, get_entry
from .trust import Trust, check_checkpoint_code, is_code_ref, same_code_ref

FORMAT_VERSION = "1"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Bounds for metadata read from files: a crafted header must not make us allocate
# a 100,000 x 100,000 example input or a billion-class head.
MAX_CLASSES = 1_000_000
MAX_CHANNELS = 16
MAX_SIDE = 8192
MAX_INPUT_ELEMENTS = 4 * 2048 * 2048  # C*H*W of one example input: 64 MB as float32 (3x2048x2048 fits)


@dataclass
class CheckpointMeta:
    arch: str
    num_classes: int
    in_chans: int = 3
    input_size: tuple = (3, 32, 32)
    mean: tuple = CIFAR_MEAN
    std: tuple = CIFAR_STD
    class_names: list = field(default_factory=list)
    model_kwargs: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    source: str = ""
    code_sha256: str = ""
    timm_version: str = ""
    format_version: str = FORMAT_VERSION

    def to_strings(self) -> dict[str, str]:
        d = asdict(self)
        return {k: (v if isinstance(v, str) else json.dumps(list(v) if isinstance(v, tuple) else v))
                for k, v in d.items()}

    @classmethod
    def from_strings(cls, meta: dict[str, str], path: str = "") -> "CheckpointMeta":
        if "arch" not in meta or "num_classes" not in meta:
            raise CompressError(
                f"{path}: safetensors file has no compress metadata (arch, num_classes); "
                f"convert it with 'compress import FILE --arch NAME --out OUT.safetensors' (eval and export also "
                f"take --arch NAME and --num-classes)"
            )
        try:
            parsed = cls(
                arch=meta["arch"],
                num_classes=int(meta["num_classes"]),
                in_chans=int(meta.get("in_chans", 3)),
                input_size=tuple(json.loads(meta.get("input_size", "[3, 32, 32]"))),
                mean=tuple(json.loads(meta.get("mean", json.dumps(CIFAR_MEAN)))),
                std=tuple(json.loads(meta.get("std", json.dumps(CIFAR_STD)))),
                class_names=list(json.loads(meta.get("class_names", "[]"))),
                model_kwargs=dict(json.loads(meta.get("model_kwargs", "{}"))),
                metrics=dict(json.loads(meta.get("metrics", "{}"))),
                source=meta.get("source", ""),
                code_sha256=meta.get("code_sha256", ""),
                timm_version=meta.get("timm_version", ""),
                format_version=meta.get("format_version", FORMAT_VERSION),
            )
        except (ValueError, TypeError, RecursionError) as exc:
            raise CompressError(f"{shorten(path)}: checkpoint metadata is malformed ({shorten(exc)}); "
                                f"re-export the checkpoint") from None
        problem = parsed.problem()
        if problem:
            raise CompressError(f"{shorten(path)}: checkpoint metadata is malformed ({shorten(problem)}); "
                                f"re-export the checkpoint")
        return parsed

    def problem(self) -> str:
        """What is implausible in this metadata ('' if nothing): sizes a crafted file could lie about."""
        size = tuple(self.input_size)
        if not 1 <= self.num_classes <= MAX_CLASSES:
            return f"num_classes {self.num_classes} is not in 1..{MAX_CLASSES}"
        if len(size) != 3 or not all(isinstance(v, int) and v > 0 for v in size):
            return f"input_size {list(size)} is not [C, H, W] of positive integers"
        if not 1 <= size[0] <= MAX_CHANNELS or size[0] != self.in_chans:
            return f"input_size {list(size)} does not match in_chans {self.in_chans} (1..{MAX_CHANNELS})"
        if max(size[1:]) > MAX_SIDE:
            return f"input_size {list(size)} is larger than {MAX_SIDE} px"
        if size[0] * size[1] * size[2] > MAX_INPUT_ELEMENTS:
            return (f"input_size {list(size)} has {size[0] * size[1] * size[2]:,} values per image, more than "
                    f"{MAX_INPUT_ELEMENTS:,} (e.g. 3x2048x2048)")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            return f"mean/std have {len(self.mean)}/{len(self.std)} values for {self.in_chans} channels"
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   for v in (*self.mean, *self.std)) or min(self.std) <= 0:
            return "mean/std must be finite numbers and std > 0"
        if not isinstance(self.arch, str) or not self.arch or len(self.arch) > 1000:
            return "arch must be a model name or a file.py:NAME reference (at most 1000 characters)"
        version = self.timm_version
        if len(version) > 64 or not all((ch.isascii() and ch.isalnum()) or ch in ".+-_!" for ch in version):
            return f"timm_version {self.timm_version[:64]!r} is not a version number"
        if self.class_names and (len(self.class_names) != self.num_classes
                                 or not all(isinstance(c, str) for c in self.class_names)):
            return f"class_names has {len(self.class_names)} entries for {self.num_classes} classes"
        return ""


def file_sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_readable_file(path, what: str = "file") -> Path:
    p = Path(path)
    if not p.exists():
        raise CompressError(f"{what} {str(p)!r} does not exist; check the path")
    if p.is_dir():
        raise CompressError(f"{what} {str(p)!r} is a directory, expected a file")
    if not p.is_file():  # a FIFO or a device would block the reader or never end
        raise CompressError(f"{what} {str(p)!r} is not a regular file (a pipe or a device?); pass a file")
    if p.stat().st_size == 0:
        raise CompressError(f"{what} {str(p)!r} is empty (0 bytes); was it fully written?")
    return p


def save_checkpoint(path, model: nn.Module, meta: CheckpointMeta) -> Path:
    """Write ``model``'s weights with ``meta`` atomically to ``path``."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_write(path, suffix=".safetensors") as tmp:
        # "format: pt" is what safetensors' own torch helpers write; other tools look for it
        save_file(state, str(tmp), metadata={**meta.to_strings(), "format": "pt"})
    return Path(path)


def read_checkpoint(path, *, arch: str | None = None, num_classes: int | None = None):
    """Return ``(state_dict, meta)``; ``arch``/``num_classes`` fill in for foreign files."""
    p = check_readable_file(path, "checkpoint")
    try:
        with safe_open(str(p), framework="pt") as fh:
            raw_meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        fix = ("the file is truncated or damaged; re-create or re-download it" if p.suffix == ".safetensors"
               else "this is an ONNX file: give the .safetensors checkpoint it was exported from "
                    "(compress eval and bench take .onnx files)" if p.suffix.lower() == ".onnx"
               else "convert PyTorch .pth/.th files with 'compress import'")
        raise CompressError(f"{p}: not a readable safetensors checkpoint ({reason}); {fix}") from None
    if arch is not None:
        if not same_code_ref(arch, raw_meta.get("arch", "")):
            raw_meta = {k: v for k, v in raw_meta.items() if k != "code_sha256"}  # it was another file's
        raw_meta = {**raw_meta, "arch": arch}
        if "num_classes" not in raw_meta:
            raw_meta["num_classes"] = str(num_classes or _infer_num_classes(state))
    meta = CheckpointMeta.from_strings(raw_meta, str(p))
    check_state_fits_meta(state, meta, p)
    return state, meta


def check_state_fits_meta(state: dict, meta: CheckpointMeta, path) -> None:
    """The tensors in the file can hold the model the metadata describes, checked before building it.

    A 300-byte file claiming a million classes would otherwise make us allocate the
    whole classifier first: some tensor (the classifier's weight or bias) must have
    ``num_classes`` along one of its dimensions."""
    if not state:
        raise CompressError(f"{shorten(path)}: checkpoint holds no tensors; re-create or re-download it")
    if not any(meta.num_classes in tuple(t.shape) for t in state.values()):
        raise CompressError(f"{shorten(path)}: metadata says {meta.num_classes} classes but no tensor in the file "
                            f"has {meta.num_classes} outputs (a classifier of that size); the file is damaged "
                            f"or its metadata is wrong: re-export it (or pass --num-classes)")


def _infer_num_classes(state: dict) -> int:
    # The classifier is the last 2-D weight with a matching 1-D bias.
    for key in reversed(list(state)):
        if key.endswith("weight") and state[key].ndim == 2:
            return int(state[key].shape[0])
    raise CompressError("cannot infer num_classes from the checkpoint; pass --num-classes")


def ensure_code_trusted(meta: CheckpointMeta, path, *, arch: str | None = None, trust_code: bool = False,
                        accept_code_change: bool = False) -> None:
    """Refuse to run the user code a checkpoint names unless the command line asked for it.

    ``arch`` (the reference as the command line spelled it), ``trust_code``
    (``--trust-code``) and ``accept_code_change`` are the command line's word; the gate
    itself is :func:`compressor.trust.check_checkpoint_code`. The code file must still have
    the sha256 recorded at save time, unless ``accept_code_change``: then the change is
    printed on stderr and recorded in ``meta.metrics["code_change_accepted"]`` (an export of
    the model carries it on).
    """
    trust = Trust(trust_code=trust_code, named=(arch,) if is_code_ref(arch) else (),
                  accept_code_change=accept_code_change)
    change = check_checkpoint_code(meta, path, trust)
    if change:
        import sys

        print(f"note: {meta.arch} changed since {path} was saved (sha256 {change['current'][:12]}, recorded "
              f"{change['recorded'][:12]}); loading it anyway (--accept-code-change)", file=sys.stderr)
        meta.metrics = {**meta.metrics, "code_change_accepted": change}


def build_model(meta: CheckpointMeta) -> nn.Module:
    return create_model(meta.arch, num_classes=meta.num_classes, in_chans=meta.in_chans, **meta.model_kwargs)


def file_in_chans(model: nn.Module, state: dict) -> int | None:
    """The input channels a foreign state dict was trained for, when they differ from ``model``'s:
    read from the model's first 4-D weight (its stem conv) under the same key in ``state``; None when
    they agree or the file has no such key (the strict load then names the mismatch)."""
    for key, own in model.state_dict().items():
        if own.ndim == 4:
            theirs = state.get(key)
            if theirs is None or theirs.ndim != 4 or theirs.shape[1] == own.shape[1]:
                return None
            return int(theirs.shape[1])
    return None


def channel_normalisation(mean, std, in_chans: int) -> tuple[tuple, tuple]:
    """3-channel mean/std for ``in_chans`` channels: unchanged for 3, the channel averages repeated
    otherwise (how a grayscale copy of the same images averages)."""
    if len(mean) == in_chans:
        return tuple(mean), tuple(std)
    return ((round(sum(mean) / len(mean), 4),) * in_chans, (round(sum(std) / len(std), 4),) * in_chans)


def load_state_strict(model: nn.Module, state: dict, arch: str, source: str) -> None:
    """Load ``state`` into ``model``, failing with the list of mismatched keys."""
    own = model.state_dict()
    # BatchNorm's step counter is absent from checkpoints saved before torch 0.4.1, and the
    # small-image-stem marker from checkpoints of earlier compress versions (and from torchvision's
    # weights imported into a cifar-stem model); neither affects inference: take the model's own.
    from .models.stems import SMALL_IMAGE_STEM_KEY

    state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked") or k == SMALL_IMAGE_STEM_KEY},
             **state}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shape:
            parts.append(f"{len(shape)} with wrong shape (e.g. {'; '.join(shape[:2])})")
        raise CompressError(
            f"{source}: weights do not match arch {arch!r}: {'; '.join(parts)}. "
            f"Check --arch / --num-classes (and model options such as shortcut A/B)"
        )
    model.load_state_dict(state, strict=True)


def load_model(path, *, arch: str | None = None, num_classes: int | None = None, map_location="cpu",
               trust_code: bool = False, accept_code_change: bool = False):
    """Rebuild the model stored in ``path``; returns ``(model, meta)`` in eval mode.

    ``arch`` names the architecture (for files without compress metadata, or the
    same user-code reference the checkpoint records); ``trust_code`` allows
    importing the user code the checkpoint names, ``accept_code_change`` a code file
    edited since (see :func:`ensure_code_trusted`).
    """
    state, meta = read_checkpoint(path, arch=arch, num_classes=num_classes)
    ensure_code_trusted(meta, path, arch=arch, trust_code=trust_code, accept_code_change=accept_code_change)
    entry = get_entry(meta.arch)  # unknown arch -> CompressError with suggestions
    model = build_model(meta)
    if entry.timm_name and meta.timm_version:  # another timm may name or shape the tensors differently
        from .models.timm_models import check_rebuilt

        check_rebuilt(meta, model, state, path)
    load_state_strict(model, state, meta.arch, str(path))
    return model.to(map_location).eval(), meta


def family_normalisation(entry) -> tuple[str, tuple, tuple]:
    """(name, mean, std) a family's weights usually expect: ImageNet for the torchvision families,
    the ``pretrained_cfg``'s for a timm model."""
    if getattr(entry, "timm_name", ""):
        from .models.timm_models import preprocessing

        pre = preprocessing(entry.name)
        return f"timm pretrained_cfg ({entry.timm_name})", tuple(pre["mean"]), tuple(pre["std"])
    if entry.norm == "imagenet":
        return "ImageNet", IMAGENET_MEAN, IMAGENET_STD
    return "CIFAR", CIFAR_MEAN, CIFAR_STD


def default_normalisation(in_chans: int) -> tuple[tuple, tuple]:
    """The mean/std a checkpoint records when none is given: CIFAR-10's for 3 channels; for any
    other count, CIFAR-10's channel averages repeated (one value per channel, as the metadata needs)."""
    return channel_normalisation(CIFAR_MEAN, CIFAR_STD, in_chans)


def meta_for(arch: str, *, num_classes: int, in_chans: int | None = None, mean=None, std=None,
             class_names=(), model_kwargs=None, input_size=None, **extra) -> CheckpointMeta:
    """The metadata of a model of the zoo. ``in_chans``: the input size's channels when given, else the
    arch's; ``mean``/``std`` left out: :func:`default_normalisation` for that many channels. Raises
    ValueError on metadata that no reader would accept (e.g. 3 mean values for 1 channel)."""
    entry = get_entry(arch)
    if in_chans is None:
        in_chans = int(input_size[0]) if input_size else entry.input_size[0]
    size = tuple(input_size) if input_size else (in_chans, *entry.input_size[1:])
    default_mean, default_std = default_normalisation(in_chans)
    mean, std = default_mean if mean is None else mean, default_std if std is None else std
    if entry.user_ref and "code_sha256" not in extra:
        from .models.user import code_sha256

        extra["code_sha256"] = code_sha256(entry.user_ref)
    if getattr(entry, "timm_name", ""):  # rebuilt from the name; the version and its pretrained_cfg recorded
        from .models.timm_models import preprocessing, timm_version

        extra.setdefault("timm_version", timm_version())
        extra["metrics"] = {"pretrained_cfg": preprocessing(entry.name), **(extra.get("metrics") or {})}
    meta = CheckpointMeta(arch=entry.name, num_classes=num_classes, in_chans=in_chans, input_size=size,
                          mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
                          class_names=list(class_names), model_kwargs=dict(model_kwargs or {}), **extra)
    problem = meta.problem()
    if problem:  # a caller's mistake: refused here, not when a reader loads the file
        raise ValueError(f"metadata for {entry.name}: {problem}")
    return meta


# ---------------------------------------------------------------- importers
def load_foreign_state_dict(path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a plain PyTorch checkpoint (.pth/.th/.pt or .safetensors).

    Accepts a bare state dict, or a dict wrapping it under ``state_dict`` /
    ``model`` / ``model_state_dict``; strips a ``module.`` (DataParallel) prefix.

    Security: a ``.pth`` file is a pickle, and unpickling can run any code its
    author put there. Files are read with ``torch.load(weights_only=True)``,
    which only rebuilds tensors and plain containers. A file that needs more
    (pickled classes, numpy objects, whole modules) is refused with the globals
    it asks for, unless ``allow_pickle`` (``--allow-pickle``: "I trust whoever
    wrote this file") is given.
    """
    p = check_readable_file(path, "checkpoint")
    if p.suffix == ".safetensors":
        try:
            with safe_open(str(p), framework="pt") as fh:
                state = {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CompressError(f"{p}: not a readable safetensors file ({_first_line(exc)})") from None
    else:
        obj = _torch_load(p, allow_pickle)
        if isinstance(obj, nn.Module):  # only reachable with allow_pickle
            obj = obj.state_dict()
        if isinstance(obj, dict):
            for key in ("state_dict", "model_state_dict", "model", "net"):
                if key in obj and isinstance(obj[key], dict):
                    obj = obj[key]
                    break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CompressError(f"{p}: does not contain a state dict of tensors; expected a .pth/.th state dict")
        state = obj
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _torch_load(p: Path, allow_pickle: bool):
    """``torch.load`` that never unpickles arbitrary objects unless ``allow_pickle``."""
    import pickle
    import warnings

    if allow_pickle:
        try:
            return torch.load(str(p), map_location="cpu", weights_only=False)
        except Exception as exc:
            raise CompressError(f"{p}: not a PyTorch checkpoint torch.load can read ({_first_line(exc)}); "
                                f"expected a .pth/.th state dict") from None
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it then refuses anyway
            warnings.simplefilter("ignore")
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise CompressError(f"{p}: not a PyTorch checkpoint ({_first_line(exc)}); "
                                f"expected a .pth/.th state dict") from None
        needs = _unsafe_globals(p, exc)
        raise CompressError(
            f"{p}: refusing to unpickle {needs or 'Python objects beyond tensors'}: loading it could run code "
            f"from the file; if you trust whoever wrote it, rerun with --allow-pickle "
            f"(or re-save it as a plain state dict of tensors)") from None
    except Exception as exc:
        raise CompressError(f"{p}: not a PyTorch checkpoint torch.load can read ({_first_line(exc)}); "
                            f"expected a .pth/.th state dict") from None


def _unsafe_globals(p: Path, exc: BaseException) -> str:
    """The pickled globals a refused file asks for, e.g. ``posix.system`` (never executed)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(p))
    except Exception:  # legacy (non-zip) files: take the name from torch's message
        import re

        names = re.findall(r"GLOBAL ([\w.]+)", str(exc))[:1]
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
