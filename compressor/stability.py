"""Rules that keep a short or unlucky distillation run from failing silently (issue 18).

Pure functions over numbers the pipeline has already measured; no extra training.

* :func:`guide_gate` -- an assistant whose final score is near chance teaches
  nothing but noise (the issue: a 13.2 % resnet14 assistant on 10 classes taught
  its student down to 1.33 %), and one far below the teacher teaches its student
  down towards itself. It is kept out of later guide sets unless it beats chance
  by ``max(2 points, half the teacher's lead over chance)``: with CIFAR-10 and an
  80 % teacher, an assistant needs more than 45 %. Why half (docs/results.md §6):
  in 3-epoch runs on 500-2,000 images the resnet14 assistant ends at 21-38 % under
  a 79.8 % teacher and DGKD's student trails KD's (teacher only) by 1.3-3.5 points
  at every temperature tried (3 paired seeds, 2 data sets); where the paper's
  chains train long enough the assistants sit a few points under the teacher
  (CPU study: well above half; the demo's 62 % under 80 %) and keep teaching.
* :func:`surpassed_guides` -- a guide (the teacher too) that a later, smaller model
  of the chain beats teaches the later stages nothing the better model does not: it
  is dropped from them (a teacher trained too briefly on the user's data is the
  common case). "Beats" means by more than the noise of the two scores
  (:func:`surpass_margin`: at least 2 points and 2 standard errors of their
  difference): the assistant is scored on the validation images (1,000 of them
  in the CPU study, a standard error of about 1.5 points), the teacher on the test
  split. With a fixed 2 points, a MobileNetV2-1.0 assistant 3.2 points over its
  65.2 % teacher on validation (1.0 on test) dropped the teacher and its student
  ended 1.7 points under the same student taught by both (docs/results.md §6).
* :func:`kd_warmup_for_stage` -- the KD warm-up a stage uses: the configured
  epochs, at most a quarter of the stage.
* :func:`student_warnings` -- a student within 2 points of chance, or whose loss
  exploded without turning NaN, gets a warning with the likely cause and the fix.
"""
from __future__ import annotations

import math

NEAR_CHANCE_POINTS = 2.0       # a model within this many points of chance learned nothing usable
GATE_SHARE_OF_TEACHER = 0.5    # ... and an assistant must beat chance by this share of the teacher's lead too
SURPASS_POINTS = 2.0           # a guide beaten by a later model of the chain by more than this stops teaching ...
SURPASS_STANDARD_ERRORS = 2.0  # ... and by more than this many standard errors of the difference of the two scores
MAX_KD_WARMUP_SHARE = 0.25     # the KD warm-up never takes more than this share of a stage
LOSS_GROWTH_LIMIT = 10.0       # final epoch's train loss over the first epoch's: exploded above this
LOGIT_LIMIT = 1e4              # |logit| above this: exploded


def chance_top1(num_classes: int) -> float:
    """Top-1 (%) of guessing: 100 / C."""
    return 100.0 / max(int(num_classes), 1)


def guide_gate(top1: float | None, *, num_classes: int, teacher_top1: float | None) -> dict:
    """``{"top1", "threshold", "chance", "kept", "reason"}`` for an assistant that scored ``top1`` (%).

    Kept when ``top1 > chance + max(2, 0.5·(teacher − chance))``; an unknown score is kept.
    ``reason`` (when dropped): ``near chance`` or ``far below the teacher``.
    """
    chance = chance_top1(num_classes)
    lead = max(0.0, (teacher_top1 if teacher_top1 is not None else chance) - chance)
    threshold = chance + max(NEAR_CHANCE_POINTS, GATE_SHARE_OF_TEACHER * lead)
    kept = top1 is None or (math.isfinite(top1) and top1 > threshold)
    reason = None
    if not kept:
        near = not math.isfinite(top1) or top1 <= chance + NEAR_CHANCE_POINTS
        reason = "near chance" if near else "far below the teacher"
    return {"top1": None if top1 is None else round(float(top1), 3), "threshold": round(threshold, 3),
            "chance": round(chance, 3), "kept": bool(kept), "reason": reason}


def surpass_margin(top1: float, images: int | None, other_top1: float, other_images: int | None) -> float:
    """Points by which a score of ``top1`` % (on ``images`` images) must exceed ``other_top1`` % (on
    ``other_images``) to count as better: ``max(SURPASS_POINTS, SURPASS_STANDARD_ERRORS * SE)``, SE
    the binomial standard error of the difference of two independent accuracies,
    ``100 * sqrt(p1 (1 - p1) / n1 + p2 (1 - p2) / n2)``. An unknown count adds no error. Where
    both were scored on the same images (no validation split) their difference is less noisy than
    this: the rule then errs towards keeping the guide.

    68.4 % on 1,000 images against 65.2 % on 3,000: SE 1.71, margin 3.42 points."""
    var = 0.0
    for score, n in ((top1, images), (other_top1, other_images)):
        if n:
            p = min(max(float(score) / 100.0, 0.0), 1.0)
            var += p * (1.0 - p) / int(n)
    return max(SURPASS_POINTS, SURPASS_STANDARD_ERRORS * 100.0 * math.sqrt(var))


def surpassed_guides(scores: dict[int, float | None], index: int, top1: float | None,
                     images: dict[int, int] | None = None) -> dict[int, float]:
    """``{j: margin}`` for the chain indices ``j < index`` whose score ``scores[j]`` the model at
    ``index`` (scoring ``top1``) beats by more than :func:`surpass_margin`: they stop guiding later
    stages. ``images`` maps chain indices (``index`` too) to the number of images their score was
    measured on; missing: the 2-point floor alone. Unknown scores: none."""
    if top1 is None or not math.isfinite(top1):
        return {}
    images = images or {}
    out = {}
    for j, s in sorted(scores.items()):
        if j < index and s is not None and math.isfinite(s):
            margin = surpass_margin(top1, images.get(index), s, images.get(j))
            if top1 > s + margin:
                out[j] = round(margin, 2)
    return out


def gate_text(gate: dict) -> str:
    """Why a guide stopped teaching, in words (console, report)."""
    reason = gate.get("reason") or "near chance"
    if reason == "near chance":
        return f"{gate['top1']:.1f}% is near chance {gate['chance']:.1f}% (needs more than {gate['threshold']:.1f}%)"
    if reason == "far below the teacher":
        return (f"{gate['top1']:.1f}% is far below the teacher (an assistant needs more than "
                f"{gate['threshold']:.1f}%: half the teacher's lead over chance)")
    margin = gate.get("margin", SURPASS_POINTS)
    return (f"{gate['by']} after it scored {gate['by_top1']:.1f}%, more than {margin:g} points above "
            f"its {gate['top1']:.1f}%")


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


__all__ = ["chance_top1", "guide_gate", "gated_guides", "surpass_margin", "surpassed_guides", "gate_text", "kd_warmup_for_stage", "student_warnings"]
