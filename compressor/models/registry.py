"""The model registry: ``create_model``, ``list_models`` and family ladders.

Every model is registered with its family and default input size. A family's
*ladder* is its members ordered by compute (MACs at the default input size);
the assistant planner walks it to pick models between a teacher and a student.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import CompressError
from ..registry import Registry, normalise_name


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    builder: Callable[..., nn.Module]
    input_size: tuple[int, int, int]  # (channels, height, width) by default
    description: str = ""
    defaults: dict = field(default_factory=dict)
    norm: str = "cifar"  # the normalisation its weights usually expect: cifar | imagenet
    user_ref: str = ""   # set for user code (``file.py:NAME``), see models.user
    timm_name: str = ""  # set for timm models (``timm:NAME``), see models.timm_models


MODELS: Registry[ModelEntry] = Registry("model")

# What create_model built each live module as (see model_identity); weak: never keeps a model alive.
_BUILT: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def register_model(name: str, *, family: str, input_size=(3, 32, 32), description: str = "", norm: str = "cifar",
                   **defaults):
    """Register ``builder(num_classes, in_chans, **kwargs) -> nn.Module``."""

    def wrap(builder):
        entry = ModelEntry(name=normalise_name(name), family=family, builder=builder,
                           input_size=tuple(input_size), description=description,
                           defaults=dict(defaults), norm=norm)
        MODELS.register(entry, name=name)
        return builder

    return wrap


def get_entry(name: str) -> ModelEntry:
    """A zoo entry, for ``timm:NAME`` a timm model, or for ``file.py:NAME`` / ``package.module:NAME``
    the user's code (imported)."""
    from .timm_models import is_timm_ref, timm_entry
    from .user import is_user_ref, user_entry

    if is_timm_ref(name):
        return timm_entry(name)
    if is_user_ref(name):
        return user_entry(name)
    return MODELS.get(name)


def create_model(name: str, num_classes: int = 10, in_chans: int | None = None, **kwargs) -> nn.Module:
    """Build a zoo model by name. ``None`` kwargs are dropped (use the default)."""
    entry = get_entry(name)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise CompressError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    in_chans = entry.input_size[0] if in_chans is None else in_chans
    merged = {**entry.defaults, **{k: v for k, v in kwargs.items() if v is not None}}
    if entry.user_ref:
        from .user import build_user_model, code_sha256

        model = build_user_model(entry, num_classes=num_classes, in_chans=in_chans, **merged)
        code = {"code_sha256": code_sha256(entry.user_ref)}
    else:
        try:
            model = entry.builder(num_classes=num_classes, in_chans=in_chans, **merged)
        except (TypeError, ValueError) as exc:  # an unknown option, or a value it rejects (shortcut=Z)
            from ..fileio import shorten

            raise CompressError(f"model {entry.name!r} does not accept these options: {shorten(exc)}") from None
        code = {}
    _BUILT[model] = {"arch": entry.name, "options": {**_builder_defaults(entry.builder), **merged},
                     "num_classes": num_classes, "in_chans": in_chans, **code}
    return model


def _builder_defaults(builder) -> dict:
    """The builder's keyword defaults (but ``num_classes``/``in_chans``): an option left out and
    the same option given at its default build the same model."""
    try:
        params = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty
            and p.name not in ("num_classes", "in_chans")}


def model_options(model: nn.Module) -> dict:
    """The options :func:`create_model` built ``model`` with, its builder's defaults filled in (as
    :func:`model_identity` writes them), e.g. ``{"stem": "cifar", "zero_init_last": true}``; ``{}``
    for a module built elsewhere. Checkpoints record them (``metrics.model_options``): the
    defaults a model *started* from (its initialisation) leave no trace in its weights."""
    return model_identity(model).get("options", {})


def model_identity(model: nn.Module) -> dict:
    """What, besides its weights, decides what ``model`` computes.

    For a model built by :func:`create_model`: its name, its options (the builder's defaults
    filled in), classes and input channels, and for user code the sha256 of its source file.
    For any other module: its class and a hash of its structure (``repr``).
    """
    known = _BUILT.get(model)
    if known is not None:  # as JSON sees it (a default such as ``act=nn.ReLU`` by its repr)
        return json.loads(json.dumps(known, sort_keys=True, default=repr))
    cls = type(model)
    return {"class": f"{cls.__module__}.{cls.__qualname__}",
            "structure": hashlib.sha256(repr(model).encode()).hexdigest()[:32]}


def input_size_for(name: str, model_kwargs: dict | None = None, in_chans: int | None = None) -> tuple[int, int, int]:
    """The ``(C, H, W)`` a model is built for with ``model_kwargs``: its registered size, except
    that a ``stem="cifar"`` model is built for small images (:data:`.stems.SMALL_IMAGE_PX`, 32 px)
    and a model with an ``input_hw`` option (the plain CNNs) for that size."""
    from .stems import SMALL_IMAGE_PX

    entry = get_entry(name)
    c = entry.input_size[0] if in_chans is None else int(in_chans)
    if entry.user_ref:  # user code states its size with INPUT_SIZE; its options mean what it says
        return (c, *entry.input_size[1:])
    options = {**_builder_defaults(entry.builder), **entry.defaults,
               **{k: v for k, v in (model_kwargs or {}).items() if v is not None}}
    h, w = entry.input_size[1:]
    if str(options.get("stem", "")).lower() == "cifar":
        h = w = SMALL_IMAGE_PX
    if isinstance(options.get("input_hw"), int):
        h = w = options["input_hw"]
    return c, int(h), int(w)


def check_fits(name: str, model_kwargs: dict, num_classes: int, input_size, *,
               fix: str = "fix forward() or set INPUT_SIZE on it") -> None:
    """The one fits-check: ``name`` built with ``model_kwargs`` takes a batch of 2 at ``input_size``
    (C, H, W) and returns ``(2, num_classes)`` logits, else one-line :class:`CompressError` ending in ``fix``.

    Built on the meta device (shapes only: a ResNet-50 at 224 px in milliseconds); a forward that
    reads values (``.item()``, data-dependent shapes) fails there, and is then checked on the CPU.
    """
    from .user import check_output

    c, h, w = (int(v) for v in input_size)
    try:
        with torch.device("meta"):
            model = create_model(name, num_classes=num_classes, in_chans=c, **model_kwargs)
        check_output(model, name, (c, h, w), num_classes, fix=fix)
    except CompressError:
        with torch.random.fork_rng(devices=[]):  # the caller's seeded initialisation is left as it was
            model = create_model(name, num_classes=num_classes, in_chans=c, **model_kwargs)
        check_output(model, name, (c, h, w), num_classes, fix=fix)


def list_models(family: str | None = None) -> list[str]:
    names = MODELS.names()
    if family is not None:
        names = [n for n in names if MODELS.get(n).family == family]
    return names


def list_families() -> list[str]:
    seen: dict[str, None] = {}
    for n in MODELS.names():
        seen[MODELS.get(n).family] = None
    return list(seen)


@functools.lru_cache(maxsize=None)
def profile_arch(name: str, num_classes: int = 10, kwargs_json: str = "{}",
                 input_size: tuple | None = None) -> tuple[int, int]:
    """(parameters, MACs) of a model at ``input_size`` (default: its default input size).

    The model is built on the meta device: shapes only, no weights or compute,
    so profiling a whole family (resnet50 at 224x224 included) takes well under
    a second and gives the same numbers as a real forward pass.
    """
    from .profile import count_macs, count_params

    entry = get_entry(name)
    size = tuple(input_size) if input_size else entry.input_size
    with torch.device("meta"):
        model = create_model(entry.name, num_classes=num_classes, in_chans=size[0], **json.loads(kwargs_json))
    try:
        return count_params(model), count_macs(model, size)
    except RuntimeError as exc:  # e.g. a fixed-size classifier (plain CNNs) on another input size
        reason = str(exc).splitlines()[0]
        raise CompressError(f"model {entry.name} cannot take {'x'.join(map(str, size))} inputs ({reason}); "
                            f"pick a model for this input size") from None


def _default_profile(name: str) -> tuple[int, int]:
    return profile_arch(get_entry(name).name)


def model_stats(name: str) -> dict:
    """Parameters and MACs of ``name`` at its defaults (10 classes, default input)."""
    entry = get_entry(name)
    params, macs = _default_profile(entry.name)
    return {"name": entry.name, "family": entry.family, "params": params, "macs": macs,
            "input_size": list(entry.input_size), "norm": entry.norm}


def family_ladder(family: str) -> list[str]:
    """Members of ``family`` ordered from least to most compute (MACs, then params)."""
    members = list_models(family)
    if not members:
        raise CompressError(f"unknown model family {family!r}; known: {', '.join(list_families())}")
    return sorted(members, key=lambda n: (_default_profile(n)[1], _default_profile(n)[0]))


def dummy_input(name_or_size, batch: int = 1) -> torch.Tensor:
    size = get_entry(name_or_size).input_size if isinstance(name_or_size, str) else tuple(name_or_size)
    return torch.zeros(batch, *size)
