"""The one trust gate: code runs only because the command line says so.

compress imports Python code in exactly one way: a model reference
``path/to/file.py:NAME`` or ``package.module:NAME`` (zoo names never contain
``:``). Files the tool reads -- checkpoints, recipes, a run directory's
``config.yaml`` and ``plan.json``, ONNX metadata, images -- may *record* such a
reference, but never make compress import it. A reference is imported only when

* the command line spells out the same reference (``--arch``, ``--target``,
  ``--assistants``; a recipe's reference counts only when the command line
  repeats it), or
* the command line passes ``--trust-code`` ("I trust the code this checkpoint
  names").

Trust is a command-line matter only: a recipe holding any of
:data:`TRUST_KEYS` is refused, whatever its value, so a file can neither grant
trust nor look as if it had. The resolved ``config.yaml`` a run writes leaves
them out for the same reason.

What a reference may point at is narrow as well (checked in
:func:`check_model_builder` when it is imported): an ``nn.Module`` subclass, or
a function whose return annotation is one; a plain function without an
annotation only when it is defined in the ``.py`` file the person named. So
``subprocess:getoutput`` or ``os:system`` are refused even on the command line.
"""
from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass

from .errors import CompressError
from .fileio import shorten

# Command-line-only keys: a recipe holding one of them is refused.
TRUST_KEYS = ("trust_code", "allow_pickle", "accept_code_change")


def is_code_ref(name) -> bool:
    """Zoo names never contain ``:``; every code reference does. ``timm:NAME`` is a timm model
    name, not code (:mod:`compressor.models.timm_models`): it needs no trust."""
    return isinstance(name, str) and ":" in name and not name.strip().startswith("timm:")


def same_code_ref(a, b) -> bool:
    """Whether ``a`` and ``b`` are both code references naming the same code."""
    if not (is_code_ref(a) and is_code_ref(b)):
        return False
    from .models.user import same_ref

    try:
        return same_ref(a, b)
    except CompressError:  # a malformed reference names nothing
        return False


@dataclass(frozen=True)
class Trust:
    """What the command line allows to run.

    ``named``: code references the command line spelled out; ``trust_code``:
    ``--trust-code`` was given. Build it from command-line values only
    (:func:`trust_from_config` after :func:`refuse_trust_keys` ran on the recipe).
    """

    trust_code: bool = False
    named: tuple = ()
    accept_code_change: bool = False  # --accept-code-change: the named code may differ from the recorded sha256

    def allows(self, ref) -> bool:
        if not is_code_ref(ref):
            return True
        return self.trust_code or any(same_code_ref(n, ref) for n in self.named)


def assistant_names(value) -> list[str]:
    """The model names of an ``assistants`` value (``auto``, ``N`` or ``a,b``)."""
    if not isinstance(value, str) or value == "auto" or value.strip().isdigit():
        return []
    return [v.strip() for v in value.split(",") if v.strip()]


def trust_from_config(cfg) -> Trust:
    """The trust a resolved config carries: its code references passed the recipe check
    (:func:`check_recipe`), so each of them was named on the command line."""
    named = [getattr(cfg, key, None) for key in ("arch", "target")]
    named += assistant_names(getattr(cfg, "assistants", None))
    return Trust(trust_code=bool(getattr(cfg, "trust_code", False)),
                 named=tuple(n for n in named if is_code_ref(n)))


# ---------------------------------------------------------------- recipes
CODE_REF_KEYS = ("arch", "target", "assistants")


def check_recipe(recipe, values: dict, cli: dict) -> None:
    """A recipe is an input file: it can neither grant trust nor make compress import code.

    * any of :data:`TRUST_KEYS` in it is refused, whatever its value;
    * a code reference in it is accepted only when the command line names the same
      value or passes ``--trust-code``.
    """
    held = [k for k in TRUST_KEYS if k in values]
    if held:
        flags = " / ".join("--" + k.replace("_", "-") for k in held)
        raise CompressError(f"recipe {str(recipe)!r} holds {', '.join(held)}: trust is given on the command line "
                            f"only; remove the key from the recipe and pass {flags} yourself if you mean it")
    if cli.get("trust_code"):
        return
    for key in CODE_REF_KEYS:
        value = values.get(key)
        refs = [value] if key != "assistants" else assistant_names(value)
        for ref in refs:
            if is_code_ref(ref) and cli.get(key) != value:
                flag = "--" + key.replace("_", "-")
                raise CompressError(
                    f"recipe {str(recipe)!r} names code ({key}: {value}); compress does not run code because a "
                    f"file names it: pass {flag} {value} on the command line"
                    + (" or --trust-code" if key != "arch" else "") + " if you trust that code")


def without_trust_keys(values: dict) -> dict:
    """``values`` less :data:`TRUST_KEYS` (what a run records as its resolved config)."""
    return {k: v for k, v in values.items() if k not in TRUST_KEYS}


# ---------------------------------------------------------------- checkpoints and run files
def check_checkpoint_code(meta, path, trust: Trust) -> dict | None:
    """Refuse to run the user code a checkpoint names unless ``trust`` allows it, and refuse a
    file whose code changed since the checkpoint was saved unless ``trust.accept_code_change``.

    Returns ``{"recorded": sha256, "current": sha256}`` when a change was accepted (the caller
    prints and records it), else None.
    """
    if not is_code_ref(meta.arch):
        return None
    if not trust.allows(meta.arch):
        raise CompressError(
            f"{path} names user code {shorten(meta.arch)}; compress does not run code because a checkpoint names "
            f"it: pass --trust-code if you trust that file (eval, export and bench --torch also take "
            f"--arch {shorten(meta.arch)}, the same reference)")
    if not meta.code_sha256:
        return None
    from .models.user import code_sha256

    current = code_sha256(meta.arch)
    if current == meta.code_sha256:
        return None
    if trust.accept_code_change:
        return {"recorded": meta.code_sha256, "current": current}
    raise CompressError(
        f"{shorten(meta.arch.rpartition(':')[0])} changed since {path} was saved (sha256 {current[:12]}, recorded "
        f"{meta.code_sha256[:12]}); restore the file the checkpoint was made with, retrain, or pass "
        f"--accept-code-change if the edit leaves the model's layers as they were (recorded)")


def check_plan_code(plan, path, trust: Trust, *, teacher_arch: str) -> None:
    """A run's ``plan.json`` is a file: every model it names must be a zoo name, the
    teacher's own (already trusted) reference, or code the command line named."""
    for member in plan.members:
        arch = member.arch
        if not isinstance(arch, str):
            raise CompressError(f"{path} is damaged (arch {shorten(repr(arch))}); delete it and resume again "
                                f"to plan anew")
        if is_code_ref(arch) and not (trust.allows(arch) or same_code_ref(arch, teacher_arch)):
            raise CompressError(
                f"{path} names code ({shorten(arch)}) the command line did not name; compress does not run code "
                f"because a file names it: delete {path} and resume again to plan anew, or pass that reference "
                f"with --target/--assistants")


# ---------------------------------------------------------------- what a reference may point at
def _annotated_module_class(fn) -> bool:
    from torch import nn

    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations say nothing
        annotation = inspect.signature(fn).return_annotation
        hints = {"return": annotation} if not isinstance(annotation, str) else {}
    returned = hints.get("return")
    return inspect.isclass(returned) and issubclass(returned, nn.Module)


def check_model_builder(builder, ref: str, *, module_name: str, from_file: bool) -> None:
    """``ref`` must point at an ``nn.Module`` class or a factory that returns one.

    Accepted: an ``nn.Module`` subclass; a function annotated ``-> nn.Module`` (or a
    subclass); for a ``.py`` file reference, also a plain function defined in that file.
    Anything else (``subprocess:getoutput``, ``os:system``, a class that is no module,
    a function the file merely imported) is refused before it is called.
    """
    from torch import nn

    if inspect.isclass(builder):
        if issubclass(builder, nn.Module):
            return
        raise CompressError(f"{ref} is the class {builder.__name__}, not a torch.nn.Module; point the reference "
                            f"at an nn.Module class or a factory returning one")
    if inspect.isfunction(builder):
        if _annotated_module_class(builder):
            return
        if from_file and getattr(builder, "__module__", None) == module_name:
            return
        why = ("is not defined in that file" if from_file else "has no return annotation naming an nn.Module")
        raise CompressError(f"{ref} {why}; compress only calls nn.Module classes and factories returning one: "
                            f"point the reference at your model class, or annotate the factory '-> nn.Module'")
    raise CompressError(f"{ref} is a {type(builder).__name__}, not an nn.Module class or a factory function; "
                        f"point the reference at one")
