"""One config dataclass per command, filled from defaults < YAML recipe < CLI flags.

Recipes are flat YAML mappings whose keys are the dataclass fields; an unknown
key or a value of the wrong type is an error that names the key. The resolved
config is written into the run directory before the first step.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .errors import CompressError

METHODS = ("dgkd", "takd", "kd", "ce")
KD_REDUCTIONS = ("sum", "mean")
SCHEDULES = ("step", "cosine", "constant")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
PLAN_METRICS = ("macs", "params", "latency")
AUGMENT = ("auto", "cifar", "imagenet", "none")
DATA_MODES = ("auto", "memory", "stream")


@dataclass
class OptimConfig:
    """Optimisation settings shared by ``train`` and ``distill`` (paper defaults)."""

    data: str = "demo"
    epochs: int = 160
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    schedule: str = "step"           # step: lr x gamma at each milestone (fractions of epochs)
    milestones: list = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = 0.1
    warmup_epochs: int = 0
    augment: typing.Union[str, bool] = "auto"  # cifar | imagenet | none | auto (true/false: cifar/none)
    seed: int = 20
    mixed_precision: str = "auto"    # auto | no | bf16 | fp16; auto: bf16 where native (compressor.precision)
    grad_accum: int = 1
    channels_last: typing.Optional[bool] = None  # None: on when auto picks bf16
    val_fraction: float = 0.1        # held out of train for the per-epoch evaluation; 0 = paper protocol (test)
    train_subset: typing.Optional[int] = None  # use only the first N (shuffled) training images
    eval_every: int = 1
    image_size: typing.Optional[int] = None    # default: native size if uniform, else the family's
    data_mode: str = "auto"                    # memory | stream | auto (memory if it fits the RAM budget)
    data_workers: typing.Optional[int] = None  # stream mode: loader worker processes (default: cores - 1)
    skip_bad_images: bool = False              # drop undecodable image files (counted) instead of exit 2
    log_with: typing.Optional[str] = None      # an Accelerate tracker: tensorboard, wandb, ...
    compile: bool = False                      # torch.compile the trained model and its guides (trainer.compile_for_training)

    def validate(self) -> None:
        _positive(self, "epochs", "batch_size", "grad_accum", "eval_every")
        if self.lr <= 0:
            raise CompressError(f"lr must be > 0, got {self.lr}; e.g. --lr 0.1")
        if not 0 <= self.momentum < 1:
            raise CompressError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise CompressError(f"weight_decay must be >= 0, got {self.weight_decay}")
        _choice(self, "schedule", SCHEDULES)
        _choice(self, "mixed_precision", MIXED_PRECISION)
        if any(not 0 < float(m) < 1 for m in self.milestones):
            raise CompressError(f"milestones are fractions of the epochs in (0, 1), got {self.milestones}")
        if not 0 <= self.val_fraction < 1:
            raise CompressError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.train_subset is not None and self.train_subset <= 0:
            raise CompressError(f"train_subset must be > 0, got {self.train_subset}")
        if self.warmup_epochs < 0:
            raise CompressError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        # Old recipes say `augment: true/false`: the CIFAR policy / none.
        self.augment = {True: "cifar", False: "none"}.get(self.augment, self.augment) \
            if isinstance(self.augment, bool) else self.augment
        _choice(self, "augment", AUGMENT)
        _choice(self, "data_mode", DATA_MODES)
        if self.image_size is not None and not 8 <= self.image_size <= 4096:
            raise CompressError(f"image_size must be in 8..4096 pixels, got {self.image_size}; e.g. --image-size 224")
        if self.data_workers is not None and self.data_workers < 0:
            raise CompressError(f"data_workers must be >= 0, got {self.data_workers}")


@dataclass
class TrainConfig(OptimConfig):
    """``compress train``: train one model (a teacher) with cross-entropy."""

    arch: str = ""
    out: str = ""
    num_classes: typing.Optional[int] = None   # default: from the data
    model_kwargs: dict = field(default_factory=dict)
    mean: typing.Optional[list] = None         # default: CIFAR mean/std for 3 channels
    std: typing.Optional[list] = None
    init: typing.Optional[str] = None          # fine-tune from this checkpoint
    epochs: int = 30
    weight_decay: float = 5e-4

    def validate(self) -> None:
        super().validate()
        if not self.arch:
            raise CompressError("no model given; pass --arch NAME (see 'compress models')")
        if not self.out:
            raise CompressError("no output path; pass --out FILE.safetensors")


@dataclass
class DistillConfig(OptimConfig):
    """``compress distill``: the chain teacher -> assistants -> student."""

    teacher: str = ""
    target: typing.Optional[str] = None              # student arch, e.g. resnet8
    target_latency_ms: typing.Optional[float] = None  # or: largest student under this latency
    target_family: typing.Optional[str] = None        # with target_latency_ms: pick from this family
    method: str = "dgkd"                              # dgkd | takd | kd | ce
    assistants: str = "auto"                          # auto | N | name,name
    by: str = "macs"                                  # spacing metric: macs | params | latency
    max_assistants: int = 4
    spacing: float = 2.5                              # auto: at most this compute ratio between neighbours
    temperature: float = 5.0
    kd_weight: float = 1.0                            # λ: (1-λ)·CE + λ·Σ KD
    kd_reduction: str = "sum"                         # sum (paper, official code) | mean over the kept guides
    drop_guides: int = 1                              # stochastic teaching: guides dropped per batch
    model_kwargs: dict = field(default_factory=dict)  # options for student/assistants, e.g. {shortcut: B}
    assistant_epochs: typing.Optional[int] = None     # default: epochs
    out: typing.Optional[str] = None                  # run directory (default runs/<name>)
    name: typing.Optional[str] = None
    latency_backend: str = "torch"                    # plan table latency: torch | onnxruntime | none
    cache_guides: bool = False                        # store guide logits per (epoch, step) and reuse them
    ignore_class_names: bool = False                  # run a teacher on data whose class names differ
    trust_code: bool = False                          # import the user code a teacher checkpoint names

    def validate(self) -> None:
        super().validate()
        if not self.teacher:
            raise CompressError("no teacher given; pass --teacher T.safetensors")
        if not self.target and self.target_latency_ms is None:
            raise CompressError("no student given; pass --target NAME (e.g. resnet8) or --target-latency MS")
        if self.target and self.target_latency_ms is not None:
            raise CompressError("give either --target or --target-latency, not both")
        if self.target_family and self.target_latency_ms is None:
            raise CompressError("--target-family only applies with --target-latency (it picks the student's family)")
        if self.target_latency_ms is not None and self.target_latency_ms <= 0:
            raise CompressError(f"target latency must be > 0 ms, got {self.target_latency_ms}")
        _choice(self, "method", METHODS)
        _choice(self, "by", PLAN_METRICS)
        _choice(self, "latency_backend", ("torch", "onnxruntime", "none"))
        if self.temperature <= 0:
            raise CompressError(f"temperature must be > 0, got {self.temperature}; the paper uses 5")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise CompressError(f"kd_weight (λ) must be in [0, 1], got {self.kd_weight}")
        _choice(self, "kd_reduction", KD_REDUCTIONS)
        if self.drop_guides < 0:
            raise CompressError(f"drop_guides must be >= 0, got {self.drop_guides}")
        if self.max_assistants < 0:
            raise CompressError(f"max_assistants must be >= 0, got {self.max_assistants}")
        if self.spacing <= 1:
            raise CompressError(f"spacing must be > 1 (a compute ratio), got {self.spacing}")
        if self.assistant_epochs is not None and self.assistant_epochs <= 0:
            raise CompressError(f"assistant_epochs must be > 0, got {self.assistant_epochs}")


# ---------------------------------------------------------------- helpers
def _positive(cfg, *names):
    for n in names:
        v = getattr(cfg, n)
        if v <= 0:
            raise CompressError(f"{n} must be > 0, got {v}")


def _choice(cfg, name, options):
    v = getattr(cfg, name)
    if v not in options:
        raise CompressError(f"{name} must be one of {', '.join(options)}; got {v!r}")


def _type_ok(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation in (list, dict, str):
        return isinstance(value, annotation)
    return True


def _coerce(value, annotation):
    if annotation is float or typing.Optional[float] == annotation:
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. `assistants: 2` in YAML
    return value


def apply_overrides(cfg, values: dict, source: str):
    """Set fields of ``cfg`` from ``values``; unknown keys / wrong types name the key."""
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in fields(cfg)]
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=2)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise CompressError(f"{source}: unknown key {key!r}{hint}; valid keys: {', '.join(sorted(names))}")
        value = _coerce(value, hints[key])
        if not _type_ok(value, hints[key]):
            raise CompressError(f"{source}: key {key!r} must be {_type_name(hints[key])}, got {value!r}")
        setattr(cfg, key, value)
    return cfg


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(annotation) if a is not type(None)) + " (or null)"
    return getattr(annotation, "__name__", str(annotation))


def read_recipe(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise CompressError(f"recipe {str(p)!r} does not exist; check the path (recipes live in recipes/)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:  # safe_load: tags such as !!python/object never construct anything
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        if isinstance(exc, yaml.constructor.ConstructorError) and "tag" in str(exc.problem or ""):
            raise CompressError(f"recipe {str(p)!r}{where} uses a YAML tag ({str(exc.problem).split('tag ')[-1]}) "
                                f"that compress never executes; recipes are plain key: value mappings") from None
        raise CompressError(f"recipe {str(p)!r} is not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CompressError(f"recipe {str(p)!r} must be a mapping of key: value")
    return data


def resolve_config(cls, recipe: str | None = None, cli: dict | None = None):
    """defaults < recipe < CLI flags (``None`` CLI values mean "not given")."""
    cfg = cls()
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    if recipe:
        values = read_recipe(recipe)
        _check_recipe_code_refs(recipe, values, cli)
        apply_overrides(cfg, values, f"recipe {recipe}")
    if cli:
        apply_overrides(cfg, cli, "command line")
    cfg.validate()
    return cfg


# Recipe keys whose value may name code (``file.py:NAME`` / ``package.module:NAME``).
CODE_REF_KEYS = ("arch", "target", "assistants")


def _check_recipe_code_refs(recipe, values: dict, cli: dict) -> None:
    """A recipe is an input file: it may not make compress import code on its own.

    A user-code reference in a recipe is accepted only when the command line
    names the same value or passes ``--trust-code`` (zoo names never contain ``:``).
    """
    if cli.get("trust_code"):
        return
    for key in CODE_REF_KEYS:
        value = values.get(key)
        if isinstance(value, str) and ":" in value and cli.get(key) != value:
            flag = "--" + key.replace("_", "-")
            raise CompressError(f"recipe {str(recipe)!r} names code ({key}: {value}); compress does not run code "
                                f"because a file names it: pass {flag} {value} on the command line"
                                + (" or --trust-code" if key != "arch" else "") + " if you trust that code")


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
