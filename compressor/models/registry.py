"""The model registry: ``create_model``, ``list_models`` and family ladders.

Every model is registered with its family and default input size. A family's
*ladder* is its members ordered by compute (MACs at the default input size);
the assistant planner walks it to pick models between a teacher and a student.
"""
from __future__ import annotations

import functools
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


MODELS: Registry[ModelEntry] = Registry("model")


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
    """A zoo entry, or for ``file.py:NAME`` / ``package.module:NAME`` the user's code (imported)."""
    from .user import is_user_ref, user_entry

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
        from .user import build_user_model

        return build_user_model(entry, num_classes=num_classes, in_chans=in_chans, **merged)
    try:
        return entry.builder(num_classes=num_classes, in_chans=in_chans, **merged)
    except TypeError as exc:
        raise CompressError(f"model {entry.name!r} does not accept these options: {exc}") from None


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
    import json

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
