"""Rules that keep a short or unlucky distillation run from failing silently (issue 18).

Pure functions over numbers the pipeline has already measured; no extra training.

* :func:`guide_gate` -- an assistant whose final score is near chance teaches
  nothing but noise (the issue: a 13.2 % resnet14 assistant on 10 classes taught
  its student down to 1.33 %). It is kept out of later guide sets unless it beats
  chance by ``max(2 points, 10 % of the teacher's lead over chance)``: with
  CIFAR-10 and an 80 % teacher, an assistant needs more than 17 %.
* :func:`kd_warmup_for_stage` -- the KD warm-up a stage uses: the configured
  epochs, at most a quarter of the stage.
* :func:`student_warnings` -- a student within 2 points of chance, or whose loss
  exploded without turning NaN, gets a warning with the likely cause and the fix.
"""
from __future__ import annotations

import math

NEAR_CHANCE_POINTS = 2.0       # a model within this many points of chance learned nothing usable
GATE_SHARE_OF_TEACHER = 0.10   # ... and a guide must beat chance by this share of the teacher's lead too
MAX_KD_WARMUP_SHARE = 0.25     # the KD warm-up never takes more than this share of a stage
LOSS_GROWTH_LIMIT = 10.0       # final epoch's train loss over the first epoch's: exploded above this
LOGIT_LIMIT = 1e4              # |logit| above this: exploded


def chance_top1(num_classes: int) -> float:
    """Top-1 (%) of guessing: 100 / C."""
    return 100.0 / max(int(num_classes), 1)


def guide_gate(top1: float | None, *, num_classes: int, teacher_top1: float | None) -> dict:
    """``{"top1", "threshold", "chance", "kept"}`` for an assistant that scored ``top1`` (%).

    Kept when ``top1 > chance + max(2, 0.1·(teacher − chance))``; an unknown score is kept.
    """
    chance = chance_top1(num_classes)
    lead = max(0.0, (teacher_top1 if teacher_top1 is not None else chance) - chance)
    threshold = chance + max(NEAR_CHANCE_POINTS, GATE_SHARE_OF_TEACHER * lead)
    kept = top1 is None or (math.isfinite(top1) and top1 > threshold)
    return {"top1": None if top1 is None else round(float(top1), 3), "threshold": round(threshold, 3),
            "chance": round(chance, 3), "kept": bool(kept)}


def gated_guides(guide_idx: list[int], dropped: set[int]) -> list[int]:
    """``guide_idx`` without the ``dropped`` chain indices. A stage that had guides keeps at
    least one: when all are dropped (TAKD's single assistant), the nearest kept model
    before them (the teacher, index 0, is never dropped) takes their place."""
    kept = [i for i in guide_idx if i not in dropped]
    if kept or not guide_idx:
        return kept
    below = [i for i in range(min(guide_idx)) if i not in dropped]
    return [max(below)] if below else [0]


def kd_warmup_for_stage(kd_warmup_epochs: float, stage_epochs: int) -> float:
    """The KD warm-up (epochs) of a stage of ``stage_epochs``: at most a quarter of it."""
    return min(float(kd_warmup_epochs), MAX_KD_WARMUP_SHARE * float(stage_epochs))


def student_warnings(arch: str, *, top1: float, num_classes: int, train_losses: list[float],
                     max_abs_logit: float | None = None, steps: int | None = None,
                     method: str = "dgkd") -> list[str]:
    """One-line warnings (cause and fix) for a student that ended near chance or whose loss
    exploded; ``train_losses`` are the per-epoch mean training losses (first to last)."""
    out = []
    chance = chance_top1(num_classes)
    losses = [float(v) for v in train_losses if v is not None]
    exploded_by = None
    if len(losses) >= 2 and losses[0] > 0 and losses[-1] > LOSS_GROWTH_LIMIT * losses[0]:
        exploded_by = f"its training loss grew from {losses[0]:.3g} (epoch 1) to {losses[-1]:.3g}"
    elif max_abs_logit is not None and (not math.isfinite(max_abs_logit) or max_abs_logit > LOGIT_LIMIT):
        exploded_by = f"its logits reach {max_abs_logit:.3g} in magnitude"
    if exploded_by:
        out.append(f"student {arch}: the loss exploded ({exploded_by}) without turning NaN; likely cause: "
                   f"a learning rate too high for this model; fix: lower --lr (e.g. to a third) or set --grad-clip 5")
    if top1 <= chance + NEAR_CHANCE_POINTS:
        few = f" after {steps} steps" if steps is not None else ""
        cause = ("too few steps for the model to learn" + few
                 + (", or guides near chance" if method in ("dgkd", "takd") else ""))
        out.append(f"student {arch}: test top-1 {top1:.2f}% is within {NEAR_CHANCE_POINTS:g} points of chance "
                   f"({chance:.1f}%): it learned nothing usable; likely cause: {cause}; fix: train longer "
                   f"(--epochs), lower --lr" + (", or keep a CE term (--kd-weight 0.5)" if method != "ce" else
                                                 ", or start from pretrained weights (--init)"))
    return out


__all__ = ["chance_top1", "guide_gate", "gated_guides", "kd_warmup_for_stage", "student_warnings"]
