"""The ``compress`` command line: a thin Click layer over the Python API.

Exit codes: 0 ok; 1 a requested check failed (parity, latency budget, accuracy
floor); 2 bad input (one line on stderr, no traceback); 130 interrupted (Ctrl-C);
143 stopped by SIGTERM (the training state saved first, as on Ctrl-C).
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import typing
from pathlib import Path

import click

from .config import DistillConfig, TrainConfig
from .errors import CheckFailed, CompressError, Terminated


def _csv_floats(value):
    if value is None:
        return None
    try:
        return [float(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise CompressError(f"expected comma-separated numbers, got {value!r} (e.g. 0.485,0.456,0.406)") from None


def parse_option_value(text: str):
    """An ``--option`` value, typed: ``true``/``false`` (any case) -> bool, ``none``/``null`` -> None,
    integers and finite floats -> numbers, anything else stays a string (so ``pretrained=False`` is
    ``False``, not the truthy string ``'False'``)."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            value = cast(text)
        except ValueError:
            continue
        if cast is float and value != value or value in (float("inf"), float("-inf")):
            raise CompressError(f"--option value {text!r} is not a finite number; give a finite value")
        return value
    return text


def _parse_options(pairs) -> dict:
    """``--option shortcut=B --option pretrained=false`` -> {"shortcut": "B", "pretrained": False}."""
    out = {}
    for pair in pairs or ():
        if "=" not in pair:
            raise CompressError(f"--option takes KEY=VALUE, got {pair!r} (e.g. --option shortcut=B)")
        key, value = pair.split("=", 1)
        if not key.strip().isidentifier():
            raise CompressError(f"--option key {key.strip()!r} is not a Python identifier (e.g. --option shortcut=B)")
        out[key.strip()] = parse_option_value(value)
    return out


def config_options(cls, names: list[str], helps: dict[str, str]):
    """Click options for dataclass fields ``names`` (all default to None = not given)."""
    hints = typing.get_type_hints(cls)

    def decorate(fn):
        for name in reversed(names):
            flag = "--" + name.replace("_", "-")
            t = hints[name]
            base = next((a for a in typing.get_args(t) if a is not type(None)), t)
            help_ = helps.get(name, "")
            default = next(f.default for f in dataclasses.fields(cls) if f.name == name) \
                if any(f.name == name and f.default is not dataclasses.MISSING for f in dataclasses.fields(cls)) else None
            if default not in (None, "", dataclasses.MISSING):
                help_ = f"{help_} [default: {default}]".strip()
            if base is bool:
                fn = click.option(f"{flag}/--no-{name.replace('_', '-')}", name, default=None, help=help_)(fn)
            elif base is list:
                fn = click.option(flag, name, default=None, help=help_ + " (comma-separated)")(fn)
            else:
                ctype = {int: int, float: float}.get(base, str)
                fn = click.option(flag, name, type=ctype, default=None, help=help_)(fn)
        return fn

    return decorate


OPTIM_HELP = {
    "data": "demo, a CIFAR-10/100 python dir, or an ImageFolder root",
    "epochs": "training epochs", "batch_size": "images per step and process [default: auto: 128, halved down to 16 while an epoch "
                                    "would have fewer than 32 steps]",
    "epoch_repeats": "passes over the training images per epoch [default: auto: 1, or as many as make an epoch "
                     "at least 2048 images on a smaller set]",
    "lr": "peak learning rate [default: the model family's, scaled to the images per step; x 0.3 for a "
          "model that starts from weights (--init, --init-student, --init-assistant), x 0.1 when those "
          "weights already score well on the validation split]",
    "optimizer": "sgd | adamw [default: the model family's: adamw for MobileNet, ShuffleNet, EfficientNet and "
                 "RegNet, else sgd]",
    "momentum": "SGD momentum", "weight_decay": "weight decay [default: the model family's]",
    "schedule": "step | cosine | constant [default: the model family's (cosine)]",
    "milestones": "step schedule: fractions of the epochs",
    "gamma": "step schedule factor", "warmup_epochs": "linear warmup epochs, fractions allowed "
                                                      "[default: the model family's, at most 1/5 of the run]",
    "label_smoothing": "label smoothing of the cross-entropy term [default: train: 0 (it makes teachers: "
                       "smoothed teachers teach less); distill: the model family's, 0.1 for torchvision/ImageNet "
                       "families, 0 for CIFAR families]",
    "grad_clip": "clip the gradient norm to this (0: off) [default: the model family's: 5 for MobileNet, "
                 "ShuffleNet, RegNet, EfficientNet and your own models, else off]",
    "augment": "cifar (pad-4 crop + flip) | crop (pad-4 crop, no flip: digits, text, anything a mirror "
               "changes) | imagenet (RandomResizedCrop + flip) | none | auto (crop for grayscale images; "
               "colour: imagenet from 64 px or for imagenet families, else cifar)", "seed": "random seed",
    "mixed_precision": "auto | no | bf16 | fp16 (auto: bf16 + channels_last where the CPU or GPU has native bf16; on such a CPU a model with depthwise convolutions is timed once and trains in fp32 + channels_last where that is 1.15x faster)",
    "grad_accum": "gradient accumulation steps", "channels_last": "channels_last memory format [default: on when auto picks bf16]",
    "val_fraction": "hold out this share of train for the per-epoch evaluation (0: per-epoch on test)",
    "train_subset": "train on the first N shuffled images only", "eval_every": "evaluate every N epochs",
    "test_every_epoch": "also score the test split at every per-epoch evaluation (metrics.jsonl test_top1; "
                        "reported only: the gate, the best epoch and every choice use the validation split)",
    "log_with": "Accelerate tracker (tensorboard, wandb, ...)",
    "image_size": "train at NxN pixels (default: the native size if all images share it, else the model "
                  "family's; distill: the teacher's)",
    "data_mode": "memory | stream | auto (memory when the decoded images fit half the free RAM per process)",
    "data_workers": "stream mode: DataLoader worker processes (default: cores - 1, at most 8)",
    "skip_bad_images": "leave undecodable image files out (counted in the run) instead of stopping",
    "bn_recalibration_batches": "after training (each stage of distill), recompute BatchNorm statistics on this "
                                "many training batches in the training view (precise BN; 10 before each "
                                "per-epoch score; 0: off)",
    "compile": "torch.compile the trained model and its guides (costs tens of seconds per model and stage; "
               "pays off on long runs, see docs/performance.md)",
}
OPTIM_FIELDS = list(OPTIM_HELP)


class CompressGroup(click.Group):
    def format_epilog(self, ctx, formatter):
        formatter.write_paragraph()
        formatter.write_text("Example:  compress models && compress plan --teacher T.safetensors --target resnet8")


def _command_line() -> str:
    """The command as typed (``main(argv)`` passes its argv in ``obj``), for resume hints."""
    argv = (click.get_current_context().find_root().obj or {}).get("argv", sys.argv[1:])
    return "compress " + " ".join(shlex.quote(a) for a in argv)


def _interrupted(command: str, what: str, stop: KeyboardInterrupt) -> typing.NoReturn:
    """Ctrl-C: exit 130; SIGTERM (:class:`Terminated`): 143, what a scheduler expects of a process it
    asked to stop."""
    resume_cmd = command if "--resume" in command.split() else command + " --resume"
    terminated = isinstance(stop, Terminated)
    click.echo(f"\n{'terminated (SIGTERM)' if terminated else 'interrupted'}: {what}. Resume with:\n  {resume_cmd}",
               err=True)
    sys.exit(143 if terminated else 130)


@click.group(cls=CompressGroup)
@click.version_option(package_name="compress")
def cli():
    """compress: plan teacher assistants, distill with DGKD, export and benchmark ONNX students."""


@cli.command("models")
@click.option("--family", default=None, help="only this family")
def models_cmd(family):
    """List the model zoo: name, family, parameters and MACs (10 classes, default input).

    Example:  compress models --family cifar_resnet
    """
    from .models import list_families, list_models, model_stats
    from .report import format_table

    if family is not None and family not in list_families():
        raise CompressError(f"unknown family {family!r}; known: {', '.join(list_families())}")
    rows = []
    for name in list_models(family):
        s = model_stats(name)
        rows.append([s["name"], s["family"], f"{s['params']:,}", f"{s['macs'] / 1e6:.1f}M",
                     "x".join(str(v) for v in s["input_size"]), s["norm"]])
    click.echo(format_table(["name", "family", "params", "MACs", "input", "norm"], rows))
    click.echo("timm models: --arch timm:NAME (pip install 'compress[timm]'). "
               "Your own model: --arch path/to/file.py:NAME (see examples/my_model.py). Families with a "
               "'stem' option use --option stem=cifar by default for inputs up to 64 px.")


@cli.command("train")
@click.option("--arch", default=None, help="zoo model name (e.g. resnet56), a timm model (timm:NAME, e.g. "
                                          "timm:resnet18) or your code: path/to/file.py:NAME or package.module:NAME")
@click.option("--out", default=None, help="output checkpoint (.safetensors)")
@click.option("--recipe", default=None, help="YAML recipe (keys = TrainConfig fields)")
@click.option("--init", default=None,
              help="start from these weights: any file 'compress import' reads (e.g. torchvision ImageNet .pth); "
                   "matching tensors are copied, the classifier is replaced for another class count, the "
                   "normalisation the weights expect is kept; the file's sha256 is recorded")
@click.option("--num-classes", type=int, default=None, help="default: from the data")
@click.option("--mean", default=None, help="normalisation mean, comma-separated")
@click.option("--std", default=None, help="normalisation std, comma-separated")
@click.option("--option", "options", multiple=True, help="model option KEY=VALUE, e.g. shortcut=B")
@click.option("--resume", is_flag=True, help="continue the interrupted training of --out (saved in OUT.train-state/; "
                                            "flags left out take what it recorded, a changed one is refused)")
@config_options(TrainConfig, OPTIM_FIELDS, OPTIM_HELP)
def train_cmd(arch, out, recipe, init, num_classes, mean, std, options, resume, **flags):
    """Train one model (e.g. a teacher) with cross-entropy.

    The learning rate, schedule, warm-up, weight decay, label smoothing and gradient
    clip default to the model family's (printed at the start, stored in the
    checkpoint); a flag or a recipe key sets any of them.

    Example:  compress train --arch resnet20 --data demo --epochs 30 --out teacher.safetensors
    """
    from .pipeline import train_model, train_state_dir

    flags = {k: (_csv_floats(v) if k == "milestones" else v) for k, v in flags.items()}
    cli_values = dict(flags, arch=arch, out=out, init=init, num_classes=num_classes,
                      mean=_csv_floats(mean), std=_csv_floats(std),
                      model_kwargs=_parse_options(options) or None)
    cfg = _resolve_resumable(TrainConfig, recipe, cli_values, resume=resume,
                             config_path=lambda out: train_state_dir(Path(out)) / "config.yaml" if out else None)
    from .fileio import check_output_path

    check_output_path(cfg.out, inputs=[recipe, cfg.init])
    try:
        metrics = train_model(cfg, resume=resume)
    except KeyboardInterrupt as stop:
        _interrupted(_command_line(), "the training progress is saved", stop)
    click.echo(f"saved {cfg.out}: final test top-1 {metrics['final_test_top1']:.2f}%  "
               f"top-5 {metrics['final_test_top5']:.2f}%  "
               f"({metrics['train_seconds']:.0f} s)")


@cli.command("import")
@click.argument("file")
@click.option("--arch", required=True, help="zoo model name (or timm:NAME, or file.py:NAME) the weights belong to")
@click.option("--out", required=True, help="output .safetensors")
@click.option("--num-classes", type=int, default=None, help="default: inferred from the classifier")
@click.option("--mean", default=None, help="normalisation mean the weights expect (default: the family's)")
@click.option("--std", default=None, help="normalisation std (default: the family's)")
@click.option("--class-names", default=None, help="comma-separated class names")
@click.option("--option", "options", multiple=True, help="model option KEY=VALUE, e.g. shortcut=A")
@click.option("--image-size", type=int, default=None,
              help="the NxN input the weights were trained at (default: what the model is built for with "
                   "its options, e.g. 32 for --option stem=cifar, else the family's)")
@click.option("--allow-pickle", is_flag=True,
              help="I trust whoever wrote this file: allow full unpickling (can run code from the file)")
def import_cmd(file, arch, out, num_classes, mean, std, class_names, options, image_size, allow_pickle):
    """Convert a PyTorch state dict (.pth/.th) into a compress checkpoint.

    Accepts a bare state dict or one under 'state_dict'/'model', with or without
    a 'module.' prefix. Every key must match the arch; the input channels follow
    the file's first conv (a grayscale model imports as 1-channel). Files are read with
    torch.load(weights_only=True): a file that pickles anything but tensors and
    plain containers is refused unless --allow-pickle is given.

    Example:  compress import resnet56-4bfd9763.th --arch resnet56 --mean 0.485,0.456,0.406
    --std 0.229,0.224,0.225 --out teacher.safetensors
    """
    from .checkpoint import (_infer_num_classes, channel_normalisation, family_normalisation, file_in_chans,
                             file_sha256, load_foreign_state_dict, load_state_strict, meta_for, save_checkpoint)
    from .fileio import check_output_path
    from .models import check_fits, count_params, create_model, get_entry, input_size_for

    if image_size is not None and not 8 <= image_size <= 4096:
        raise CompressError(f"--image-size must be in 8..4096 pixels, got {image_size}; e.g. --image-size 224")
    entry = get_entry(arch)
    check_output_path(out, inputs=[file])
    state = load_foreign_state_dict(file, allow_pickle=allow_pickle)
    n = num_classes or _infer_num_classes(state)
    kwargs = _parse_options(options)
    model = create_model(entry.name, num_classes=n, **kwargs)
    in_chans = file_in_chans(model, state)  # e.g. a grayscale model: its stem conv takes 1 channel
    if in_chans is not None:
        click.echo(f"input channels: {in_chans}, as the file's first conv takes (the arch's default: "
                   f"{input_size_for(entry.name, kwargs)[0]})")
        model = create_model(entry.name, num_classes=n, in_chans=in_chans, **kwargs)
    load_state_strict(model, state, entry.name, file)
    # The size recorded is the size distill/eval/export feed the model: what it is built for.
    size = input_size_for(entry.name, kwargs, in_chans)
    if image_size:
        size = (size[0], image_size, image_size)
    else:
        click.echo(f"input size: {size[1]}x{size[2]} px, what {entry.name} is built for with these options "
                   f"(--image-size N if the weights were trained at another size)")
    check_fits(entry.name, kwargs, n, size, fix="state the size the weights were trained at with --image-size, "
                                                "or the model option that sets it")
    names = [c.strip() for c in class_names.split(",")] if class_names else []
    norm_name, default_mean, default_std = family_normalisation(entry)
    default_mean, default_std = channel_normalisation(default_mean, default_std, size[0])
    if any(v and len(_csv_floats(v)) != size[0] for v in (mean, std)):
        raise CompressError(f"--mean/--std need {size[0]} values (one per channel): the file's model takes "
                            f"{size[0]}-channel images")
    if not (mean and std):
        averaged = " (the channel averages)" if size[0] != 3 else ""
        click.echo(f"normalisation: {norm_name} mean/std{averaged}, the default for {entry.family} "
                   f"(--mean/--std to override)")
    extra = {}
    if entry.timm_name:  # its pretrained_cfg's crop decides how eval and export validation crop
        from .models.timm_models import eval_policy

        policy, why = eval_policy(entry.name, size)
        click.echo(f"evaluation crop: {policy} policy ({why})")
        extra["metrics"] = {"augment": policy}
    meta = meta_for(entry.name, num_classes=n, mean=_csv_floats(mean) or default_mean,
                    std=_csv_floats(std) or default_std, class_names=names, model_kwargs=kwargs, input_size=size,
                    source=f"imported from {file} (sha256 {file_sha256(file)[:16]})", **extra)
    save_checkpoint(out, model, meta)
    click.echo(f"imported {len(state)} tensors into {entry.name} ({count_params(model):,} params, "
               f"{n} classes) -> {out}")


DISTILL_HELP = {
    "method": "dgkd | takd | kd | ce", "assistants": "auto | N | comma-separated names",
    "by": "assistant spacing metric: macs | params | latency", "max_assistants": "cap for --assistants auto",
    "spacing": "auto: max compute ratio between neighbours", "temperature": "KD temperature T [default: auto: 4 where the student's stage sees at least 100,000 training images (epochs x images per epoch, --unlabeled images included) of at most 100 classes, else 2] (the paper: 5, pinned in its recipes)",
    "kd_weight": "λ in (1-λ)·CE + λ·Σ KD",
    "kd_reduction": "mean: average the kept guides' KD terms, so the KD gradient does not grow with the number "
                    "of guides; sum: add them (the paper)",
    "kd_weighting": "confidence: weigh each guide's KD term on an image by the probability it gives the label, "
                    "the label taking the rest (a weak guide mostly hands its share back to the label); "
                    "uniform: every term weight λ (the paper; its recipes pin it)", "drop_guides": "stochastic teaching: guides dropped per batch",
    "kd_logits": "standardized: z-score every image's student and guide logits before the temperature, so the "
                 "student matches the guide's ranking and spacing of the classes, not its logit scale (Sun et al. "
                 "2024); raw: the logits as they are (the paper; its recipes pin it)",
    "kd_mixup": "[default: on below 2,048 training images] without --unlabeled: the guides also label mixes of pairs of training images (4 per image, "
                "blended with a uniform weight, made once at the start) and the student learns their KD terms "
                "beside each batch, as with --unlabeled: the guides teach between the training images too; "
                "about one more forward and backward pass per step",
    "kd_warmup_epochs": "ramp λ from 0 over these epochs of each stage, CE filling in (at most 1/4 of a stage; 0: off)",
    "gate_guides": "keep an assistant that ends near chance or below half the teacher's lead over chance out of "
                   "the later stages' guides, and drop a guide a later model beats by more than 2 points",
    "assistant_epochs": "epochs for each assistant (default: --epochs)", "name": "run name (runs/NAME)",
    "latency_backend": "plan table latency: onnxruntime (fp32, batch 1, as 'compress bench' times the deployed "
                       "file) | torch (eager) | none; distill's run table is timed once after training in "
                       "onnxruntime (none: not timed)",
    "cache_guides": "store guide logits per (epoch, step) on disk and reuse them across stages and runs",
    "ignore_class_names": "run the teacher on data whose class names differ from the teacher's",
    "trust_code": "I trust the code the teacher checkpoint names (file.py:NAME): import it",
    "init_student": "start the student from these weights (any file 'compress import' reads, e.g. a torchvision "
                    "ImageNet .pth): matching tensors copied, classifier replaced for another class count",
    "accept_code_change": "load a teacher whose code file changed since it was saved (the edit must leave its "
                          "layers as they were; printed and recorded)",
    "unlabeled": "a folder of images without labels (flat, nested or class folders; DIR/train/ if it has one): "
                 "the guides label them and the student learns from their KD terms too (not with method ce)",
    "unlabeled_ratio": "unlabeled images per step, as a multiple of --batch-size",
}


def _plan_options(fn):
    for opt in reversed([
        click.option("--teacher", default=None, help="teacher checkpoint (.safetensors)"),
        click.option("--target", default=None,
                     help="student: a zoo name (e.g. resnet8), a timm model (timm:NAME) or your code, "
                          "path/to/file.py:NAME"),
        click.option("--target-latency", "target_latency_ms", default=None,
                     help="instead of --target: largest student under this batch-1 latency, e.g. 0.2ms"),
        click.option("--target-family", default=None,
                     help="with --target-latency: the family to pick from, e.g. mobilenetv3 [default: the teacher's]"),
        click.option("--recipe", default=None, help="YAML recipe (keys = DistillConfig fields)"),
        click.option("--option", "options", multiple=True, help="student/assistant option KEY=VALUE"),
    ]):
        fn = opt(fn)
    return fn


def _parse_ms(value):
    if value is None:
        return None
    text = str(value).strip().lower().removesuffix("ms").strip()
    try:
        return float(text)
    except ValueError:
        raise CompressError(f"--target-latency takes milliseconds, e.g. 0.2ms; got {value!r}") from None


def _install_onnx_timer() -> None:
    """Latency planning times models in onnxruntime with the deployment package; the CLI wires it in
    (no module of the library but this one imports ``export``: see ``compressor.latency``)."""
    from .latency import set_onnx_timer

    def timer(model, meta, **kwargs) -> float:
        from export.bench import onnx_model_latency_ms

        return onnx_model_latency_ms(model, meta, **kwargs)

    set_onnx_timer(timer)


def _given_out(recipe, values: dict):
    """``--out``, else the recipe's ``out`` (None: neither gives one)."""
    if values.get("out"):
        return values["out"]
    if recipe:
        from .config import read_recipe

        return read_recipe(recipe).get("out")
    return None


def _resolve_resumable(cls, recipe, values: dict, *, resume: bool, config_path):
    """``resolve_config``; with ``--resume`` the run's recorded ``config.yaml`` (``config_path(out)``,
    None: no run to read) is the layer under the recipe and the flags, so a flag left out continues as
    the run started (:func:`compressor.pipeline.recorded_settings`) -- ``--out RUN --resume`` is enough."""
    from .config import resolve_config

    base = None
    if resume:
        from .pipeline import recorded_settings

        path = config_path(_given_out(recipe, values))
        base = recorded_settings(path, cls, values) if path else None
    return resolve_config(cls, recipe, values, base=base)


def _distill_config(teacher, target, target_latency_ms, recipe, options, flags, *, resume: bool = False):
    from .config import resolve_config

    flags = {k: (_csv_floats(v) if k == "milestones" else v) for k, v in flags.items()}
    values = dict(flags, teacher=teacher, target=target, target_latency_ms=_parse_ms(target_latency_ms),
                  model_kwargs=_parse_options(options) or None)

    def config_path(out):
        if not out:  # the default folder is named after the teacher, target and method (a latency target:
            cfg = resolve_config(DistillConfig, recipe, values)  # not known before planning)
            if not cfg.target:
                return None
            from .pipeline import default_run_dir

            out = default_run_dir(cfg, cfg.target)
        return Path(out) / "config.yaml"

    return _resolve_resumable(DistillConfig, recipe, values, resume=resume, config_path=config_path)


@cli.command("plan")
@_plan_options
@config_options(DistillConfig,
                ["method", "assistants", "by", "max_assistants", "spacing", "latency_backend", "epochs",
                 "drop_guides", "data", "trust_code", "accept_code_change"], {**DISTILL_HELP, **OPTIM_HELP})
@click.option("--json", "json_out", default=None, help="also write the plan as JSON here")
def plan_cmd(teacher, target, target_latency_ms, recipe, options, json_out, **flags):
    """Pick the teacher assistants between a teacher and a target student.

    Example:  compress plan --teacher resnet110.safetensors --target resnet8 --assistants auto
    """
    _install_onnx_timer()
    from .checkpoint import ensure_code_trusted, read_checkpoint
    from .fileio import check_output_path, write_json
    from .planning import format_plan, plan_chain
    from .pipeline import _resolve_target

    cfg = _distill_config(teacher, target, target_latency_ms, recipe, options, flags)
    if json_out:
        check_output_path(json_out, inputs=[cfg.teacher, recipe])
    _, tmeta = read_checkpoint(cfg.teacher)
    ensure_code_trusted(tmeta, cfg.teacher, trust_code=cfg.trust_code, accept_code_change=cfg.accept_code_change)
    arch = _resolve_target(cfg, tmeta)
    plan = plan_chain(tmeta.arch, tmeta.num_classes, arch, teacher_kwargs=tmeta.model_kwargs,
                      assistants=cfg.assistants, by=cfg.by, max_assistants=cfg.max_assistants,
                      spacing=cfg.spacing, method=cfg.method, model_kwargs=cfg.model_kwargs,
                      latency_backend=cfg.latency_backend, drop_guides=cfg.drop_guides, epochs=cfg.epochs,
                      assistant_epochs=cfg.assistant_epochs, input_size=tmeta.input_size)
    click.echo(format_plan(plan))
    if json_out:
        write_json(json_out, plan.to_dict())


@cli.command("distill")
@_plan_options
@click.option("--out", default=None, help="run directory [default: runs/<teacher>-to-<target>-<method>]")
@click.option("--resume", is_flag=True, help="continue an interrupted run: flags left out take what its "
              "config.yaml recorded; a flag with another value is refused")
@config_options(DistillConfig,
                ["method", "assistants", "by", "max_assistants", "spacing", "temperature", "kd_weight",
                 "kd_reduction", "kd_weighting", "kd_logits", "kd_mixup", "kd_warmup_epochs", "gate_guides", "drop_guides",
                 "assistant_epochs", "name", "latency_backend", "cache_guides",
                 "ignore_class_names", "trust_code", "accept_code_change", "init_student",
                 "unlabeled", "unlabeled_ratio"] + OPTIM_FIELDS,
                {**DISTILL_HELP, **OPTIM_HELP})
@click.option("--init-assistant", "init_assistant", multiple=True,
              help="ARCH=PATH: start that assistant from these weights (any file 'compress import' reads)")
def distill_cmd(teacher, target, target_latency_ms, recipe, options, out, resume, init_assistant, **flags):
    """Train teacher -> assistants -> student with DGKD (or takd / kd / ce).

    Example:  compress distill --teacher resnet110.safetensors --target resnet8 --data demo --epochs 20
    """
    from .pipeline import run_distillation

    _install_onnx_timer()
    pairs = [p.split("=", 1) for p in init_assistant]
    if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise CompressError(f"--init-assistant takes ARCH=PATH, got {init_assistant!r} "
                            f"(e.g. --init-assistant resnet14=r14.safetensors)")
    flags = dict(flags, out=out, init_assistants={k.strip(): v.strip() for k, v in pairs} or None)
    cfg = _distill_config(teacher, target, target_latency_ms, recipe, options, flags, resume=resume)
    command = _command_line()
    try:
        run_distillation(cfg, resume=resume, command=command)
    except KeyboardInterrupt as stop:
        _interrupted(command, "finished stages and the running stage's progress are saved", stop)


@cli.command("eval")
@click.argument("model")
@click.option("--data", default="demo", show_default=True, help="dataset to evaluate on (its test split)")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--min-accuracy", type=float, default=None, help="exit 1 when top-1 (%) is below this")
@click.option("--arch", default=None, help="for safetensors files without compress metadata, or the file.py:NAME "
                                          "the checkpoint names")
@click.option("--trust-code", is_flag=True, help="I trust the code this checkpoint names (file.py:NAME): import it")
@click.option("--accept-code-change", is_flag=True,
              help="load a checkpoint whose code file changed since it was saved (printed and recorded)")
@click.option("--json", "json_out", default=None, help="also write the metrics as JSON here")
@click.option("--ignore-class-names", is_flag=True, help="evaluate even if the model's class names differ from the data's")
@click.option("--image-size", type=int, default=None,
              help="evaluate at NxN (default: the size the model was trained at; other data is resized to it)")
@click.option("--data-mode", type=click.Choice(["auto", "memory", "stream"]), default="auto", show_default=True,
              help="keep the test split in memory, or stream it from disk")
@click.option("--skip-bad-images", is_flag=True, help="leave undecodable image files out instead of stopping")
def eval_cmd(model, data, batch_size, min_accuracy, arch, trust_code, accept_code_change, json_out,
             ignore_class_names, image_size, data_mode, skip_bad_images):
    """Top-1/top-5 accuracy and loss of a .safetensors or .onnx model.

    Only the test (or val) split is read, at the size and channels the model was
    trained at; images of another size are resized and center-cropped (printed).

    Example:  compress eval runs/latest/student.safetensors --data demo --min-accuracy 40
    """
    from .evaluation import evaluate_checkpoint

    if batch_size <= 0:
        raise CompressError(f"--batch-size must be > 0, got {batch_size}")
    if image_size is not None and image_size < 1:
        raise CompressError(f"--image-size must be > 0, got {image_size}")
    from .config import MAX_IMAGE_SIZE

    if image_size is not None and image_size > MAX_IMAGE_SIZE:
        raise CompressError(f"--image-size must be at most {MAX_IMAGE_SIZE} pixels, got {image_size}")
    if json_out:
        from .fileio import check_output_path

        check_output_path(json_out, inputs=[model])
    notes: list = []
    if model.endswith(".onnx"):
        from export.runtime import evaluate_onnx

        result = evaluate_onnx(model, data, batch_size=batch_size, image_size=image_size, mode=data_mode,
                               skip_bad_images=skip_bad_images, notes=notes, ignore_class_names=ignore_class_names)
        backend = "onnxruntime"
    else:
        result = evaluate_checkpoint(model, data, batch_size=batch_size, arch=arch, trust_code=trust_code,
                                     accept_code_change=accept_code_change,
                                     image_size=image_size, mode=data_mode, skip_bad_images=skip_bad_images,
                                     notes=notes, ignore_class_names=ignore_class_names)
        backend = "torch"
    for note in notes:
        click.echo(f"data: {note}")
    from .fileio import shorten

    click.echo(f"{model}: sha256 {result['sha256']}, source: {shorten(result['source']) or 'not recorded'}")
    click.echo(f"{model} on {data} ({result['n']} images, {backend}): top-1 {result['top1']:.2f}%  "
               f"top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}")
    if json_out:
        from .fileio import write_json

        write_json(json_out, {"model": model, "data": data, "backend": backend, "split": "test",
                              **{k: result[k] for k in ("top1", "top5", "loss", "n", "sha256", "source")}})
    if min_accuracy is not None:
        from export import check_accuracy_floor

        check_accuracy_floor(result["top1"], min_accuracy)


@cli.command("report")
@click.argument("run_dir", default="runs/latest")
def report_cmd(run_dir):
    """Write report.md and plots for a distillation run directory.

    Example:  compress report runs/latest
    """
    from .report import write_report

    click.echo(f"wrote {write_report(run_dir)}")


def _add_export_commands() -> None:
    try:
        from export.commands import bench_cmd, export_cmd
    except ImportError:  # pragma: no cover - the export package ships with compress
        return
    cli.add_command(export_cmd)
    cli.add_command(bench_cmd)


_add_export_commands()


def _exit(code: int) -> typing.NoReturn:
    """``sys.exit``, except in a multi-process run that failed: there the live process group's
    C++ threads abort the interpreter's shutdown ("terminate called without an active
    exception", exit -6) once the peer is gone, so the process leaves at once with ``code``."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv=None) -> None:
    """Console entry point: map our exceptions to exit codes without tracebacks."""
    try:
        # obj: the arguments as given (``main(argv)`` from Python, too), for the resume hint
        cli.main(args=argv, prog_name="compress", standalone_mode=False,
                 obj={"argv": list(sys.argv[1:] if argv is None else argv)})
    except CompressError as exc:
        from .fileio import shorten

        click.echo(f"error: {shorten(str(exc), 4000)}", err=True)  # one line, whatever a file put in it
        _exit(2)
    except CheckFailed as exc:
        click.echo(f"check failed: {exc}", err=True)
        _exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx is not None else "compress"
        click.echo(f"error: {exc.format_message()} (see '{command} --help')", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:
        click.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
        sys.exit(2)
    sys.exit(0)


if __name__ == "__main__":
    main()
