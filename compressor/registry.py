"""A small generic registry, in the style of timm / torchdistill.

Entries are registered explicitly (decorator, bare or with a name); a duplicate
name is an error, and looking up an unknown name suggests close matches.
Lookups ignore case, ``-`` and ``_``, so ``WRN-40-2`` and ``wrn_40_2`` find
``wrn40_2`` and ``ResNet8`` finds ``resnet8``.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from .errors import CompressError

T = TypeVar("T")


def normalise_name(name: str) -> str:
    """The canonical spelling of a registered name (lower case, ``-`` -> ``_``)."""
    return name.strip().lower().replace("-", "_")


def _key(name: str) -> str:
    return normalise_name(name).replace("_", "")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}   # canonical name -> item
        self._keys: dict[str, str] = {}   # lookup key -> canonical name

    def register(self, obj: T | None = None, *, name: str | None = None):
        """Register ``obj`` under ``name`` (default: ``obj.__name__``).

        Usable as ``@reg.register``, ``@reg.register(name="x")`` or
        ``reg.register(obj, name="x")``.
        """

        def add(item: T) -> T:
            canonical = normalise_name(name or getattr(item, "__name__"))
            if _key(canonical) in self._keys:
                raise ValueError(f"{self.kind} {canonical!r} is registered twice")
            self._keys[_key(canonical)] = canonical
            self._items[canonical] = item
            return item

        if obj is None:
            return add
        return add(obj)

    def canonical(self, name: str) -> str:
        """The registered spelling of ``name``; unknown names raise with suggestions."""
        key = _key(name)
        if key not in self._keys:
            close = difflib.get_close_matches(normalise_name(name), list(self._items), n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise CompressError(
                f"unknown {self.kind} {name!r}.{hint} "
                f"Run 'compress models' to list the {self.kind}s."
            )
        return self._keys[key]

    def get(self, name: str) -> T:
        return self._items[self.canonical(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _key(name) in self._keys

    def names(self) -> list[str]:
        return list(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


Builder = Callable[..., object]
