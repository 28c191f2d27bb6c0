"""Distillation losses as pure functions (no state, no config lookups).

Notation: ``z_s`` student logits, ``z_g`` a guide's logits, ``T`` temperature,
``λ`` (``kd_weight``) the weight of the distillation terms.

* :func:`kd_loss` -- Hinton et al. 2015:
  ``KD_g = T² · KL(softmax(z_g/T) ‖ softmax(z_s/T))``, averaged over the batch
  ("batchmean"). The official DGKD code divides additionally by the number of
  classes (``nn.KLDivLoss()`` default mean); we do not copy that quirk.
* :func:`dgkd_loss` -- DGKD (Son et al., ICCV 2021), the form of the official
  code: ``L = (1−λ)·CE(z_s, y) + λ·Σ_{g∈G'} KD_g`` with CE counted once and the
  KD terms *summed* over the kept guides G'. With no guide at all (plain
  training) the loss is ``CE``. With λ=1 (the paper's setting) this equals the
  paper's "sum of TAKD losses". ``reduction="mean"`` (``--kd-reduction mean``)
  averages the KD terms instead: λ·(1/|G'|)·Σ KD_g.
* :func:`with_unlabeled` -- unlabeled images (``--unlabeled``) in the step's loss, a mean
  over every image of the step: ``(B·L_labelled + U·λ_t·KD_unlabeled) / (B + U)``.
* :func:`kd_weight_at` -- KD warm-up: the weight λ_t used at a (fractional)
  epoch t ramps linearly from 0 to λ over the first ``warmup`` epochs,
  ``λ_t = λ·min(1, t/warmup)``, and the loss is ``(1−λ_t)·CE + λ_t·KD``: a
  student starts on the labels (its logits are random, the KD gradient of a
  random student is large) and the KD share grows as CE fades -- with λ=1 the
  loss is pure KD from the end of the warm-up on (mdistiller's DKD warms its
  KD weight up the same way over 20 of 240 epochs).
* :func:`kept_guides` -- stochastic teaching: drop ``drop`` guides per batch,
  uniformly, never all of them (a single guide is never dropped).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .config import KD_LOGITS, KD_REDUCTIONS, KD_WEIGHTINGS  # the choices the config validates

STANDARDIZE_EPS = 1e-7  # keeps a constant logit row (std 0) finite


def standardized(logits: torch.Tensor) -> torch.Tensor:
    """Every row z-scored: ``(z − mean(z)) / (std(z) + 1e-7)`` over the classes (std with Bessel's
    correction, as Sun et al. 2024's code: ``torch.std``)."""
    z = logits.float()
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + STANDARDIZE_EPS)


def kd_loss_per_sample(student_logits: torch.Tensor, guide_logits: torch.Tensor, *,
                       temperature: float, logits: str = "raw") -> torch.Tensor:
    """``T² · KL(softmax(z_g/T) ‖ softmax(z_s/T))`` of every sample: shape ``(B,)``.

    ``logits="standardized"`` z-scores both rows first (:func:`standardized`; Sun et al., "Logit
    Standardization in Knowledge Distillation", CVPR 2024): the student then has to match the guide's
    ranking and spacing of the classes, not the size of its logits, which a small or briefly trained
    student cannot reach (``raw``: the paper)."""
    if logits not in KD_LOGITS:
        raise ValueError(f"logits must be one of {KD_LOGITS}, got {logits!r}")
    t = float(temperature)
    z_s, z_g = student_logits.float(), guide_logits.float()
    if logits == "standardized":
        z_s, z_g = standardized(z_s), standardized(z_g)
    log_p_student = F.log_softmax(z_s / t, dim=1)
    log_p_guide = F.log_softmax(z_g / t, dim=1)
    kl = F.kl_div(log_p_student, log_p_guide, reduction="none", log_target=True).sum(dim=1)
    return kl * (t * t)


def kd_loss(student_logits: torch.Tensor, guide_logits: torch.Tensor, *, temperature: float,
            logits: str = "raw") -> torch.Tensor:
    """``T² · KL(softmax(z_g/T) ‖ softmax(z_s/T))`` averaged over the batch (``logits``: as
    :func:`kd_loss_per_sample`)."""
    return kd_loss_per_sample(student_logits, guide_logits, temperature=temperature, logits=logits).mean()


def guide_confidence(guide_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``softmax(z_g)[y]`` of every sample (T = 1, no gradient): how much the guide believes the label."""
    return F.softmax(guide_logits.detach().float(), dim=1).gather(1, labels.long().unsqueeze(1)).squeeze(1)


def guides_kd_loss(student_logits: torch.Tensor, guide_logits: Sequence[torch.Tensor], *, temperature: float,
                   reduction: str = "sum", logits: str = "raw") -> torch.Tensor:
    """The KD terms of the kept guides, before any weight: ``Σ_g KD_g`` or, with ``reduction="mean"``,
    ``(1/|G'|)·Σ_g KD_g`` (:func:`kd_loss` each); 0 without guides. An unlabeled batch's whole loss
    (no label, so no CE): the trainer weighs ``λ_t·`` this by the unlabeled share of the step's images."""
    _check_reduction(reduction)  # a bad reduction is refused even without guides
    if not guide_logits:
        return torch.zeros((), device=student_logits.device)
    return _reduce_kd(torch.stack([kd_loss(student_logits, g, temperature=temperature, logits=logits)
                                   for g in guide_logits]), reduction)


def _check_reduction(reduction: str) -> None:
    if reduction not in KD_REDUCTIONS:
        raise ValueError(f"reduction must be one of {KD_REDUCTIONS}, got {reduction!r}")


def _reduce_kd(terms: torch.Tensor, reduction: str) -> torch.Tensor:
    # callers check the reduction first (_check_reduction)
    return terms.sum(dim=0) if reduction == "sum" else terms.mean(dim=0)


def dgkd_loss(student_logits: torch.Tensor, guide_logits: Sequence[torch.Tensor], labels: torch.Tensor, *,
              temperature: float, kd_weight: float, reduction: str = "sum",
              label_smoothing: float = 0.0, weighting: str = "uniform",
              logits: str = "raw") -> dict[str, torch.Tensor]:
    """DGKD objective; returns named terms ``loss``, ``ce``, ``kd`` and ``kd_<i>`` per guide.

    ``guide_logits`` holds the logits of the guides kept for this batch (after
    stochastic dropping). ``kd`` is their summed KD term (0 without guides), or
    with ``reduction="mean"`` their average: then the KD gradient keeps the size
    of one guide's however many guides are kept. ``label_smoothing`` ε smooths the CE
    target: ``(1−ε)·onehot(y) + ε/C`` (``F.cross_entropy``'s definition).

    ``weighting="confidence"`` (:data:`KD_WEIGHTINGS`) weighs guide ``g``'s KD term on
    sample ``i`` by ``c_gi = softmax(z_g)[y_i]``, the probability the guide gives the
    label, and gives the label what the guides do not take:
    ``L_i = (1 − λ·c̄_i)·CE_i + λ·Σ_g c_gi·KD_gi`` (``mean``: ``(1/|G'|)·Σ_g``), ``c̄_i``
    the mean of ``c_gi`` over the kept guides. A guide teaches where it is right and
    sure, the label where it is not: an assistant no better than the student mostly
    hands its share back to the label. ``uniform`` (``c ≡ 1``) is the formula above.
    ``kd`` and ``kd_<i>`` are then the weighted terms (batch means). ``logits``: the KD terms' logits,
    ``raw`` or ``standardized`` (:func:`kd_loss_per_sample`).
    """
    if weighting not in KD_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {KD_WEIGHTINGS}, got {weighting!r}")
    _check_reduction(reduction)  # a bad reduction is refused even without guides
    ce_each = F.cross_entropy(student_logits.float(), labels, label_smoothing=float(label_smoothing),
                              reduction="none")
    ce = ce_each.mean()
    terms: dict[str, torch.Tensor] = {"ce": ce}
    if not guide_logits:
        terms["kd"] = torch.zeros((), device=ce.device)
        terms["loss"] = ce
        return terms
    kd_each = torch.stack([kd_loss_per_sample(student_logits, g, temperature=temperature, logits=logits)
                           for g in guide_logits])
    if weighting == "confidence":
        conf = torch.stack([guide_confidence(g, labels) for g in guide_logits])  # (G, B)
        kd_each = conf * kd_each
        ce_weight = 1.0 - kd_weight * conf.mean(dim=0)
    else:
        ce_weight = 1.0 - kd_weight
    for i in range(len(guide_logits)):
        terms[f"kd_{i}"] = kd_each[i].mean()
    kd_per_sample = _reduce_kd(kd_each, reduction)  # (B,): sum or mean over the kept guides
    terms["kd"] = kd_per_sample.mean()
    terms["loss"] = (ce_weight * ce_each + kd_weight * kd_per_sample).mean()
    return terms


def with_unlabeled(labelled_loss: torch.Tensor, kd_unlabeled: torch.Tensor, *, n_labelled: int, n_unlabeled: int,
                   kd_weight: float) -> torch.Tensor:
    """The step's loss over ``n_labelled`` labelled and ``n_unlabeled`` unlabeled images:
    ``(B·L_labelled + U·λ·KD_unlabeled) / (B + U)``, a mean over every image of the step, so the
    unlabeled images add terms, not step size. ``labelled_loss`` is :func:`dgkd_loss`'s ``loss``
    (a per-image mean), ``kd_unlabeled`` :func:`guides_kd_loss` on the unlabeled batch, ``kd_weight``
    the λ of this step (after the warm-up ramp). Adding ``λ·KD_unlabeled`` to the labelled loss
    instead doubles the KD push at one unlabeled image per labelled one, and cost the student
    points (docs/distillation.md)."""
    b, u = int(n_labelled), int(n_unlabeled)
    return (b * labelled_loss + u * float(kd_weight) * kd_unlabeled) / (b + u)


def kd_weight_at(kd_weight: float, epoch: float, warmup_epochs: float) -> float:
    """λ_t = λ·min(1, t/warmup) at fractional epoch ``t`` (``epoch + step/steps``);
    ``warmup_epochs <= 0`` means no warm-up (λ throughout)."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return float(kd_weight)
    return float(kd_weight) * max(0.0, float(epoch)) / float(warmup_epochs)


def kept_guides(num_guides: int, drop: int, generator: torch.Generator) -> list[int]:
    """Indices of the guides used for one batch under stochastic teaching.

    Drops ``min(drop, num_guides - 1)`` guides chosen uniformly without
    replacement, so at least one guide always remains; the kept indices are
    returned in ascending order. Draws from ``generator`` only when something
    is dropped, so runs with one guide consume no random numbers.
    """
    n_drop = min(max(int(drop), 0), max(num_guides - 1, 0))
    if n_drop == 0:
        return list(range(num_guides))
    perm = torch.randperm(num_guides, generator=generator).tolist()
    return sorted(perm[n_drop:])
