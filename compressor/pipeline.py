"""Runs: ``train_model`` (one model, CE) and ``run_distillation`` (the chain).

A distillation run directory::

    runs/<name>/
      config.yaml                 resolved config, written before step 0
      plan.json                   the chain (see planning.Plan.to_dict)
      teacher_eval.json           the teacher's test metrics
      stages/<k>-<arch>/          one per trained model, k = 1..
        metrics.jsonl             one line per epoch
        state/                    Accelerate state after the last epoch, or the last step when
                                  Ctrl-C stopped it (removed when the stage is done)
        model.safetensors         the finished model (written last, atomically)
      student.safetensors         copy of the last stage's model
      summary.json, report.md, *.png
    runs/latest -> <name>

A stage whose ``model.safetensors`` exists is finished and is never retrained;
``--resume`` continues a running stage from its last saved epoch (or step).
A finished model or saved state that does not load is reported (exit 2) with
the file to delete, never silently retrained over.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .checkpoint import (CIFAR_MEAN, CIFAR_STD, file_sha256, load_model, load_state_strict, meta_for,
                         read_checkpoint, save_checkpoint)
from .config import DistillConfig, TrainConfig, config_to_dict
from .data import DataBundle, channel_stats, load_data, make_loader, resolve_policy, subset
from .errors import CompressError
from .fileio import check_output_path, write_json, write_yaml
from .models import create_model, get_entry
from .models.stems import CIFAR_STEM_MAX_PX, with_auto_stem
from .models.user import arch_slug, is_user_ref
from .precision import resolve_precision
from .planning import Plan, format_plan, guides_for_stage, pick_student_by_latency, plan_chain
from .progress import Progress
from .report import format_summary, write_report
from .trainer import LossSettings, check_compile_available, evaluate, fit, stable_seed

# Keys that may differ between a run and its resumption (they do not change what is computed).
# ``precision`` is what ``auto`` resolved to on the machine of the session that wrote config.yaml.
RESUME_IGNORED_KEYS = ("log_with", "precision", "trust_code", "compile")


def make_accelerator(cfg, project_dir: str | None = None):
    from accelerate import Accelerator

    from accelerate.state import AcceleratorState

    if cfg.mixed_precision == "auto":
        cfg = resolve_precision(cfg.mixed_precision, cfg.channels_last).apply(cfg)
    # Accelerate keeps one state per process and refuses a second precision: a later run in the
    # same process (a notebook, the tests) with another precision starts from a fresh state.
    previous = AcceleratorState._shared_state.get("_mixed_precision")
    if previous is not None and previous != cfg.mixed_precision:
        AcceleratorState._reset_state()
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise CompressError("--mixed-precision fp16 needs a GPU; use bf16 or no on CPU")
    kwargs = dict(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)
    if cfg.log_with:
        kwargs.update(log_with=cfg.log_with, project_dir=project_dir)
    accelerator = Accelerator(**kwargs)
    if cfg.compile:  # once per run, before anything is written
        check_compile_available(accelerator.device)
    return accelerator


@dataclass
class Splits:
    bundle: DataBundle
    train: object
    eval: object
    test: object
    eval_name: str


def prepare_splits(cfg, bundle: DataBundle) -> Splits:
    """Apply ``train_subset`` and ``val_fraction`` (a seeded shuffle of train)."""
    train = bundle.train
    if cfg.train_subset or cfg.val_fraction:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(stable_seed(cfg.seed, "split")))
        n_val = int(round(cfg.val_fraction * len(train)))
        val_idx, train_idx = order[:n_val], order[n_val:]
        if cfg.train_subset:
            train_idx = train_idx[: cfg.train_subset]
        if len(train_idx) == 0:
            raise CompressError("no training images left after val_fraction/train_subset; lower them")
        if n_val:
            return Splits(bundle, subset(train, train_idx), subset(train, val_idx), bundle.test, "val")
        train = subset(train, train_idx)
    return Splits(bundle, train, bundle.test, bundle.test, "test")


def _loaders(cfg, splits: Splits, seed: int):
    train_loader = make_loader(splits.train, cfg.batch_size, shuffle=True, seed=seed, policy=cfg.augment,
                               workers=cfg.data_workers)
    eval_loader = make_loader(splits.eval, max(cfg.batch_size, 256), shuffle=False, workers=cfg.data_workers)
    return train_loader, eval_loader


# Normalisation of the data sets whose statistics are known (demo: the CIFAR-10 slice).
KNOWN_STATS = {"demo": (CIFAR_MEAN, CIFAR_STD),
               "cifar10": (CIFAR_MEAN, CIFAR_STD),
               "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _say(text: str) -> None:
    if _is_main_process():
        print(text, flush=True)


def load_run_data(cfg, *, image_size=None, default_size=None, channels=None, family=None,
                  data: DataBundle | None = None) -> DataBundle:
    """Load ``cfg.data`` for training (size, channels, backend and policy chosen and printed);
    ``cfg.augment`` is set to the policy used. ``data`` (an in-memory bundle) skips loading."""
    if data is not None:
        policy, _ = resolve_policy(cfg.augment, data.input_size[1:], family)
        data.augment = policy
    else:
        data = load_data(cfg.data, image_size=image_size, default_size=default_size, channels=channels,
                         mode=cfg.data_mode, augment=cfg.augment, family=family,
                         skip_bad_images=cfg.skip_bad_images)
        for note in data.notes:
            _say(f"data: {note}")
    cfg.augment = data.augment
    return data


def _normalisation(cfg, bundle: DataBundle, c: int):
    """``--mean/--std`` if given; known statistics for demo/CIFAR; else estimated on the training split."""
    if cfg.mean and cfg.std:
        return list(cfg.mean), list(cfg.std)
    if bundle.name in KNOWN_STATS and c == 3:
        mean, std = KNOWN_STATS[bundle.name]
    elif bundle.name == "synthetic":  # test data: the historical defaults
        mean, std = (CIFAR_MEAN, CIFAR_STD) if c == 3 else ([0.5] * c, [0.25] * c)
    else:
        mean, std = channel_stats(bundle.train, seed=stable_seed(cfg.seed, "stats"), workers=cfg.data_workers)
        _say(f"data: normalisation estimated on {min(2000, len(bundle.train))} training images: "
             f"mean {','.join(f'{v:g}' for v in mean)}  std {','.join(f'{v:g}' for v in std)}")
    return list(cfg.mean or mean), list(cfg.std or std)


def accuracy_fields(test: dict, best: float | None, per_epoch_split: str) -> dict:
    """The accuracies of one trained model under names that carry their split.

    ``final_test_*``: the test split, scored once at the end. ``best_val_top1``: the
    best per-epoch score on the held-out validation split; under the paper's protocol
    (``val_fraction 0``) the per-epoch split is test and the figure is ``best_test_top1``
    instead (chosen on test: not an unbiased estimate). The other one is ``None``.
    """
    best = None if best is None or best < 0 else round(best, 3)
    return {"final_test_top1": round(test["top1"], 3), "final_test_top5": round(test["top5"], 3),
            "final_test_loss": round(test["loss"], 5), "per_epoch_split": per_epoch_split,
            "best_val_top1": best if per_epoch_split == "val" else None,
            "best_test_top1": best if per_epoch_split == "test" else None}


def check_class_names(meta, bundle, what: str, *, ignore: bool = False) -> None:
    """``meta`` (a checkpoint's) and ``bundle`` must name the same classes in the same order.

    Skipped when either side stores no names (imported weights without
    ``--class-names``), for the placeholder names of ``synthetic_data``, or with
    ``ignore`` (``--ignore-class-names``).
    """
    ours, theirs = list(getattr(meta, "class_names", []) or []), list(getattr(bundle, "class_names", []) or [])
    if ignore or not ours or not theirs or ours == theirs or getattr(bundle, "name", "") == "synthetic":
        return
    if sorted(ours) == sorted(theirs):
        diff = [f"#{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(ours, theirs)) if a != b][:3]
        what_differs = "the same class names in another order (" + ", ".join(diff) + ")"
    else:
        only_model = [c for c in ours if c not in theirs][:3]
        only_data = [c for c in theirs if c not in ours][:3]
        what_differs = (f"other class names ({what} only: {', '.join(map(repr, only_model)) or '-'}; "
                        f"data only: {', '.join(map(repr, only_data)) or '-'})")
    raise CompressError(f"{what} and data have {what_differs}; use the data the {what} was trained on, "
                        f"or pass --ignore-class-names if the names were never stored meaningfully")


def _check_data_fits(meta, bundle: DataBundle, what: str, *, ignore_class_names: bool = False) -> None:
    if meta.num_classes != bundle.num_classes:
        raise CompressError(
            f"{what} has {meta.num_classes} classes but the data has {bundle.num_classes}; "
            f"use data with the same classes or a matching {what}"
        )
    if tuple(meta.input_size)[0] != bundle.input_size[0]:
        raise CompressError(f"{what} takes {meta.input_size[0]}-channel images but the data has "
                            f"{bundle.input_size[0]} channels")
    check_class_names(meta, bundle, what, ignore=ignore_class_names)


def _test_metrics(accelerator, model, splits: Splits, cfg, mean, std) -> dict:
    loader = accelerator.prepare(make_loader(splits.test, max(cfg.batch_size, 256), shuffle=False,
                                             workers=cfg.data_workers))
    return evaluate(accelerator, model.to(accelerator.device), loader, mean=mean, std=std)


def _check_run_dir_writable(run_dir: Path) -> None:
    """Run directories are created with their parents; the nearest existing one must be writable."""
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CompressError(f"cannot create run directory {run_dir}: {existing} is a file; choose another --out")
    if not os.access(existing, os.W_OK):
        raise CompressError(f"cannot create run directory {run_dir}: {existing} is not writable; "
                            f"choose another --out")


def _link_latest(run_dir: Path) -> None:
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(run_dir.name, tmp)
    os.replace(tmp, link)


# ---------------------------------------------------------------- train
def train_model(cfg: TrainConfig, *, resume: bool = False, show_progress: bool = True,
                data: DataBundle | None = None) -> dict:
    """Train one model with cross-entropy (``compress train``); returns its metrics.

    ``data`` replaces ``cfg.data`` with an in-memory bundle (notebooks, tests).
    """
    out = check_output_path(cfg.out)
    entry = get_entry(cfg.arch)  # a misspelt name fails before the data is loaded
    bundle = load_run_data(cfg, image_size=cfg.image_size, default_size=entry.input_size[-1],
                           family=entry.family, data=data)
    num_classes = cfg.num_classes or bundle.num_classes
    if num_classes != bundle.num_classes:
        raise CompressError(f"--num-classes {num_classes} but the data has {bundle.num_classes} classes")
    c = bundle.input_size[0]
    mean, std = _normalisation(cfg, bundle, c)
    if len(mean) != c or len(std) != c:
        raise CompressError(f"--mean/--std need {c} values (one per channel)")
    precision = resolve_precision(cfg.mixed_precision, cfg.channels_last)
    cfg = precision.apply(cfg)
    accelerator = make_accelerator(cfg)
    accelerator.print(precision.describe())
    model_kwargs = with_auto_stem(entry.builder, cfg.model_kwargs, bundle.input_size)
    if model_kwargs.get("stem") != cfg.model_kwargs.get("stem"):
        accelerator.print(f"stem: {model_kwargs['stem']} for {bundle.input_size[-1]} px images (default: cifar up "
                          f"to {CIFAR_STEM_MAX_PX} px, else imagenet; --option stem=imagenet|cifar)")
    check_trains_at(entry.name, model_kwargs, num_classes, bundle.input_size)
    torch.manual_seed(stable_seed(cfg.seed, "init", entry.name))
    model = create_model(entry.name, num_classes=num_classes, in_chans=c, **model_kwargs)
    if cfg.init:
        state, init_meta = read_checkpoint(cfg.init)
        load_state_strict(model, state, entry.name, cfg.init)
    splits = prepare_splits(cfg, bundle)
    work = out.with_name(out.name + ".train-state")
    work.mkdir(exist_ok=True)
    train_loader, eval_loader = _loaders(cfg, splits, stable_seed(cfg.seed, "data"))
    progress = Progress(enabled=accelerator.is_main_process and show_progress)
    progress.start_stage(entry.name, cfg.epochs, 0, len(splits.train))
    try:
        result = fit(accelerator, model, [], train_loader, eval_loader, cfg=cfg, loss_cfg=LossSettings(),
                     epochs=cfg.epochs, mean=mean, std=std, stage_seed=stable_seed(cfg.seed, entry.name),
                     stage_dir=work, stage_label=entry.name, resume=resume, progress=progress,
                     eval_split=splits.eval_name)
    finally:
        progress.close()
    test = result.final if splits.eval_name == "test" else _test_metrics(accelerator, result.model, splits, cfg, mean, std)
    metrics = {**accuracy_fields(test, result.best_top1, splits.eval_name),
               "epochs": cfg.epochs, "train_seconds": round(result.seconds, 1), "data": bundle.name,
               **_data_metrics(bundle)}
    if accelerator.is_main_process:
        meta = meta_for(entry.name, num_classes=num_classes, in_chans=c, mean=mean, std=std,
                        class_names=bundle.class_names, model_kwargs=model_kwargs, input_size=bundle.input_size,
                        metrics=metrics, source=f"compress train on {bundle.name}")
        save_checkpoint(out, result.model, meta)
        shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()
    return metrics


def _data_metrics(bundle: DataBundle) -> dict:
    """What the checkpoint records about the data it was trained on (``augment`` also
    picks the evaluation crop of ``compress eval``, torch and ONNX alike)."""
    out = {"augment": bundle.augment, "image_size": list(bundle.input_size[1:]), "data_mode": bundle.mode}
    if bundle.skipped:
        out["skipped_images"] = bundle.skipped
    return out


# ---------------------------------------------------------------- distill
def _resolve_target(cfg: DistillConfig, tmeta) -> str:
    if cfg.target:
        return get_entry(cfg.target).name
    family = cfg.target_family or get_entry(tmeta.arch).family
    arch, measured = pick_student_by_latency(family, cfg.target_latency_ms, tmeta.arch, tmeta.num_classes,
                                             cfg.model_kwargs, input_size=tmeta.input_size,
                                             teacher_kwargs=tmeta.model_kwargs)
    listing = ", ".join(f"{n} {ms:.3f} ms" for n, ms in measured)
    print(f"target latency {cfg.target_latency_ms} ms: picked {arch}, the largest {family} model "
          f"that fits (onnxruntime batch-1 on this machine: {listing})")
    return arch


def check_trains_at(arch: str, model_kwargs: dict, num_classes: int, input_size) -> None:
    """Build ``arch`` on the meta device (shapes only) and run a batch of 2 at the training size.

    A model whose head is sized for another input (the plain CNNs flatten a 32-px map)
    then fails here with one line, before anything trains, instead of at its first step.
    """
    from .models.user import check_output

    c, h, w = (int(v) for v in input_size)
    with torch.device("meta"):
        model = create_model(arch, num_classes=num_classes, in_chans=c, **model_kwargs)
    check_output(model, arch, (c, h, w), num_classes,
                 fix=f"the data is {h}x{w} px: train at the size the model takes (--image-size), pass its size "
                     f"option if it has one (plain CNNs: --option input_hw={h}), or pick another model")


def _guide_cache_opener(cfg: DistillConfig, accelerator, splits: Splits, num_classes: int, mean, std):
    """``open(guides, epochs, steps)`` -> one logit cache per guide, when ``cache_guides`` is on
    (single process only; else ``None``).

    The key's inputs that do not change between stages -- the settings, with a fingerprint of
    the whole training split, and each guide's weight fingerprint (the teacher guides every
    stage) -- are computed once per run, at the first stage that needs them.
    """
    if not cfg.cache_guides:
        return None
    if accelerator.num_processes > 1:
        accelerator.print("note: --cache-guides is off with several processes (each sees other batches)")
        return None
    from .guides import cache_settings, open_guide_cache, weights_fingerprint
    from .latency import cache_dir

    settings: dict = {}
    fingerprints: dict[int, str] = {}

    def open_caches(guides, epochs: int, steps: int):
        if not guides:
            return None
        if not settings:
            settings.update(cache_settings(cfg, splits.train, splits.bundle.input_size, mean, std, num_classes))
        for g in guides:
            if id(g) not in fingerprints:
                fingerprints[id(g)] = weights_fingerprint(g)
        return [open_guide_cache(cache_dir() / "guides", g, settings, epochs=epochs, steps=steps,
                                 batch_size=cfg.batch_size, num_classes=num_classes, fingerprint=fingerprints[id(g)])
                for g in guides]

    return open_caches


def default_run_dir(cfg: DistillConfig, target: str) -> Path:
    name = cfg.name or f"{Path(cfg.teacher).stem}-to-{arch_slug(target)}-{cfg.method}"
    return Path("runs") / name


def _read_run_file(path: Path):
    """A JSON/YAML file an earlier session of the run wrote; damage is reported, not a traceback."""
    try:
        return yaml.safe_load(path.read_text()) if path.suffix == ".yaml" else json.loads(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CompressError(f"{path} is damaged ({reason}); delete it and resume again, "
                            f"or start a new run with another --out") from None


def _test_pause(point: str) -> None:
    """Test hook: with ``COMPRESS_TEST_PAUSE_AT=<point>`` the run sleeps here, so a test can kill
    it at a known point (tests/test_resume.py). Points: ``report`` -- the student and
    summary.json are written, report.md, the plots and the runs/latest link are not yet."""
    if os.environ.get("COMPRESS_TEST_PAUSE_AT") == point:
        print(f"test hook: paused at {point}", flush=True)
        time.sleep(600)


def _check_resume_config(run_dir: Path, resolved: dict) -> None:
    path = run_dir / "config.yaml"
    if not path.exists():
        return
    old = _read_run_file(path) or {}
    if not isinstance(old, dict):
        raise CompressError(f"{path} is damaged (not a mapping); start a new run with another --out")
    if isinstance(old.get("augment"), bool):  # written before augmentation policies: true = cifar
        old["augment"] = "cifar" if old["augment"] else "none"
    # A key an older version did not write counts as its default (num_processes: unknown, not compared).
    defaults = {**config_to_dict(DistillConfig()), "num_processes": resolved.get("num_processes")}
    old = {**{k: defaults[k] for k in defaults if k not in old}, **old}
    diffs = [f"{k}: {old.get(k)!r} -> {resolved.get(k)!r}" for k in sorted(set(old) | set(resolved))
             if k not in RESUME_IGNORED_KEYS and old.get(k) != resolved.get(k)]
    if diffs:
        raise CompressError(f"{run_dir} was started with a different config ({'; '.join(diffs)}); "
                            f"resume with the same flags, or start a new run with another --out")


def run_distillation(cfg: DistillConfig, *, resume: bool = False, command: str | None = None,
                     show_progress: bool = True, data: DataBundle | None = None) -> dict:
    """Plan the chain and train every assistant, then the student. Returns the summary.

    ``data`` replaces ``cfg.data`` with an in-memory bundle (notebooks, tests).
    """
    teacher, tmeta = load_model(cfg.teacher, trust_code=cfg.trust_code)
    teacher_sha256 = file_sha256(cfg.teacher)
    # The size the teacher was trained at, unless --image-size says otherwise.
    bundle = load_run_data(cfg, image_size=cfg.image_size or tuple(int(v) for v in tmeta.input_size[1:]),
                           channels=tmeta.in_chans, family=get_entry(tmeta.arch).family, data=data)
    _check_data_fits(tmeta, bundle, "teacher", ignore_class_names=cfg.ignore_class_names)
    target = _resolve_target(cfg, tmeta)
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg, target)
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise CompressError(f"run directory {run_dir} already exists; continue it with --resume "
                            f"or choose a new one with --out/--name")
    if resume and not (run_dir / "config.yaml").exists():
        raise CompressError(f"nothing to resume in {run_dir} (no config.yaml); drop --resume to start it")
    _check_run_dir_writable(run_dir)
    requested = config_to_dict(cfg)  # as given (e.g. mixed_precision auto); what it resolved to is "precision"
    precision = resolve_precision(cfg.mixed_precision, cfg.channels_last)
    cfg = precision.apply(cfg)
    accelerator = make_accelerator(cfg, project_dir=str(run_dir))
    # The process count is part of the config: it changes the batches (refused on resume).
    resolved = {**requested, "target": target, "num_processes": accelerator.num_processes,
                "precision": precision.to_dict()}
    if resume:
        _check_resume_config(run_dir, resolved)
    accelerator.wait_for_everyone()  # every process has checked the run directory before anything is written
    main = accelerator.is_main_process
    print_ = accelerator.print
    epochs, assistant_epochs = cfg.epochs, cfg.assistant_epochs or cfg.epochs
    plan_path = run_dir / "plan.json"
    if resume and plan_path.exists():
        try:
            plan = Plan.from_dict(_read_run_file(plan_path))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CompressError(f"{plan_path} is damaged ({type(exc).__name__}: {exc}); delete it and "
                                f"resume again to plan anew") from None
    else:
        plan = plan_chain(tmeta.arch, tmeta.num_classes, target, teacher_kwargs=tmeta.model_kwargs,
                          assistants=cfg.assistants, by=cfg.by, max_assistants=cfg.max_assistants,
                          spacing=cfg.spacing, method=cfg.method, model_kwargs=cfg.model_kwargs,
                          latency_backend=cfg.latency_backend, drop_guides=cfg.drop_guides,
                          epochs=epochs, assistant_epochs=assistant_epochs, input_size=tmeta.input_size)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_yaml(run_dir / "config.yaml", resolved)
        write_json(plan_path, plan.to_dict())
    accelerator.wait_for_everyone()
    print_(f"run directory: {run_dir}")
    print_(precision.describe())
    if accelerator.num_processes > 1:
        print_(f"data parallel: a world of {accelerator.num_processes} processes "
               f"({accelerator.distributed_type.value}); each step takes {cfg.batch_size} images per process")
    print_(format_plan(plan))
    if cfg.log_with:
        accelerator.init_trackers(run_dir.name, config={k: v for k, v in resolved.items()
                                                        if isinstance(v, (int, float, str, bool))})

    mean, std = list(tmeta.mean), list(tmeta.std)
    splits = prepare_splits(cfg, bundle)
    loss_cfg = LossSettings(temperature=cfg.temperature, kd_weight=cfg.kd_weight, drop_guides=cfg.drop_guides,
                            kd_reduction=cfg.kd_reduction)
    teacher_eval_path = run_dir / "teacher_eval.json"
    if teacher_eval_path.exists():
        teacher_test = _read_run_file(teacher_eval_path)
    else:
        teacher_test = _test_metrics(accelerator, teacher, splits, cfg, mean, std)
        if main:
            write_json(teacher_eval_path, teacher_test)
    print_(f"teacher {tmeta.arch}: test top-1 {teacher_test['top1']:.2f}% on {bundle.name} "
           f"(sha256 {teacher_sha256[:16]}, {tmeta.source or 'source not recorded'})")

    chain_models = [teacher]
    rows = [{**plan.teacher.__dict__, **accuracy_fields(teacher_test, None, splits.eval_name),
             "train_seconds": None, "stage_dir": None}]
    progress = Progress(enabled=main and show_progress)
    total_start = time.perf_counter()
    trained = plan.members[1:]
    for member in trained:  # every model of the chain takes the data's size, before the first stage trains
        check_trains_at(member.arch, member.model_kwargs, tmeta.num_classes, splits.bundle.input_size)
    open_guide_caches = _guide_cache_opener(cfg, accelerator, splits, tmeta.num_classes, mean, std)
    for k, member in enumerate(trained):
        label = f"stage {k + 1}/{len(trained)} {member.arch}"
        stage_dir = run_dir / "stages" / f"{k + 1}-{arch_slug(member.arch)}"
        model_path = stage_dir / "model.safetensors"
        guide_idx = guides_for_stage(plan.method, k)
        guide_names = [plan.members[i].arch for i in guide_idx]
        stage_epochs = epochs if member.role == "student" else assistant_epochs
        if model_path.exists():
            try:
                # the run's own plan names the code of a user-model stage
                model, smeta = load_model(model_path, arch=member.arch if is_user_ref(member.arch) else None)
            except CompressError as exc:
                raise CompressError(f"{label}: its finished model does not load ({exc}); delete it to retrain "
                                    f"the stage and resume again: rm {model_path}") from None
            if main:  # a crash between saving the model and removing the state leaves it behind
                for leftover in ("state", "state.old", "state.tmp"):
                    shutil.rmtree(stage_dir / leftover, ignore_errors=True)
            m = smeta.metrics
            print_(f"{label}: finished earlier (final test top-1 {m.get('final_test_top1', float('nan')):.2f}%), "
                   f"not retrained")
            fields = {k: m.get(k) for k in ("final_test_top1", "final_test_top5", "final_test_loss",
                                            "per_epoch_split", "best_val_top1", "best_test_top1")}
            seconds = m.get("train_seconds")
        else:
            if main:
                stage_dir.mkdir(parents=True, exist_ok=True)
            accelerator.wait_for_everyone()
            print_(f"{label}: guides {', '.join(guide_names) or 'none (cross-entropy only)'}, {stage_epochs} epochs")
            torch.manual_seed(stable_seed(cfg.seed, "init", member.arch))
            model = create_model(member.arch, num_classes=tmeta.num_classes, in_chans=tmeta.in_chans,
                                 **member.model_kwargs)
            # Data order and augmentation depend on the seed alone: every stage and every
            # method sees the same batches; the init depends on the model, not its position.
            train_loader, eval_loader = _loaders(cfg, splits, stable_seed(cfg.seed, "data"))
            progress.start_stage(label, stage_epochs, 0, len(splits.train))
            caches = open_guide_caches([chain_models[i] for i in guide_idx], stage_epochs,
                                       len(train_loader)) if open_guide_caches else None
            try:
                result = fit(accelerator, model, [chain_models[i] for i in guide_idx], train_loader, eval_loader,
                             cfg=cfg, loss_cfg=loss_cfg, epochs=stage_epochs, mean=mean, std=std,
                             stage_seed=stable_seed(cfg.seed, "stage", member.arch), stage_dir=stage_dir,
                             stage_label=label, resume=resume, progress=progress,
                             aug_seed=stable_seed(cfg.seed, "aug"), guide_caches=caches,
                             eval_split=splits.eval_name)
            finally:
                progress.close()
            model = result.model
            test = result.final if splits.eval_name == "test" else _test_metrics(
                accelerator, model, splits, cfg, mean, std)
            fields, seconds = accuracy_fields(test, result.best_top1, splits.eval_name), result.seconds
            metrics = {**fields, "epochs": stage_epochs,
                       "train_seconds": round(seconds, 1), "method": plan.method, "guides": guide_names,
                       "data": bundle.name, **_data_metrics(bundle)}
            if main:
                meta = meta_for(member.arch, num_classes=tmeta.num_classes, in_chans=tmeta.in_chans,
                                input_size=bundle.input_size, mean=mean, std=std,
                                class_names=bundle.class_names or tmeta.class_names,
                                model_kwargs=member.model_kwargs, metrics=metrics,
                                source=f"compress distill ({plan.method}) stage {k + 1} of {run_dir.name}")
                save_checkpoint(model_path, model, meta)
                for leftover in ("state", "state.old", "state.tmp"):
                    shutil.rmtree(stage_dir / leftover, ignore_errors=True)
            accelerator.wait_for_everyone()
            best_name = f"best_{splits.eval_name}_top1"
            print_(f"{label}: final test top-1 {fields['final_test_top1']:.2f}% "
                   f"(best {splits.eval_name} {fields[best_name]:.2f}%), {seconds:.0f} s")
        model = model.to(accelerator.device).eval()
        chain_models.append(model)
        rows.append({**member.__dict__, **fields, "train_seconds": seconds,
                     "stage_dir": str(Path("stages") / stage_dir.name)})

    summary = {
        "name": run_dir.name, "method": plan.method, "data": bundle.name, "per_epoch_split": splits.eval_name,
        "teacher": str(cfg.teacher), "teacher_sha256": teacher_sha256, "teacher_source": tmeta.source,
        "epochs": epochs, "assistant_epochs": assistant_epochs, "seed": cfg.seed,
        "temperature": cfg.temperature, "kd_weight": cfg.kd_weight, "kd_reduction": cfg.kd_reduction, "drop_guides": cfg.drop_guides,
        "latency_backend": plan.latency_backend, "relative_cost": plan.relative_cost,
        "total_seconds": round(sum(r["train_seconds"] or 0 for r in rows), 1),
        "wall_seconds_this_session": round(time.perf_counter() - total_start, 1),
        "precision": precision.to_dict(), "command": command or "", "chain": rows,
    }
    if main:
        shutil.copyfile(run_dir / "stages" / f"{len(trained)}-{arch_slug(plan.student.arch)}" / "model.safetensors",
                        run_dir / ".student.safetensors.tmp")
        os.replace(run_dir / ".student.safetensors.tmp", run_dir / "student.safetensors")
        write_json(run_dir / "summary.json", summary)
        _test_pause("report")
        write_report(run_dir)
        _link_latest(run_dir)
    if cfg.log_with:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    print_("")
    print_(format_summary(summary))
    print_(f"\nstudent: {run_dir / 'student.safetensors'}   report: {run_dir / 'report.md'}")
    return summary


__all__ = ["run_distillation", "train_model", "make_accelerator", "prepare_splits"]
