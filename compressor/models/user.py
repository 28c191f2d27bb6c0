"""Your own model: ``path/to/file.py:NAME`` or ``package.module:NAME``.

``NAME`` is an ``nn.Module`` class or a factory function returning one. It is
called with the ``--option KEY=VALUE`` keyword arguments, plus ``num_classes``
and ``in_chans`` when its signature takes them (or ``**kwargs``). Its output
must be logits of shape ``(N, num_classes)``; this is checked once, at the size it
will run at (the data's: :func:`compressor.models.check_fits`, before training), not
when it is built. Optional attributes of ``NAME``:

* ``INPUT_SIZE = (C, H, W)`` -- its default input size (default ``(3, 32, 32)``; the
  data's size wins where there is data);
* ``LADDER = {"label": {kwargs}, ...}`` -- sizes of the same model; the planner
  picks assistants from them by MACs (or latency) when ``NAME`` is the student.

Code from a file runs only when a person names it (``--arch``, ``--target``,
``--assistants``, or ``--trust-code`` for a checkpoint that names it): see
:func:`compressor.checkpoint.ensure_code_trusted`. A checkpoint records the
reference and the sha256 of the file, so a changed file is caught on load.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
from pathlib import Path

import torch
from torch import nn

from ..errors import CompressError
from ..trust import is_code_ref
from .registry import ModelEntry

DEFAULT_INPUT_SIZE = (3, 32, 32)
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_loaded: dict[tuple[str, str], object] = {}      # (file or module, sha256) -> imported module


is_user_ref = is_code_ref  # zoo names never contain ``:``; every user reference does (one rule: compressor.trust)


def split_ref(ref: str) -> tuple[str, str]:
    target, _, attr = ref.strip().rpartition(":")
    if not target or not attr.isidentifier():
        raise CompressError(f"model reference {ref!r} must be path/to/file.py:NAME or package.module:NAME")
    if target.endswith(".py"):
        return os.path.normpath(target), attr
    if not _MODULE_RE.match(target):
        raise CompressError(f"model reference {ref!r}: {target!r} is neither a .py file nor a module name; "
                            f"use path/to/file.py:NAME or package.module:NAME")
    return target, attr


def canonical_ref(ref: str) -> str:
    target, attr = split_ref(ref)
    return f"{target}:{attr}"


def same_ref(a: str, b: str) -> bool:
    """Whether two references name the same code (file paths compared resolved)."""
    (ta, na), (tb, nb) = split_ref(a), split_ref(b)
    if ta.endswith(".py") and tb.endswith(".py"):
        return na == nb and Path(ta).resolve() == Path(tb).resolve()
    return (ta, na) == (tb, nb)


def arch_slug(arch: str) -> str:
    """A file-name-safe label for a zoo name or a reference (run and stage folder names)."""
    if not is_user_ref(arch):  # zoo names are safe already; timm:NAME -> timm_NAME
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", arch)
    target, attr = split_ref(arch)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{Path(target).stem if target.endswith('.py') else target}_{attr}")


def code_file(ref: str) -> Path:
    """The source file a reference names. Module references import their parent packages."""
    target, _ = split_ref(ref)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise CompressError(f"model file {target!r} (from {ref}) does not exist; check the path, "
                                f"relative to the current directory")
        return path
    try:
        spec = importlib.util.find_spec(target)
    except (ImportError, ValueError) as exc:
        spec, why = None, f" ({type(exc).__name__}: {exc})"
    else:
        why = ""
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        raise CompressError(f"module {target!r} (from {ref}) cannot be found{why}; check PYTHONPATH or use "
                            f"path/to/file.py:NAME")
    return Path(spec.origin)


def code_sha256(ref: str) -> str:
    from ..checkpoint import file_sha256

    return file_sha256(code_file(ref))


def _import(ref: str):
    from ..checkpoint import file_sha256

    target, _ = split_ref(ref)
    path = code_file(ref)
    sha = file_sha256(path)  # every time: an edited file is imported again (and refused where a checkpoint pins it)
    key = (str(path.resolve()) if target.endswith(".py") else target, sha)
    if key in _loaded:
        return _loaded[key]
    try:
        if target.endswith(".py"):
            name = f"compress_user_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_{sha[:12]}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses and pickling look modules up here
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        else:
            module = importlib.import_module(target)
    except CompressError:
        raise
    except Exception as exc:  # the user's code failed while importing
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise CompressError(f"importing {path} (from {ref}) failed: {type(exc).__name__}: {reason}; "
                            f"fix the file") from None
    _loaded[key] = module
    return module


def user_entry(ref: str) -> ModelEntry:
    """Import the code ``ref`` names and describe it as a zoo-like entry."""
    canonical = canonical_ref(ref)
    target, attr = split_ref(canonical)
    module = _import(canonical)
    if not hasattr(module, attr):
        defined = sorted(n for n, v in vars(module).items()
                         if not n.startswith("_") and (inspect.isclass(v) or inspect.isfunction(v))
                         and getattr(v, "__module__", None) == module.__name__)
        raise CompressError(f"{target} has no attribute {attr!r} (defined there: {', '.join(defined) or 'nothing'}); "
                            f"fix the NAME after ':' in {ref}")
    builder = getattr(module, attr)
    from ..trust import check_model_builder

    # only nn.Module classes and factories returning one are ever called (not subprocess:getoutput)
    check_model_builder(builder, canonical, module_name=module.__name__, from_file=target.endswith(".py"))
    size = tuple(getattr(builder, "INPUT_SIZE", DEFAULT_INPUT_SIZE))
    if len(size) != 3 or not all(isinstance(v, int) and v > 0 for v in size):
        raise CompressError(f"{canonical}.INPUT_SIZE must be (C, H, W) positive integers, got {size!r}")
    doc = (inspect.getdoc(builder) or "").strip().splitlines()
    return ModelEntry(name=canonical, family=f"user:{canonical}", builder=builder, input_size=size,
                      description=doc[0] if doc else f"user model {canonical}", user_ref=canonical)


def _parameters(builder):
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        return {}, True
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return params, var_kw


def accepted_options(entry: ModelEntry, kwargs: dict) -> dict:
    """The options of ``kwargs`` the builder takes (all of them when it takes ``**kwargs``)."""
    params, var_kw = _parameters(entry.builder)
    return dict(kwargs) if var_kw else {k: v for k, v in kwargs.items() if k in params}


def build_user_model(entry: ModelEntry, *, num_classes: int, in_chans: int, **kwargs) -> nn.Module:
    params, var_kw = _parameters(entry.builder)
    unknown = [k for k in kwargs if k not in params and not var_kw]
    if unknown:
        takes = ", ".join(k for k in params if k not in ("num_classes", "in_chans")) or "no options"
        raise CompressError(f"{entry.name} does not take option(s) {', '.join(unknown)} (it takes: {takes}); "
                            f"fix --option")
    call = dict(kwargs)
    for key, value in (("num_classes", num_classes), ("in_chans", in_chans)):
        if key in params or var_kw:
            call[key] = value
    try:
        model = entry.builder(**call)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise CompressError(f"building {entry.name}({', '.join(f'{k}={v!r}' for k, v in call.items())}) failed: "
                            f"{type(exc).__name__}: {reason}; fix the options or the code") from None
    if not isinstance(model, nn.Module):
        raise CompressError(f"{entry.name} returned a {type(model).__name__}, not a torch.nn.Module; "
                            f"make it an nn.Module class or a function that returns one")
    return model  # its output is checked at the size it will run at (models.check_fits), not here


@torch.no_grad()
def check_output(model: nn.Module, name: str, input_size, num_classes: int,
                 fix: str = "fix forward() or set INPUT_SIZE on it") -> None:
    """A classifier's output for a batch of 2 must be a ``(2, num_classes)`` tensor."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else "cpu"
    shape = (2, *input_size)
    was_training = model.training
    model.eval()
    try:
        out = model(torch.zeros(shape, device=device))
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise CompressError(f"{name} fails on a {tuple(shape)} input ({type(exc).__name__}: {reason}); "
                            f"{fix}") from None
    finally:
        model.train(was_training)
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != (2, num_classes):
        raise CompressError(f"{name} outputs {got} for a batch of 2; a classifier must return logits of shape "
                            f"(N, num_classes) = (2, {num_classes}); fix forward()")


def user_ladder(ref: str) -> dict[str, dict]:
    """``NAME.LADDER``: label -> keyword arguments, or ``{}`` when it has none."""
    entry = user_entry(ref)
    ladder = getattr(entry.builder, "LADDER", None)
    if ladder is None:
        return {}
    if not isinstance(ladder, dict) or not all(isinstance(v, dict) for v in ladder.values()):
        raise CompressError(f"{entry.name}.LADDER must be a dict of label -> keyword arguments, "
                            f"e.g. {{'small': {{'width': 16}}}}")
    return {str(k): dict(v) for k, v in ladder.items()}
