"""A small generic registry, in the style of timm / torchdistill.

Entries are registered explicitly (decorator, bare or with a name); a duplicate
name is an error, and looking up an unknown name suggests close matches.
Names are normalised (lower case, ``-`` -> ``_``) so ``WRN-40-2`` finds
``wrn40_2``'s alias ``wrn_40_2`` and ``ResNet8`` finds ``resnet8``.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from .errors import CompressError

T = TypeVar("T")


def normalise_name(name: str) -> str:
    return name.strip().lower().replace("-", "_")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, obj: T | None = None, *, name: str | None = None):
        """Register ``obj`` under ``name`` (default: ``obj.__name__``).

        Usable as ``@reg.register``, ``@reg.register(name="x")`` or
        ``reg.register(obj, name="x")``.
        """

        def add(item: T) -> T:
            key = normalise_name(name or getattr(item, "__name__"))
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = item
            return item

        if obj is None:
            return add
        return add(obj)

    def get(self, name: str) -> T:
        key = normalise_name(name)
        if key not in self._items:
            close = difflib.get_close_matches(key, list(self._items), n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise CompressError(
                f"unknown {self.kind} {name!r}.{hint} "
                f"Run 'compress models' to list the {self.kind}s."
            )
        return self._items[key]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and normalise_name(name) in self._items

    def names(self) -> list[str]:
        return list(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


Builder = Callable[..., object]
