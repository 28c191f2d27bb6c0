"""Generate the docs' reference pages from the code, so they cannot go stale.

* ``cli_markdown()``: every ``compress`` command with its arguments and options, read by Click
  introspection from the ``compressor.cli:cli`` group (names, types, defaults, help).
* ``config_markdown()``: every recipe key, read from the config dataclasses in
  ``compressor/config.py`` (type, default, the comment beside the field, the flag that sets it).

It is also an mkdocs hook (``hooks:`` in mkdocs.yml): a page holding the line
``<!-- generated: cli -->`` or ``<!-- generated: config -->`` gets the table in its place at build
time. ``python tools/gen_cli_reference.py cli|config`` prints the markdown.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import re
import sys
import tokenize
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the mkdocs hook runs from any folder
    sys.path.insert(0, str(ROOT))

TRUST_KEYS = ("trust_code", "allow_pickle", "accept_code_change")
# Keys no flag sets and no comment in compressor/config.py explains (the flag column says so).
RECIPE_ONLY = {
    "nesterov": ("", "(recipe only) Nesterov momentum for SGD"),
    "model_kwargs": ("--option KEY=VALUE", "the model's options, a mapping in a recipe (e.g. {shortcut: B})"),
    "init_assistants": ("--init-assistant ARCH=FILE", "assistant arch -> the weights to start it from"),
}
MARKERS = {"<!-- generated: cli -->": "cli", "<!-- generated: config -->": "config"}


def _cell(text) -> str:
    """One markdown table cell: no newlines, pipes escaped."""
    text = " ".join(str(text).split())
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _code(text) -> str:
    """A table cell in backticks (nothing to escape inside a code span but the newlines)."""
    return f"`{' '.join(str(text).split())}`" if text not in ("", None) else ""


# ------------------------------------------------------------------ CLI


def _param_names(param) -> str:
    import click

    if isinstance(param, click.Argument):
        return param.human_readable_name
    names = ", ".join(param.opts)
    if param.secondary_opts:
        names += " / " + ", ".join(param.secondary_opts)
    return names


def _param_type(param) -> str:
    import click

    if isinstance(param, click.Option) and param.is_flag:
        return "flag"
    t = param.type
    if isinstance(t, click.Choice):
        return " | ".join(str(c) for c in t.choices)
    name = getattr(t, "name", str(t))
    return {"text": "text", "integer": "integer", "float": "number", "boolean": "boolean"}.get(name, name)


def _param_default(param) -> str:
    import click

    default = param.default
    if "Sentinel" in repr(default) or callable(default) or default is None or default == () or (
            isinstance(param, click.Option) and param.is_flag and not param.secondary_opts and default is False):
        return ""
    if isinstance(default, (list, tuple)):
        default = ",".join(str(d) for d in default)
    return str(default)


def iter_commands():
    """(name, click.Command) for every command of the ``compress`` group, sorted by name."""
    import click

    from compressor.cli import cli

    ctx = click.Context(cli, info_name="compress")
    for name in sorted(cli.list_commands(ctx)):
        yield name, cli.get_command(ctx, name)


def cli_option_names(command) -> list[str]:
    """Every option string (``--flag``, ``--no-flag``) and argument name a command accepts."""
    import click

    out = []
    for p in command.params:
        if isinstance(p, click.Argument):
            out.append(p.human_readable_name)
        else:
            out.extend(p.opts + p.secondary_opts)
    return out


def cli_markdown() -> str:
    import click

    from compressor.cli import cli

    lines = [f"{_cell(cli.help or '')}", "",
             "Every command takes `--help`; `compress --version` prints the version.", ""]
    commands = list(iter_commands())
    lines.append("| command | what it does |")
    lines.append("|---|---|")
    for name, cmd in commands:
        lines.append(f"| [`compress {name}`](#compress-{name}) | {_cell(cmd.get_short_help_str(limit=200))} |")
    lines.append("")
    for name, cmd in commands:
        ctx = click.Context(cmd, info_name=f"compress {name}")
        lines.append(f"## compress {name}")
        lines.append("")
        lines.append("```")
        lines.append(" ".join(cmd.collect_usage_pieces(ctx)).join(["compress " + name + " ", ""]))
        lines.append("```")
        lines.append("")
        if cmd.help:  # as --help shows it: a text block keeps the examples and needs no escaping
            lines += ["```text", inspect.cleandoc(cmd.help).replace("\b\n", ""), "```", ""]
        lines.append("| option | type | default | meaning |")
        lines.append("|---|---|---|---|")
        for p in cmd.params:
            required = " (required)" if p.required else ""
            help_ = getattr(p, "help", None) or ("argument" if isinstance(p, click.Argument) else "")
            if p.multiple and isinstance(p, click.Option):
                help_ += " (may be repeated)"
            lines.append(f"| {_code(_param_names(p))}{required} | {_cell(_param_type(p))} | "
                         f"{_code(_param_default(p))} | {_cell(help_)} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------ config


def _field_comments(cls) -> dict[str, str]:
    """The ``# comment`` beside each field in the class body (the source is the documentation)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments, current = {}, None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and current is None:
            current = tok.string
        elif tok.type == tokenize.COMMENT and current is not None:
            comments[current] = tok.string.lstrip("#").strip()
        if tok.type == tokenize.NEWLINE:
            current = None
    return comments


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in args) + (" or null" if type(None) in typing.get_args(annotation) else "")
    return getattr(annotation, "__name__", str(annotation))


def _field_default(f) -> str:
    if f.default is not dataclasses.MISSING:
        return "null" if f.default is None else repr(f.default) if isinstance(f.default, str) else str(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return str(f.default_factory())  # type: ignore[misc]
    return ""


def config_keys(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _flag_helps(*command_names: str) -> dict[str, tuple[str, str]]:
    """Dataclass-field name -> (flag, help) for the options of these commands (the first one wins)."""
    import click

    out = {}
    commands = dict(iter_commands())
    for name in reversed(command_names):
        for p in commands[name].params:
            if isinstance(p, click.Option):
                out[p.name] = (_param_names(p), p.help or "")
    return out


def config_markdown() -> str:
    from compressor.config import DistillConfig, OptimConfig, TrainConfig

    sections = [
        (OptimConfig, ("distill", "train"), "Shared by `compress train` and `compress distill` recipes"),
        (TrainConfig, ("train",), "`compress train` only (`TrainConfig`)"),
        (DistillConfig, ("distill", "plan"), "`compress distill` and `compress plan` only (`DistillConfig`)"),
    ]
    shared = set(config_keys(OptimConfig))
    lines = []
    for cls, command, title in sections:
        hints = typing.get_type_hints(cls)
        comments = {}
        for klass in reversed(cls.__mro__):
            if dataclasses.is_dataclass(klass):
                comments.update(_field_comments(klass))
        flags = _flag_helps(*command)
        own = [f for f in dataclasses.fields(cls) if cls is OptimConfig or f.name not in shared
               or f.name in cls.__dict__.get("__annotations__", {})]
        lines += [f"## {title}", "", _cell(inspect.cleandoc(cls.__doc__ or "")), "",
                  "| key | type | default | flag | meaning |", "|---|---|---|---|---|"]
        for f in own:
            flag, help_ = flags.get(f.name, ("", ""))
            meaning = re.sub(r"\s*\[default: [^]\s]*\]", "", help_) or comments.get(f.name, "")
            if not flag and f.name in RECIPE_ONLY:
                flag, meaning = RECIPE_ONLY[f.name]
            if f.name in TRUST_KEYS:
                meaning += " -- command line only: a recipe holding this key is refused"
            lines.append(f"| `{f.name}` | {_cell(_type_name(hints[f.name]))} | {_code(_field_default(f))} | "
                         f"{_code(flag)} | {_cell(meaning)} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


GENERATORS = {"cli": cli_markdown, "config": config_markdown}


def render(markdown: str) -> str:
    """Replace every marker line with its generated markdown."""
    for marker, kind in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, GENERATORS[kind]())
    return markdown


# mkdocs hook entry point
def on_page_markdown(markdown, page=None, config=None, files=None, **kwargs):  # noqa: ARG001
    return render(markdown)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in GENERATORS:
        print("usage: python tools/gen_cli_reference.py cli|config", file=sys.stderr)
        return 2
    sys.stdout.write(GENERATORS[argv[0]]())
    return 0


if __name__ == "__main__":
    sys.exit(main())
