"""One config dataclass per command, filled from defaults < YAML recipe < CLI flags.

Recipes are flat YAML mappings whose keys are the dataclass fields; an unknown
key or a value of the wrong type is an error that names the key. The resolved
config is written into the run directory before the first step.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .errors import CompressError
from .fileio import shorten
from .trust import check_recipe, without_trust_keys

METHODS = ("dgkd", "takd", "kd", "ce")
KD_REDUCTIONS = ("sum", "mean")
KD_WEIGHTINGS = ("uniform", "confidence")  # compressor.losses.dgkd_loss(weighting=...)
KD_LOGITS = ("raw", "standardized")  # compressor.losses.kd_loss_per_sample(logits=...)
SCHEDULES = ("step", "cosine", "constant")
OPTIMIZERS = ("sgd", "adamw")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
PLAN_METRICS = ("macs", "params", "latency")
AUGMENT = ("auto", "cifar", "crop", "imagenet", "none")
DATA_MODES = ("auto", "memory", "stream")
MAX_DATA_WORKERS = 64
MAX_UNLABELED_RATIO = 64  # unlabeled images per labelled one in a step
MAX_IMAGE_SIZE = 2048  # with 3 channels the largest input checkpoint.MAX_INPUT_ELEMENTS allows


@dataclass
class OptimConfig:
    """Optimisation settings shared by ``train`` and ``distill``.

    ``None`` in lr, weight_decay, schedule, warmup_epochs, label_smoothing and grad_clip
    means "the model family's default" (:mod:`compressor.training_defaults`); the paper
    recipes pin the paper's values.
    """

    data: str = "demo"
    epochs: int = 160
    batch_size: typing.Optional[int] = None          # images per step and process; None: auto (128, less on small data)
    epoch_repeats: typing.Optional[int] = None       # passes over the training images per epoch; None: auto (1, more
    #                                                  on small data: an epoch is at least 2,048 images)
    lr: typing.Optional[float] = None            # None: the family's, scaled to the batch (training_defaults)
    momentum: float = 0.9
    weight_decay: typing.Optional[float] = None  # None: the family's
    nesterov: bool = False
    optimizer: typing.Optional[str] = None        # sgd | adamw; None: the family's (training_defaults)
    schedule: typing.Optional[str] = None        # step: lr x gamma at each milestone (fractions of epochs); None: family's
    milestones: list = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = 0.1
    warmup_epochs: typing.Optional[float] = None  # linear, per step; None: the family's (at most 1/5 of the run)
    label_smoothing: typing.Optional[float] = None  # of the cross-entropy term; None: the family's
    grad_clip: typing.Optional[float] = None        # max global gradient norm, 0 = off; None: the family's
    augment: typing.Union[str, bool] = "auto"  # cifar | imagenet | none | auto (true/false: cifar/none)
    seed: int = 20
    mixed_precision: str = "auto"    # auto | no | bf16 | fp16; auto: bf16 where native (compressor.precision)
    grad_accum: int = 1
    channels_last: typing.Optional[bool] = None  # None: on when auto picks bf16
    val_fraction: float = 0.1        # held out of train for the per-epoch evaluation; 0 = paper protocol (test)
    train_subset: typing.Optional[int] = None  # use only the first N (shuffled) training images
    eval_every: int = 1
    test_every_epoch: bool = False             # also score the test split at each per-epoch evaluation (reported only)
    image_size: typing.Optional[int] = None    # default: native size if uniform, else the family's
    data_mode: str = "auto"                    # memory | stream | auto (memory if it fits the RAM budget)
    data_workers: typing.Optional[int] = None  # stream mode: loader worker processes (default: cores - 1)
    skip_bad_images: bool = False              # drop undecodable image files (counted) instead of exit 2
    log_with: typing.Optional[str] = None      # an Accelerate tracker: tensorboard, wandb, ...
    compile: bool = False                      # torch.compile the trained model and its guides (trainer.compile_for_training)
    bn_recalibration_batches: int = 200        # precise BN after training (train) and after each stage (0: off)

    def validate(self) -> None:
        _positive(self, "epochs", "batch_size", "epoch_repeats", "grad_accum", "eval_every")
        if self.bn_recalibration_batches < 0:
            raise CompressError(f"bn_recalibration_batches must be >= 0 (0: off), got {self.bn_recalibration_batches}")
        if self.lr is not None and self.lr <= 0:
            raise CompressError(f"lr must be > 0, got {self.lr}; e.g. --lr 0.1")
        if not 0 <= self.momentum < 1:
            raise CompressError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise CompressError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule is not None:
            _choice(self, "schedule", SCHEDULES)
        if self.optimizer is not None:
            _choice(self, "optimizer", OPTIMIZERS)
        if self.label_smoothing is not None and not 0 <= self.label_smoothing < 1:
            raise CompressError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}; e.g. 0.1")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise CompressError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}; e.g. --grad-clip 5")
        _choice(self, "mixed_precision", MIXED_PRECISION)
        if any(not 0 < float(m) < 1 for m in self.milestones):
            raise CompressError(f"milestones are fractions of the epochs in (0, 1), got {self.milestones}")
        if not 0 <= self.val_fraction < 1:
            raise CompressError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.train_subset is not None and self.train_subset <= 0:
            raise CompressError(f"train_subset must be > 0, got {self.train_subset}")
        if self.warmup_epochs is not None and self.warmup_epochs < 0:
            raise CompressError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        # Old recipes say `augment: true/false`: the CIFAR policy / none.
        self.augment = {True: "cifar", False: "none"}.get(self.augment, self.augment) \
            if isinstance(self.augment, bool) else self.augment
        _choice(self, "augment", AUGMENT)
        _choice(self, "data_mode", DATA_MODES)
        if self.image_size is not None and not 8 <= self.image_size <= MAX_IMAGE_SIZE:
            raise CompressError(f"image_size must be in 8..{MAX_IMAGE_SIZE} pixels, got {self.image_size}; e.g. --image-size 224")
        if self.data_workers is not None and not 0 <= self.data_workers <= MAX_DATA_WORKERS:
            raise CompressError(f"data_workers must be in 0..{MAX_DATA_WORKERS}, got {self.data_workers}")
        _finite(self)


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

    def validate(self) -> None:
        super().validate()
        if not self.arch:
            raise CompressError("no model given; pass --arch NAME (see 'compress models')")
        if not self.out:
            raise CompressError("no output path; pass --out FILE.safetensors")


# ``--assistants auto`` plans one assistant per this compute ratio (planning.auto_assistant_count):
# none for a gap up to 6x. Assistants cost accuracy where the gap is small: ResNet-20 -> 8 (3.3x
# MACs) and MobileNetV2 1.0 -> 0.35 (5.6x), DGKD's student under KD's (the teacher alone) in 11 of 11
# 3-epoch runs with a kept assistant (-1.4 points on average) and at the CPU-study budget (-1.4,
# -0.0, -0.0). On ResNet-56 -> 8 (10.3x) at the CPU-study budget one assistant (6x) beat KD by 0.5
# points and two (2.5x) by 0.2 (seed 0; the paper's settings, 2.5x: +0.8, 3 seeds), at 58 % of
# 2.5x's training cost. docs/results.md §6. The paper's 2.5x lives in its recipes.
AUTO_SPACING = 6.0


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
    spacing: float = AUTO_SPACING                     # auto: at most this compute ratio between neighbours
    temperature: typing.Optional[float] = None        # None: 2 for short runs, 4 for long ones (training_defaults
                                                      # .resolve_temperature); paper: 5 (its recipes pin it)
    kd_weight: float = 0.5                            # λ: (1-λ)·CE + λ·KD (KD: mean or sum over the kept guides); paper: 1
    kd_reduction: str = "mean"                        # mean over the kept guides | sum (paper, official code)
    kd_weighting: str = "confidence"                  # confidence: by the guide's p(label) | uniform (paper)
    kd_logits: str = "raw"                            # raw (paper) | standardized: z-scored per image before T
    kd_mixup: typing.Optional[bool] = None            # guides also label mixes of the training images (KD only);
                                                      # None: on below 2,048 training images (training_defaults)
    kd_warmup_epochs: float = 1.0                     # λ ramps from 0 over these epochs (at most 1/4 of a stage)
    gate_guides: bool = True                          # weak or surpassed guides teach no later stage (stability)
    drop_guides: int = 1                              # stochastic teaching: guides dropped per batch
    model_kwargs: dict = field(default_factory=dict)  # options for student/assistants, e.g. {shortcut: B}
    assistant_epochs: typing.Optional[int] = None     # default: epochs
    out: typing.Optional[str] = None                  # run directory (default runs/<name>)
    name: typing.Optional[str] = None
    latency_backend: str = "onnxruntime"              # plan table latency: onnxruntime (as deployed) | torch | none
    cache_guides: bool = False                        # store guide logits per (epoch, step) and reuse them
    init_student: typing.Optional[str] = None         # start the student from these weights (compressor.init_weights)
    init_assistants: dict = field(default_factory=dict)  # assistant arch -> weights to start it from
    unlabeled: typing.Optional[str] = None           # a folder of images the guides label (KD terms only)
    unlabeled_ratio: float = 1.0                     # unlabeled images per step = ratio x batch_size
    ignore_class_names: bool = False                  # run a teacher on data whose class names differ
    trust_code: bool = False                          # import the user code a teacher checkpoint names
    accept_code_change: bool = False                  # load a teacher whose code file changed since it was saved

    def validate(self) -> None:
        super().validate()
        if not self.teacher:
            raise CompressError("no teacher given; pass --teacher T.safetensors")
        from .checkpoint import check_readable_file

        for what, path in [("--init-student", self.init_student), *(
                (f"init_assistants[{k}]", v) for k, v in (self.init_assistants or {}).items())]:
            if path is not None:
                if not isinstance(path, str):
                    raise CompressError(f"{what} must be a file path, got {path!r}")
                check_readable_file(path, f"{what} weights")
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
        if self.temperature is not None and self.temperature <= 0:
            raise CompressError(f"temperature must be > 0, got {self.temperature}; the paper uses 5")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise CompressError(f"kd_weight (λ) must be in [0, 1], got {self.kd_weight}")
        _choice(self, "kd_reduction", KD_REDUCTIONS)
        _choice(self, "kd_weighting", KD_WEIGHTINGS)
        _choice(self, "kd_logits", KD_LOGITS)
        if not 0 <= self.kd_warmup_epochs <= 1e6:
            raise CompressError(f"kd_warmup_epochs must be >= 0, got {self.kd_warmup_epochs}; e.g. --kd-warmup-epochs 1")
        if self.drop_guides < 0:
            raise CompressError(f"drop_guides must be >= 0, got {self.drop_guides}")
        if self.max_assistants < 0:
            raise CompressError(f"max_assistants must be >= 0, got {self.max_assistants}")
        if self.spacing <= 1:
            raise CompressError(f"spacing must be > 1 (a compute ratio), got {self.spacing}")
        if self.assistant_epochs is not None and self.assistant_epochs <= 0:
            raise CompressError(f"assistant_epochs must be > 0, got {self.assistant_epochs}")
        if self.unlabeled is not None and self.method == "ce":
            raise CompressError("--unlabeled needs guides to label the images, and method ce trains the student "
                                "alone; use --method dgkd, takd or kd, or drop --unlabeled")
        if not 0 < self.unlabeled_ratio <= MAX_UNLABELED_RATIO:
            raise CompressError(f"unlabeled_ratio must be in (0, {MAX_UNLABELED_RATIO}], got {self.unlabeled_ratio}; "
                                f"e.g. --unlabeled-ratio 1 (as many unlabeled images per step as labelled ones)")


# What a run written before these DistillConfig fields existed trained with: a resumed old run
# whose config.yaml lacks them is compared against these (a change is refused, never applied silently).
DISTILL_LEGACY = {"kd_warmup_epochs": 0.0, "gate_guides": False, "bn_recalibration_batches": 0}


# ---------------------------------------------------------------- helpers
def _finite(cfg) -> None:
    """Every number of the config is finite (NaN passes every ``<=`` check and trains a NaN model)."""
    for f in fields(cfg):
        bad = _non_finite(getattr(cfg, f.name))
        if bad is not None:
            raise CompressError(f"{f.name} is {bad}; every number must be finite")


def _positive(cfg, *names):
    for n in names:
        v = getattr(cfg, n)
        if v is not None and v <= 0:
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


def _non_finite(value):
    """The first NaN/inf number inside ``value`` (lists and mappings searched), else ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return value
    if isinstance(value, (list, tuple)):
        return next((v for v in map(_non_finite, value) if v is not None), None)
    if isinstance(value, dict):
        return next((v for v in map(_non_finite, value.values()) if v is not None), None)
    return None


def apply_overrides(cfg, values: dict, source: str):
    """Set fields of ``cfg`` from ``values``; unknown keys / wrong types / NaN or inf name the key."""
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in fields(cfg)]
    for key, value in values.items():
        if not isinstance(key, str):
            raise CompressError(f"{shorten(source)}: key {shorten(key)} is not a name; recipe keys are "
                                f"config field names such as epochs")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=2)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise CompressError(f"{shorten(source)}: unknown key {shorten(key)!r}{hint}; "
                                f"valid keys: {', '.join(sorted(names))}")
        value = _coerce(value, hints[key])
        if not _type_ok(value, hints[key]):
            raise CompressError(f"{shorten(source)}: key {key!r} must be {_type_name(hints[key])}, "
                                f"got {shorten(value)}")
        bad = _non_finite(value)
        if bad is not None:
            raise CompressError(f"{shorten(source)}: key {key!r} is {bad}; every number must be finite")
        setattr(cfg, key, value)
    return cfg


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(annotation) if a is not type(None)) + " (or null)"
    return getattr(annotation, "__name__", str(annotation))


MAX_RECIPE_BYTES = 1 << 20   # recipes are a few hundred bytes; a bigger file is not a recipe
MAX_RECIPE_DEPTH = 8         # nesting: mapping -> model_kwargs -> a list ... never deeper


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors/aliases (a few lines of ``&a [*b, *b, ...]`` expand to
    billions of nodes) and with bounded nesting (deep ``[[[[...`` would exhaust the stack)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise _RecipeRefused(f"uses a YAML alias (*) at line {mark.line + 1}; recipes are plain "
                                 f"key: value mappings, write the value out")
        event = self.peek_event()
        if getattr(event, "anchor", None):
            raise _RecipeRefused(f"uses a YAML anchor (&) at line {event.start_mark.line + 1}; recipes are "
                                 f"plain key: value mappings, write the value out")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_RECIPE_DEPTH:
                raise _RecipeRefused(f"nests deeper than {MAX_RECIPE_DEPTH} levels (line "
                                     f"{event.start_mark.line + 1}); recipes are flat key: value mappings")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _RecipeRefused(yaml.YAMLError):
    pass


def load_yaml(text: str):
    """``yaml.safe_load`` for files compress reads (recipes, a run's config.yaml): no aliases or
    anchors, at most :data:`MAX_RECIPE_DEPTH` levels; a refusal is a ``yaml.YAMLError``."""
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 -- a SafeLoader subclass


def read_recipe(path) -> dict:
    p = Path(path)
    if p.exists() and not p.is_file():
        raise CompressError(f"recipe {shorten(str(p))!r} is not a regular file (a folder, a pipe?); "
                            f"pass a YAML file")
    if not p.is_file():
        raise CompressError(f"recipe {shorten(str(p))!r} does not exist; check the path "
                            f"(recipes live in recipes/)")
    size = p.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise CompressError(f"recipe {str(p)!r} is {size:,} bytes (at most {MAX_RECIPE_BYTES:,}); "
                            f"recipes are short key: value files")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CompressError(f"recipe {str(p)!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    try:
        data = load_yaml(text)
    except _RecipeRefused as exc:
        raise CompressError(f"recipe {str(p)!r} {exc}") from None
    except RecursionError:
        raise CompressError(f"recipe {str(p)!r} nests too deeply; recipes are flat key: value mappings") from None
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
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise CompressError(f"recipe {str(p)!r} has a key that is not a name ({shorten(bad[0])}); "
                            f"recipe keys are config field names such as epochs")
    return data


# Keys a run's config.yaml records beside the settings (what the run resolved to); a recipe may hold
# them (so `--recipe runs/NAME/config.yaml` repeats a run) and they are ignored there.
# kd_mixup_rule and temperature_rule are keys of their own, not in the per-model training_defaults
# records: one decision each for the whole run, made by distill only.
RUN_RULE_KEYS = ("kd_mixup_rule", "temperature_rule")  # the rules' words; --resume compares the settings
RUN_RECORD_KEYS = ("num_processes", "precision", "training_defaults", "unlabeled_data", "teacher_sha256",
                   *RUN_RULE_KEYS)


def resolve_config(cls, recipe: str | None = None, cli: dict | None = None, *, base: dict | None = None):
    """defaults < ``base`` < recipe < CLI flags (``None`` CLI values mean "not given").

    ``base``: what a resumed run recorded (:func:`compressor.pipeline.recorded_settings`), so a flag
    left out on ``--resume`` continues as the run started, whatever today's default."""
    cfg = cls()
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    if base:
        apply_overrides(cfg, base, "the run's config.yaml")
    if recipe:
        values = read_recipe(recipe)
        check_recipe(recipe, values, cli)  # trust comes from the command line only
        # a run's own config.yaml is a recipe too: what it records about how the run ran is not a setting
        values = {k: v for k, v in values.items() if k not in RUN_RECORD_KEYS}
        apply_overrides(cfg, values, f"recipe {recipe}")
    if cli:
        apply_overrides(cfg, cli, "command line")
    cfg.validate()
    return cfg


def config_to_dict(cfg) -> dict:
    """The config as recorded in a run (``config.yaml``): trust flags are left out, they are
    the command line's business and no file may carry them (see :mod:`compressor.trust`)."""
    return without_trust_keys(dataclasses.asdict(cfg))
