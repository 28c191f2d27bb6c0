"""Per-family training defaults: the settings a field left unset (``None``) trains with.

``optimizer``, ``lr``, ``schedule``, ``warmup_epochs``, ``weight_decay``,
``label_smoothing`` and ``grad_clip`` default to ``None`` in :class:`~compressor.config.OptimConfig`,
meaning "the model family's default". :func:`resolve_training_defaults` fills
them from :data:`FAMILY_DEFAULTS` (a flag or a recipe key always wins) and
returns a record of what it chose; ``compress train`` prints it and stores it
in the checkpoint, ``compress distill`` prints and records it in
``config.yaml`` under ``training_defaults``, per stage: every model of a chain
trains with its own family's settings (the KD terms do not depend on them).

Sources (lr scaled with the images per optimiser step, ``batch_size x grad_accum x
processes``: linearly for SGD with momentum 0.9, by the square root for AdamW):

* ``cifar_resnet``, ``wrn``, ``vgg``, ``plain_cnn`` -- the CIFAR recipes of He et
  al. 2016 / Zagoruyko & Komodakis 2016 / CRD (lr 0.1 per 128 images, wd 5e-4),
  with a cosine schedule and a short warm-up instead of the paper's steps.
* ``imagenet_resnet`` -- torchvision's classification reference (lr 0.1 per 256,
  wd 1e-4) with its newer recipe's cosine, warm-up and label smoothing 0.1.
* ``mobilenetv2``, ``mobilenetv3``, ``shufflenetv2``, ``regnety``, ``efficientnet``
  -- torchvision's references (MobileNetV2: wd 4e-5; MobileNetV3: wd 1e-5,
  RMSprop 0.064 per 1024; ShuffleNetV2: 0.5 per 1024, cosine, warm-up, label
  smoothing 0.1; RegNetY-400MF: 0.8 per 1024, wd 5e-5, label smoothing 0.1;
  EfficientNet: timm / EfficientNetV2 reference, wd 1e-5..2e-5) and timm
  (lr 0.1 per 256 for SGD), with a gradient-norm clip of 5 as a guard against a
  finite blow-up in these families (depthwise convolutions, squeeze-excitation,
  hard-swish; a timm MobileNetV3 at lr 0.1 ended at eval loss 753,708 without a
  NaN). Measured on one demo epoch (docs/results.md §5) the clip changed nothing;
  what kept those families at chance was stale BatchNorm statistics.
  These five families train with **AdamW** (:data:`ADAMW_LR` 6e-3 per 128 images
  x sqrt(images per step / 128), weight decay 0.05) and the schedule, warm-up,
  smoothing and clip above; ``--optimizer sgd`` gives them torchvision's SGD lr and
  weight decay. Why (issue 18; docs/results.md §5; demo, 1 epoch = 35 steps of
  128, seed 20, CPU): torchvision's SGD lr, 0.4 per 1024 images, is tuned for 1024
  images per step over hundreds of epochs; scaled linearly to 128 it is 0.05, and
  MobileNetV3-small-0.5 ends the epoch at 15.0 % (chance 10 %). A larger SGD lr
  helps but not enough: 0.14 (square-root scaling) 17.6 %, 0.2 20.0 %, 0.4 20.8 %
  (0.2 without warm-up and smoothing: 19.0 %); AdamW 3e-3 29.0 %, 6e-3 29.4 %.
  MobileNetV2-0.35: SGD 0.05 19.7 %, 0.14 20.6 %, AdamW 3e-3 19.5 %, 6e-3 22.3 %;
  ShuffleNetV2-0.5: SGD 0.0625 14.8 %, 0.18 23.2 %, AdamW 3e-3 16.7 %, 6e-3 20.7 %.
  RegNetY-400MF 25.6 %, EfficientNet-B0 22.0 % with AdamW 6e-3 (SGD 0.05: 12.3 %). Five epochs:
  MobileNetV3 SGD 0.05 29.7 %, AdamW 6e-3 45.4 %; MobileNetV2 38.3 % vs 41.3 %. The CIFAR-size
  ResNets, WRN, VGG, plain CNNs and the ImageNet ResNets learn with SGD at their
  recipes' lr (resnet8 24.5 %, resnet10 33.7 % after one epoch) and keep it.
* Anything else (user code, a family not listed) -- :data:`FALLBACK`: the
  cautious end of the above, with SGD (not measured with AdamW).

``batch_size`` unset (``None``, the default) is :func:`auto_batch_size`: 128 images per step
and process, halved (down to 16) until an epoch has at least :data:`AUTO_BATCH_MIN_STEPS`
optimiser steps. Why (issue 18; docs/results.md §6): on a small folder 128 gives a handful of
steps per epoch and a short run ends near chance. Quick matrix, 3 seeds, 3 epochs, ResNet-8
alone: 1,800 CIFAR-10 training images 26.2 % at 128 -> 33.8 % at 32; 900 28-px MNIST digits
31.3 % -> 48.7 % at 16; 450 images 20.6 % -> 25.5 % at 16; every student left chance after
epoch 1 (at 128 none did). From 4,096 training images on (the demo, CIFAR-10, ImageNet) it is 128.

A batch the auto rule shrank keeps the **lr of the 128-image batch** (``lr_batch_size`` in the
record): the smaller batch is there to give the run more steps, not smaller ones. Scaled down with
the batch (0.0125 for SGD, 2.1e-3 for AdamW at 16) the short runs stayed slow (2026-11-30, quick
data, 3 epochs, 2 seeds, test top-1): ResNet-8 on 900 MNIST digits 52.0 % at 0.0125, 70.4 % at
0.05, 73.2 % at 0.1; MobileNetV2-0.35 there 34.3 % at 2.1e-3, 52.0 % at 6e-3 (one epoch: 17.4 ->
23.2 %); on 450 CIFAR-10 images, where nothing learns much in 84 steps, ResNet-8 23.0 -> 20.2 % and
MobileNetV2-0.35 17.2 -> 15.9 % (within the 2-point spread of a 500-image test set). A batch set
by a flag or recipe scales the lr as above.

``epoch_repeats`` unset (``None``, the default) is :func:`auto_epoch_repeats`: one pass over the
training images per epoch from :data:`AUTO_EPOCH_MIN_IMAGES` (2,048) images on, and on a smaller set
as many passes as make an epoch at least that many images (450 images: 5 passes, 2,250 images; timm's
``--epoch-repeats``, chosen automatically). Epochs stay the unit of the schedule, the warm-ups and
the per-epoch score; a small set just gets more steps in each. Why (issue 18; docs/results.md §6):
with the batch already at 16, 450 images are 28 steps an epoch, and a MobileNetV2-0.35 trained alone
for 3 epochs ended at 20.0 % (chance 10 %), 13.2 % after epoch 1; four passes per epoch: 30.2 %, 18.6 %
after epoch 1 (seed 0, test split). 540 96-px photos, 12 classes: 18.3 -> 24.3 % (epoch 1: 12.0 ->
16.3 %). 900 MNIST digits, two passes: epoch 1 23.4 -> 35.6 %, epoch 2 55.2 -> 66.4 %.
``COMPRESS_EPOCH_MIN_IMAGES`` (environment) replaces the 2,048; 0 means one pass.

A model that starts from weights you have (``--init``, ``--init-student``, ``init_assistants``) trains at
:data:`FINETUNE_LR_FACTOR` (0.3) x the lr above, the rest of its family's settings unchanged (the line
says ``x 0.3 to fine-tune the weights it starts from``); weights that already solve the task (with
their own classifier, more than halfway from chance to 100 % on the validation split before training,
by two standard errors of that score)
train at :data:`SAME_TASK_LR_FACTOR` (0.1) x; a lr set by a flag or recipe is kept. Why:
timm and torchvision leave the fine-tuning lr to the user, and the from-scratch lr undid the weights
in a short run (numbers at :data:`FINETUNE_LR_FACTOR`).

``compress train`` makes teachers, so its label smoothing defaults to 0 for every family
(:data:`TEACHER_LABEL_SMOOTHING`; the line says ``no label smoothing (a teacher: ...)``, the record
``label_smoothing_rule``); the models of a distillation chain keep their family's.

The warm-up is at most a fifth of the run, so a 1-epoch run warms up over its
first 0.2 epoch and still anneals (the cosine steps every batch).

The paper recipes (``recipes/cifar*.yaml``, ``cpu_study.yaml``, ``imagenet_*.yaml``)
pin the paper's settings (``optimizer: sgd`` included), so nothing here changes them.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from .errors import CompressError

# Fields that default per family (None in OptimConfig = "family default").
DEFAULTED = ("optimizer", "lr", "schedule", "warmup_epochs", "weight_decay", "label_smoothing", "grad_clip")

# What a run written before these fields existed trained with (resume of an old run: a key
# its config.yaml lacks means this, not today's family default).
LEGACY = {"batch_size": 128, "epoch_repeats": 1, "kd_mixup": False, "optimizer": "sgd", "lr": 0.1, "schedule": "step", "warmup_epochs": 0.0, "weight_decay": 1e-4,
          "label_smoothing": 0.0, "grad_clip": 0.0}

MAX_WARMUP_SHARE = 0.2  # the warm-up never takes more than this share of the run's epochs

# batch_size unset: 128 per process, halved down to 16 while an epoch would have fewer steps than this
AUTO_BATCH_MAX, AUTO_BATCH_MIN, AUTO_BATCH_MIN_STEPS = 128, 16, 32
# epoch_repeats unset: passes over the training images per epoch, so that an epoch is at least this many images
# (the environment variable COMPRESS_EPOCH_MIN_IMAGES overrides it; 0: one pass. The test suite sets 0: its
# data sets are a few dozen images and its runs check behaviour, not accuracy)
AUTO_EPOCH_MIN_IMAGES = 2048
EPOCH_MIN_IMAGES_ENV = "COMPRESS_EPOCH_MIN_IMAGES"


# kd_mixup unset (distill): on below this many training images (the guides also label mixes of them).
# The same number as AUTO_EPOCH_MIN_IMAGES by measurement, not by definition: both were measured on
# 450-1,800 images and either bound may move on its own.
AUTO_MIXUP_MAX_IMAGES = 2048


def resolve_kd_mixup(cfg, train_images: int, *, in_memory: bool = True):
    """``(cfg with kd_mixup a bool, rule)`` for ``compress distill``, decided here only: an unset
    ``kd_mixup`` is on below :data:`AUTO_MIXUP_MAX_IMAGES` training images, off from there on
    (``rule`` "auto: ..."); a set one is kept (``rule`` "set"). Either way it is off, with the reason
    appended to ``rule``, where no mixes can be used: ``method: ce`` (no guides label them),
    ``--unlabeled`` (those images take their place) or a training split not held in memory
    (``in_memory`` false: a streamed set, whose pixels the pool would be mixed from).
    Why the bound (issue 18; docs/results.md §6, "KD variants at the short budget"): on 450-1,800
    images KD with the teacher alone ended 0-2.4 points under the student alone (3 epochs, 3 paired
    seeds, 5 cells, mean -1.28): a teacher trained on the same images has little to add to their
    labels; with the guides also labelling 4 mixes per training image the same runs ended 0.3-3.8
    points above it (mean +1.25). Larger sets were not measured (and the pool costs 4x the training
    images' memory)."""
    given = getattr(cfg, "kd_mixup", None)
    if given is not None:
        on, rule = bool(given), "set"
    else:
        on = int(train_images) < AUTO_MIXUP_MAX_IMAGES
        rule = (f"auto: on, {train_images} training images (fewer than {AUTO_MIXUP_MAX_IMAGES})" if on else
                f"auto: off, {train_images} training images (from {AUTO_MIXUP_MAX_IMAGES} on)")
    if on:
        unusable = ("method ce: no guides label mixes" if getattr(cfg, "method", None) == "ce" else
                    "the --unlabeled images take their place" if getattr(cfg, "unlabeled", None) else
                    "the training images are streamed, not held in memory (--data-mode memory)" if not in_memory
                    else None)
        if unusable:
            on, rule = False, f"{rule}; off: {unusable}"
    return dataclasses.replace(cfg, kd_mixup=on), rule


# temperature unset (distill): AUTO_T_SHORT, or AUTO_T_LONG where the student's stage sees at least
# AUTO_T_LONG_IMAGES training images (epochs x images per epoch) of at most AUTO_T_LONG_MAX_CLASSES classes.
AUTO_T_SHORT, AUTO_T_LONG = 2.0, 4.0
AUTO_T_LONG_IMAGES = 100_000
AUTO_T_LONG_MAX_CLASSES = 100


def resolve_temperature(cfg, images_seen: int, num_classes: int, *, unlabeled_seen: int = 0,
                        recorded_rule: str | None = None):
    """``(cfg with temperature a float, rule)`` for ``compress distill``, decided here only: a set
    ``temperature`` is kept (``rule`` "set"); an unset one is :data:`AUTO_T_LONG` (4) where the
    student's stage sees at least :data:`AUTO_T_LONG_IMAGES` training images of at most
    :data:`AUTO_T_LONG_MAX_CLASSES` classes, else :data:`AUTO_T_SHORT` (2). The images seen are
    ``images_seen`` (labelled: epochs x images per epoch, passes included) plus ``unlabeled_seen``
    (``--unlabeled`` images the stage takes beside them: every one is a KD term; the mixes of
    ``--kd-mixup`` are the same images again and are not counted).
    Why (issue 18; docs/results.md §6, "The temperature by budget"): in short runs a student
    cannot follow the teacher's softer targets: 3-epoch runs (about 11,000 images seen), 14
    cells, 3 paired seeds, DGKD more than 0.5 points under the student alone in 3 cells at T 5
    and 1 at T 2; ResNet-20 -> 8 on the demo set, 9 epochs (40,500 images seen), KD at T 2 and
    T 4 level. At the CPU study's budget (15 epochs on 10,000 CIFAR-10 images: 150,000 seen) the
    softer targets pay (ResNet-8 KD 67.67 % at T 4, alone 64.82 %; the T 2 and MobileNetV2 runs
    are in that section). With 10 % of CIFAR-10's labels (4,500 images, 15 epochs: 67,500 seen)
    and the other 45,000 as ``--unlabeled`` (67,500 more), T 4 beat T 2 on 3 of 3 paired seeds
    ("10 % labels plus unlabeled images at the CPU budget"). Above 100 classes nothing was
    measured, and ImageNet KD recipes use T 1 (torchdistill, mdistiller): those keep T 2.

    ``recorded_rule``: the ``temperature_rule`` of the run being resumed; an auto T it recorded is
    kept (a run resumed after this rule changed trains on at the T it started with)."""
    given = getattr(cfg, "temperature", None)
    if given is not None:
        return dataclasses.replace(cfg, temperature=float(given)), "set"
    seen = int(images_seen) + int(unlabeled_seen)
    long_run = seen >= AUTO_T_LONG_IMAGES and int(num_classes) <= AUTO_T_LONG_MAX_CLASSES
    t = AUTO_T_LONG if long_run else AUTO_T_SHORT
    counted = f"{seen:,} training images seen by the student's stage" + (
        f", {int(unlabeled_seen):,} of them unlabeled" if unlabeled_seen else "")
    if long_run:
        why = f"{counted} (from {AUTO_T_LONG_IMAGES:,} on)"
    elif seen >= AUTO_T_LONG_IMAGES:
        why = f"{num_classes} classes (T {AUTO_T_LONG:g} only up to {AUTO_T_LONG_MAX_CLASSES})"
    else:
        why = f"{counted} (fewer than {AUTO_T_LONG_IMAGES:,})"
    rule = f"auto: {t:g}, {why}"
    kept = _recorded_auto_temperature(recorded_rule)
    if kept is not None and kept != t:
        return (dataclasses.replace(cfg, temperature=kept),
                f"{recorded_rule.split('; kept from the run')[0]}; kept from the run (this version: T {t:g})")
    return dataclasses.replace(cfg, temperature=t), rule


def _recorded_auto_temperature(rule) -> float | None:
    """The T of a recorded ``temperature_rule`` that begins ``auto: T,``; None for any other."""
    if not isinstance(rule, str) or not rule.startswith("auto: "):
        return None
    try:
        return float(rule[len("auto: "):].split(",")[0])
    except ValueError:
        return None


def auto_batch_size(train_images: int, num_processes: int = 1, grad_accum: int = 1) -> int:
    """Images per step and process when ``batch_size`` is unset: :data:`AUTO_BATCH_MAX`, halved
    (not below :data:`AUTO_BATCH_MIN`) while one epoch of ``train_images`` would have fewer than
    :data:`AUTO_BATCH_MIN_STEPS` optimiser steps (``batch x grad_accum x processes`` images each)."""
    per_step = max(int(num_processes), 1) * max(int(grad_accum or 1), 1)
    batch = AUTO_BATCH_MAX
    while batch > AUTO_BATCH_MIN and int(train_images) < AUTO_BATCH_MIN_STEPS * batch * per_step:
        batch //= 2
    return batch


def epoch_min_images() -> int:
    """The images an auto epoch has at least: :data:`AUTO_EPOCH_MIN_IMAGES`, or the
    ``COMPRESS_EPOCH_MIN_IMAGES`` environment variable when set (0: one pass, always)."""
    raw = os.environ.get(EPOCH_MIN_IMAGES_ENV, "").strip()
    if not raw:
        return AUTO_EPOCH_MIN_IMAGES
    try:
        value = int(raw)
    except ValueError:
        raise CompressError(f"{EPOCH_MIN_IMAGES_ENV}={raw!r} is not a whole number; unset it (default "
                            f"{AUTO_EPOCH_MIN_IMAGES}) or set e.g. 0 for one pass per epoch") from None
    if value < 0:
        raise CompressError(f"{EPOCH_MIN_IMAGES_ENV} must be 0 or more, got {value}")
    return value


def auto_epoch_repeats(train_images: int, min_images: int | None = None) -> int:
    """Passes over the ``train_images`` per epoch when ``epoch_repeats`` is unset: the fewest
    that make an epoch at least ``min_images`` images (default :func:`epoch_min_images`;
    1 from that size on)."""
    floor = epoch_min_images() if min_images is None else int(min_images)
    return max(1, math.ceil(floor / max(int(train_images), 1)))


def resolve_batch_size(cfg, train_images: int, num_processes: int = 1):
    """``(cfg with batch_size and epoch_repeats filled, record)``: an unset ``batch_size`` becomes
    :func:`auto_batch_size`, an unset ``epoch_repeats`` :func:`auto_epoch_repeats`; the record
    (``{"batch_size", "batch_size_rule", "lr_batch_size", "epoch_repeats", "epoch_repeats_rule"}``)
    says which and why; ``lr_batch_size`` is the batch the default lr is scaled to
    (:func:`resolve_training_defaults`)."""
    repeats = getattr(cfg, "epoch_repeats", None)
    if repeats is not None:
        repeats_record = {"epoch_repeats": int(repeats), "epoch_repeats_rule": "set"}
    else:
        floor = epoch_min_images()
        repeats = auto_epoch_repeats(train_images, floor)
        repeats_record = {"epoch_repeats": repeats, "epoch_repeats_rule": (
            "auto: 1" if repeats == 1 else
            f"auto: {repeats}, so that an epoch of {train_images} training images is at least {floor} images")}
    if getattr(cfg, "batch_size", None) is not None:
        return dataclasses.replace(cfg, epoch_repeats=repeats), {
            "batch_size": int(cfg.batch_size), "batch_size_rule": "set", "lr_batch_size": int(cfg.batch_size),
            **repeats_record}
    batch = auto_batch_size(train_images, num_processes, getattr(cfg, "grad_accum", 1))
    rule = (f"auto: {AUTO_BATCH_MAX}" if batch == AUTO_BATCH_MAX else
            f"auto: {batch}, so that {train_images} training images make at least {AUTO_BATCH_MIN_STEPS} "
            f"steps per epoch")
    # a shrunk auto batch keeps the lr of the full one (module docstring)
    return dataclasses.replace(cfg, batch_size=batch, epoch_repeats=repeats), {
        "batch_size": batch, "batch_size_rule": rule, "lr_batch_size": AUTO_BATCH_MAX, **repeats_record}


@dataclass(frozen=True)
class FamilyDefaults:
    lr: float               # peak learning rate for ``per_images`` images per optimiser step
    per_images: int
    schedule: str
    warmup_epochs: float
    weight_decay: float
    label_smoothing: float
    grad_clip: float        # max global gradient norm; 0 = off
    source: str = ""
    optimizer: str = "sgd"  # sgd: lr/per_images/weight_decay above; adamw: the ADAMW_* settings below


# AdamW (the optimiser of the depthwise families, and of any model with --optimizer adamw): lr 6e-3
# for 128 images per step, scaled by the square root of the images per step (Malladi et al. 2022,
# the square-root rule for adaptive optimisers), weight decay 0.05 (decoupled).
ADAMW_LR, ADAMW_PER_IMAGES, ADAMW_WEIGHT_DECAY = 6e-3, 128, 0.05


# A model that starts from weights you have (--init, --init-student, an assistant's init) trains at this
# share of its family's default lr. Why (issue 18; docs/results.md §6, "Fine-tuning from weights you
# have"): the CIFAR-10 ResNet-20 fine-tuned on 96-px photos of the same classes, 3 epochs: lr 0.1 42.8 %,
# 0.03 50.7 %, 0.01 53.2 %; a CIFAR-10 ResNet-8 fine-tuned on 28-px digits (another domain): 0.1 95.9 %,
# 0.03 95.3 %, 0.01 90.7 %; the pretrained ResNet-20 on 500 CIFAR-10 images: 47.7 / 71.5 / 78.1 %;
# a MobileNetV2-0.35 (AdamW 6e-3 / 1.8e-3 / 6e-4) on the digits 95.3 / 94.6 / 88.0 %. 0.3x is the share
# that loses little where the weights know little and keeps most of the gain where they know much.
FINETUNE_LR_FACTOR = 0.3

# Weights that already solve the task fine-tune at SAME_TASK_LR_FACTOR: with their own classifier (the
# class count matches) they score more than SOLVES_TASK_SHARE of the way from chance to 100 % on the
# validation split before training, by two standard errors (score_lower_bound: a 50-image split said
# 54 % for weights that score 45 % on the test split). The pretrained ResNet-20 on 500 CIFAR-10 images
# (78-86 % on its 50 validation images before training) ended 3 epochs at 78.1 % with 0.1x and 71.5 %
# with 0.3x: the larger step undid what it knew. The other measured fine-tunes stay below the bar and
# keep 0.3x: the digits (14 %, near chance), the 96-px photos (the 32-px weights score 11.8 % at 96 px),
# the 15-epoch MobileNetV2-0.35 on CIFAR-10 (54 % of 50 images, at least 40 %; there 0.3x was the
# better one, 45.4 vs 43.1 %). The test split is never used for it: without a validation split
# (--val-fraction 0) the factor stays FINETUNE_LR_FACTOR.
SAME_TASK_LR_FACTOR = 0.1
SOLVES_TASK_SHARE = 0.5

# ``compress train`` makes teachers: its label smoothing defaults to this for every family (a flag or
# recipe still sets it). Why (issue 18; docs/results.md §6, "Label-smoothed teachers"): a smoothed
# teacher is the more accurate model and the worse teacher (Mueller et al. 2019). MobileNetV2-1.0 teachers
# trained alike but for the smoothing: on CIFAR-10 at 32 px (15 epochs on 5,000 images) the unsmoothed
# one scored 1.9 points less and its MobileNetV2-0.35 students gained 1.67 and 2.70 points more (2 seeds);
# on the 96-px photos (30 epochs on 10,000 images) it scored 2.3 points less (67.87 vs 70.13 %) and its
# students (15 epochs) gained 1.03, 1.60 and 2.73 points more: +1.99 over the student alone instead of
# +0.20 (3 paired seeds), the weakest matrix cell no longer the weakest. The models of a distillation
# chain keep their family's smoothing (assistants: no effect either way, 2 seeds).
TEACHER_LABEL_SMOOTHING = 0.0


def recorded_label_smoothing(metrics: dict | None) -> float:
    """The label smoothing a compress-trained checkpoint's metrics record (0 when they record none)."""
    record = (metrics or {}).get("training_defaults")
    value = record.get("label_smoothing") if isinstance(record, dict) else None
    return float(value) if isinstance(value, (int, float)) else 0.0


def solves_task_threshold(num_classes: int) -> float:
    """The top-1 (%) above which weights count as already solving a ``num_classes``-class task."""
    chance = 100.0 / num_classes
    return chance + SOLVES_TASK_SHARE * (100.0 - chance)


def score_lower_bound(top1: float, images: int, z: float = 2.0) -> float:
    """What a ``top1`` (%) measured on ``images`` images is at least: the Wilson score interval's lower
    end at ``z`` standard errors (unlike ``p - z SE`` it stays below 100 % for a perfect small sample)."""
    p, n = min(max(float(top1) / 100.0, 0.0), 1.0), max(int(images), 1)
    centre, spread = p + z * z / (2 * n), z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n))
    return 100.0 * (centre - spread) / (1.0 + z * z / n)

_CIFAR = dict(lr=0.1, per_images=128, schedule="cosine", warmup_epochs=1.0, weight_decay=5e-4,
              label_smoothing=0.0, grad_clip=0.0)

# The mobile families' torchvision references: lr 0.4 per 1024 images, cosine, 5 warm-up epochs, small
# weight decay, label smoothing; a gradient-norm clip guards their depthwise/SE layers. They default to
# AdamW (ADAMW_*: lr and weight decay); the SGD lr and weight decay here apply with --optimizer sgd.
_MOBILE = dict(lr=0.4, per_images=1024, schedule="cosine", warmup_epochs=5.0, weight_decay=4e-5,
               label_smoothing=0.1, grad_clip=5.0, optimizer="adamw")

FAMILY_DEFAULTS: dict[str, FamilyDefaults] = {
    "cifar_resnet": FamilyDefaults(**_CIFAR, source="He et al. 2016 CIFAR recipe"),
    "wrn": FamilyDefaults(**_CIFAR, source="Zagoruyko & Komodakis 2016"),
    "vgg": FamilyDefaults(**{**_CIFAR, "lr": 0.05}, source="CRD's VGG recipe (lr 0.05 per 128)"),
    "plain_cnn": FamilyDefaults(**{**_CIFAR, "lr": 0.05}, source="CIFAR recipe, halved lr"),
    "imagenet_resnet": FamilyDefaults(lr=0.1, per_images=256, schedule="cosine", warmup_epochs=5.0,
                                      weight_decay=1e-4, label_smoothing=0.1, grad_clip=0.0,
                                      source="torchvision reference (ResNet)"),
    "mobilenetv2": FamilyDefaults(**_MOBILE, source="torchvision reference (MobileNetV2) / timm"),
    "mobilenetv3": FamilyDefaults(**_MOBILE, source="torchvision reference (MobileNetV3) / timm"),
    "shufflenetv2": FamilyDefaults(**{**_MOBILE, "lr": 0.5}, source="torchvision reference (ShuffleNetV2)"),
    "regnety": FamilyDefaults(**{**_MOBILE, "lr": 0.8, "weight_decay": 5e-5},
                              source="torchvision reference (RegNetY-400MF)"),
    "efficientnet": FamilyDefaults(**{**_MOBILE, "weight_decay": 2e-5},
                                   source="torchvision EfficientNetV2 reference / timm"),
}

FALLBACK = FamilyDefaults(lr=0.4, per_images=1024, schedule="cosine", warmup_epochs=5.0, weight_decay=5e-5,
                          label_smoothing=0.1, grad_clip=5.0, source="cautious fallback (any other model)")


def family_defaults(family: str) -> tuple[str, FamilyDefaults]:
    """``(name shown, defaults)`` for a registry family; user code (``user:...``) and
    unknown families get :data:`FALLBACK`."""
    if family in FAMILY_DEFAULTS:
        return family, FAMILY_DEFAULTS[family]
    return ("your model" if str(family).startswith("user:") else str(family)), FALLBACK


def images_per_step(cfg, num_processes: int = 1, batch_size: int | None = None) -> int:
    # batch_size unset (resolve_batch_size not called: no data at hand): the auto size of a large set
    batch = batch_size or cfg.batch_size or AUTO_BATCH_MAX
    return int(batch) * int(getattr(cfg, "grad_accum", 1) or 1) * max(int(num_processes), 1)


def resolve_training_defaults(cfg, family: str, *, epochs: int | None = None, num_processes: int = 1,
                              lr_batch_size: int | None = None, from_weights: bool = False,
                              init_val: dict | None = None, num_classes: int | None = None,
                              teacher: bool = False):
    """``(cfg with every unset DEFAULTED field filled, record)``; ``cfg`` itself is not changed.

    ``epochs`` (default ``cfg.epochs``) caps the warm-up at :data:`MAX_WARMUP_SHARE` of
    the run. ``lr_batch_size`` (default ``cfg.batch_size``; :func:`resolve_batch_size`'s
    record has it) is the batch per process the default lr is scaled to. ``from_weights``:
    the model starts from weights you have (``--init``, ``--init-student``, an assistant's
    init), and the default lr is :data:`FINETUNE_LR_FACTOR` x the family's, or
    :data:`SAME_TASK_LR_FACTOR` x when ``init_val`` (``{"top1", "images"}``: those weights' score
    on the validation split before training, classifier kept) is above :func:`solves_task_threshold`
    of ``num_classes`` by two standard errors (:func:`score_lower_bound`). ``teacher``: the model
    is trained to teach (``compress train``): label smoothing :data:`TEACHER_LABEL_SMOOTHING`, whatever
    the family's (the record's ``label_smoothing_rule`` says so). The record says,
    per field, the value and whether it is the family's ``default`` or was ``set`` (flag,
    recipe or a resumed run's config).
    """
    name, fam = family_defaults(family)
    epochs = int(epochs if epochs is not None else cfg.epochs)
    batch = images_per_step(cfg, num_processes)
    lr_images = images_per_step(cfg, num_processes, lr_batch_size)
    optimizer = getattr(cfg, "optimizer", None) or fam.optimizer  # lr and wd follow the optimiser used
    if optimizer == "adamw":
        lr, wd = ADAMW_LR * math.sqrt(lr_images / ADAMW_PER_IMAGES), ADAMW_WEIGHT_DECAY
        lr_rule = f"{ADAMW_LR:g} per {ADAMW_PER_IMAGES} images x sqrt({lr_images}/{ADAMW_PER_IMAGES})"
    else:
        lr, wd = fam.lr * lr_images / fam.per_images, fam.weight_decay
        lr_rule = f"{fam.lr:g} per {fam.per_images} images x {lr_images}"
    if lr_images != batch:
        lr_rule += ", the lr of the full auto batch"
    if from_weights:  # fine-tuning: a smaller step keeps what the weights know (FINETUNE_LR_FACTOR)
        bar = solves_task_threshold(num_classes) if num_classes else None
        low = score_lower_bound(init_val["top1"], init_val["images"]) if init_val else None
        if low is not None and bar is not None and low > bar:
            lr *= SAME_TASK_LR_FACTOR
            lr_rule += (f", x {SAME_TASK_LR_FACTOR:g} to fine-tune weights that already score "
                        f"{init_val['top1']:.1f}% on {init_val['images']} validation images{_own_size(init_val)} "
                        f"(at least {low:.1f}% at two standard errors, above {bar:.1f}%)")
        else:
            lr *= FINETUNE_LR_FACTOR
            lr_rule += f", x {FINETUNE_LR_FACTOR:g} to fine-tune the weights it starts from"
    chosen = {
        "optimizer": optimizer,
        "lr": round(lr, 6),
        "schedule": fam.schedule,
        "warmup_epochs": round(min(fam.warmup_epochs, MAX_WARMUP_SHARE * epochs), 4),
        "weight_decay": wd,
        "label_smoothing": TEACHER_LABEL_SMOOTHING if teacher else fam.label_smoothing,
        "grad_clip": fam.grad_clip,
    }
    values, defaulted = {}, []
    for key in DEFAULTED:
        given = getattr(cfg, key, None)
        if given is None:
            values[key] = chosen[key]
            defaulted.append(key)
        else:
            values[key] = given
    record = {"family": name, "images_per_step": batch, "defaulted": defaulted, **values,
              "lr_rule": lr_rule, "source": fam.source}
    if teacher and "label_smoothing" in defaulted and fam.label_smoothing != TEACHER_LABEL_SMOOTHING:
        record["label_smoothing_rule"] = (f"a teacher: smoothed teachers teach less; the family's "
                                          f"{fam.label_smoothing:g}: --label-smoothing {fam.label_smoothing:g} "
                                          f"for a model you deploy as trained")
    if init_val:
        record["init_val_top1"] = round(float(init_val["top1"]), 3)
        record["init_val_images"] = int(init_val["images"])
        if init_val.get("resized"):
            record["init_val_px"] = init_val["px"]
    return dataclasses.replace(cfg, **values), record


def _own_size(score: dict) -> str:
    if not score.get("resized"):
        return ""
    px = score["px"]
    return f" resized to {px if isinstance(px, int) else 'x'.join(map(str, px))} px, the size they were trained at"


def init_score_text(score: dict) -> str:
    """What weights scored before training (:func:`compressor.pipeline.init_val_score`), in words."""
    size = _own_size(score)
    return f"score {score['top1']:.2f}% on the {score['images']} validation images{size}{',' if size else ''} before training"


def describe(record: dict, what: str | None = None) -> str:
    """One line, like the precision line: what the family defaults chose and how to change it."""
    d = set(record["defaulted"])
    head = f"training defaults for {what or record['family']}"
    parts = []
    rule = str(record.get("batch_size_rule", "set"))
    if rule.startswith("auto") and record.get("batch_size") != AUTO_BATCH_MAX:  # 128 is the usual: not named
        parts.append(f"batch {record['batch_size']} ({rule[len('auto: '):].split(', ', 1)[-1]})")
    if str(record.get("epoch_repeats_rule", "set")).startswith("auto") and record.get("epoch_repeats", 1) > 1:
        parts.append(f"{record['epoch_repeats']} passes over the data per epoch "
                     f"({record['epoch_repeats_rule'].split(', ', 1)[-1]})")
    if not d and not parts:
        return f"{head}: none used (every one set by a flag, a recipe or the resumed run)"
    if "optimizer" in d and record["optimizer"] != "sgd":  # SGD is the classic default: not named
        parts.append({"adamw": "AdamW"}.get(record["optimizer"], record["optimizer"]))
    if "lr" in d:
        parts.append(f"lr {record['lr']:g} ({record['lr_rule']})")
    if "schedule" in d:
        parts.append(record["schedule"])
    if "warmup_epochs" in d:
        w = record["warmup_epochs"]
        parts.append(f"warm-up {w:g} epoch{'s' if w != 1 else ''}" if w else "no warm-up")
    if "weight_decay" in d:
        parts.append(f"wd {record['weight_decay']:g}")
    if "label_smoothing" in d:
        ls = record["label_smoothing"]
        rule = record.get("label_smoothing_rule")
        parts.append((f"label smoothing {ls:g}" if ls else "no label smoothing")
                     + (f" ({rule})" if rule else ""))
    if "grad_clip" in d:
        gc = record["grad_clip"]
        parts.append(f"grad-norm clip {gc:g}" if gc else "no grad clip")
    return f"{head}: {', '.join(parts)} -- set any with a flag or recipe"


def inherit_recorded(cfg, recorded: dict):
    """For ``--resume``: every DEFAULTED field left unset takes what the run's ``config.yaml``
    recorded (a run written before the field existed: :data:`LEGACY`, what it trained with),
    so a resumed run keeps its settings. ``None`` recorded stays ``None`` (family default).
    ``temperature`` too: a run from before it became auto recorded the T it trained with."""
    values = {}
    for key in ("batch_size", "epoch_repeats", "kd_mixup", "temperature", *DEFAULTED):
        if hasattr(cfg, key) and getattr(cfg, key) is None:
            values[key] = recorded[key] if key in recorded else LEGACY.get(key)
    return dataclasses.replace(cfg, **values)


def keep_recorded_defaults(cfg, record: dict, recorded) -> tuple:
    """For ``--resume``: ``(cfg, record)`` where every field this version defaulted takes the value
    the run recorded when it too defaulted it (``recorded``: that model's ``training_defaults`` record
    in the run's ``config.yaml``), so a run resumed after an upgrade that changed a family default
    trains every later epoch and stage as it started. ``record["kept_from_run"]`` names the fields
    whose recorded value differs from this version's default (absent when none); a run written
    before the record existed (``recorded`` not a record) keeps this version's defaults."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("defaulted"), list):
        return cfg, record
    kept = {key: {"recorded": recorded[key], "default_now": record[key]} for key in record["defaulted"]
            if key in recorded["defaulted"] and key in recorded and recorded[key] != record[key]}
    if not kept:
        return cfg, record
    values = {key: v["recorded"] for key, v in kept.items()}
    record = {**record, **values, "kept_from_run": kept}
    for key in kept:  # a value's rule (lr_rule, label_smoothing_rule) follows the value kept
        if f"{key}_rule" in recorded:
            record[f"{key}_rule"] = recorded[f"{key}_rule"]
        else:
            record.pop(f"{key}_rule", None)
    return dataclasses.replace(cfg, **values), record


def kept_text(record: dict, what: str) -> str | None:
    """One line naming the defaults a resumed run kept from its record (:func:`keep_recorded_defaults`)."""
    kept = record.get("kept_from_run") or {}
    if not kept:
        return None

    def setting(key, value):
        return f"{key.replace('_', ' ')} {value:g}" if isinstance(value, float) else f"{key.replace('_', ' ')} {value}"

    then = ", ".join(setting(k, v["recorded"]) for k, v in kept.items())
    now = ", ".join(setting(k, v["default_now"]) for k, v in kept.items())
    return f"{what}: resumed with the {then} the run started with (this version's default: {now})"


__all__ = ["AUTO_BATCH_MAX", "AUTO_BATCH_MIN", "AUTO_BATCH_MIN_STEPS", "AUTO_EPOCH_MIN_IMAGES", "auto_batch_size",
           "auto_epoch_repeats", "resolve_batch_size", "AUTO_MIXUP_MAX_IMAGES", "resolve_kd_mixup",
           "AUTO_T_SHORT", "AUTO_T_LONG", "AUTO_T_LONG_IMAGES", "AUTO_T_LONG_MAX_CLASSES", "resolve_temperature",
           "ADAMW_LR", "ADAMW_PER_IMAGES", "ADAMW_WEIGHT_DECAY", "FINETUNE_LR_FACTOR", "SAME_TASK_LR_FACTOR",
           "SOLVES_TASK_SHARE", "TEACHER_LABEL_SMOOTHING", "recorded_label_smoothing", "solves_task_threshold", "score_lower_bound", "init_score_text", "DEFAULTED", "FAMILY_DEFAULTS", "FALLBACK", "LEGACY", "FamilyDefaults", "describe", "family_defaults",
           "inherit_recorded", "keep_recorded_defaults", "kept_text", "resolve_training_defaults"]
