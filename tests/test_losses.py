"""Loss functions pinned to values worked out by hand on 2x3 logits.

Rows: student z_s = [1, 2, 3] and [0, 0, 0]; guide z_g = [3, 2, 1] and [0, 0, 0].
Row 2 has KL = 0 (identical). For row 1, softmax(z_g/T) and softmax(z_s/T) share
the normaliser (the logits are permutations), so log p_g - log p_s = (z_g - z_s)/T
= [2, 0, -2]/T and KL = (2/T)·(p0 - p2) with p = softmax(z_g/T).

T = 1: p = [e², e, 1]/(e² + e + 1) = [0.665241, 0.244728, 0.090031]
       KL_row1 = 2·(0.665241 - 0.090031) = 1.150420; batchmean = 0.575210; ·T² = 0.575210
T = 2: p = [e, e^½, 1]/(e + e^½ + 1) = [0.506480, 0.307196, 0.186324]
       KL_row1 = 1·(0.506480 - 0.186324) = 0.320156; batchmean = 0.160078; ·T² = 0.640312
CE with labels [2, 0]: row1 = log(e+e²+e³) - 3 = 0.407606; row2 = log 3 = 1.098612;
       mean = 0.753109
"""
import pytest
import torch

from compressor.losses import dgkd_loss, kd_loss, kept_guides

S = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
G = torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 0.0]])
Y = torch.tensor([2, 0])
CE = 0.753109
KD_T1 = 0.575210
KD_T2 = 0.640312


def test_kd_loss_hand_values():
    assert abs(kd_loss(S, G, temperature=1.0).item() - KD_T1) < 1e-5
    assert abs(kd_loss(S, G, temperature=2.0).item() - KD_T2) < 1e-5


def test_kd_loss_is_zero_when_student_equals_guide():
    z = torch.randn(4, 10)
    assert kd_loss(z, z.clone(), temperature=4.0).abs().item() < 1e-6


def test_kd_loss_t_squared_scaling():
    # KL at T=2 is 0.160078; the returned term is 4x that.
    kl = kd_loss(S, G, temperature=2.0).item() / 4.0
    assert abs(kl - 0.160078) < 1e-5


def test_kd_loss_gradient_flows_to_student_only():
    s = S.clone().requires_grad_(True)
    kd_loss(s, G, temperature=2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert s.grad[1].abs().sum() < 1e-7  # identical row: zero gradient


def test_dgkd_loss_sums_guides_and_counts_ce_once():
    terms = dgkd_loss(S, [G, S.clone()], Y, temperature=1.0, kd_weight=0.5)
    assert abs(terms["ce"].item() - CE) < 1e-5
    assert abs(terms["kd_0"].item() - KD_T1) < 1e-5
    assert abs(terms["kd_1"].item()) < 1e-6
    assert abs(terms["kd"].item() - KD_T1) < 1e-5
    assert abs(terms["loss"].item() - (0.5 * CE + 0.5 * KD_T1)) < 1e-5  # 0.664160


def test_dgkd_loss_two_equal_guides_double_the_kd_term():
    terms = dgkd_loss(S, [G, G], Y, temperature=2.0, kd_weight=1.0)
    assert abs(terms["loss"].item() - 2 * KD_T2) < 1e-5


def test_dgkd_loss_mean_reduction_averages_the_kept_guides():
    # KD_0 = KD_T1 (0.575210), KD_1 = 0 (guide = student): mean 0.287605; loss 0.5·CE + 0.5·0.287605 = 0.520357
    terms = dgkd_loss(S, [G, S.clone()], Y, temperature=1.0, kd_weight=0.5, reduction="mean")
    assert abs(terms["kd"].item() - 0.287605) < 1e-5
    assert abs(terms["loss"].item() - 0.520357) < 1e-5
    one = dgkd_loss(S, [G], Y, temperature=2.0, kd_weight=1.0, reduction="mean")
    two = dgkd_loss(S, [G, G], Y, temperature=2.0, kd_weight=1.0, reduction="mean")
    assert abs(one["loss"].item() - KD_T2) < 1e-5 and abs(two["loss"].item() - KD_T2) < 1e-5
    with pytest.raises(ValueError, match=r"reduction must be one of \('sum', 'mean'\)"):
        dgkd_loss(S, [G], Y, temperature=2.0, kd_weight=1.0, reduction="max")


def test_dgkd_loss_lambda_edges():
    assert abs(dgkd_loss(S, [G], Y, temperature=1.0, kd_weight=0.0)["loss"].item() - CE) < 1e-5
    assert abs(dgkd_loss(S, [G], Y, temperature=1.0, kd_weight=1.0)["loss"].item() - KD_T1) < 1e-5


def test_dgkd_loss_without_guides_is_cross_entropy():
    terms = dgkd_loss(S, [], Y, temperature=4.0, kd_weight=1.0)
    assert abs(terms["loss"].item() - CE) < 1e-5
    assert terms["kd"].item() == 0.0


def test_kept_guides_single_guide_never_dropped():
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    for _ in range(50):
        assert kept_guides(1, 1, gen) == [0]
    assert torch.equal(gen.get_state(), state)  # no random numbers consumed


def test_kept_guides_drop_one_of_n_uniformly():
    gen = torch.Generator().manual_seed(123)
    n, draws = 4, 4000
    dropped = [0] * n
    for _ in range(draws):
        kept = kept_guides(n, 1, gen)
        assert len(kept) == n - 1 and kept == sorted(kept) and len(set(kept)) == n - 1
        (missing,) = set(range(n)) - set(kept)
        dropped[missing] += 1
    for count in dropped:  # expected 1000 each; 4 sigma is about 110
        assert abs(count - draws / n) < 130, dropped


def test_kept_guides_never_drops_all_and_zero_drop_keeps_all():
    gen = torch.Generator().manual_seed(1)
    assert len(kept_guides(3, 5, gen)) == 1
    assert kept_guides(3, 0, gen) == [0, 1, 2]
    assert kept_guides(0, 1, gen) == []


def test_kept_guides_seeded_is_reproducible():
    a = [kept_guides(5, 2, torch.Generator().manual_seed(s)) for s in range(20)]
    b = [kept_guides(5, 2, torch.Generator().manual_seed(s)) for s in range(20)]
    assert a == b


def test_kd_reduction_is_a_checked_distill_setting():
    from compressor.config import DistillConfig, resolve_config
    from compressor.errors import CompressError

    base = {"teacher": "t.safetensors", "target": "resnet8"}
    # the default does not grow with the number of guides (issue 18); the paper recipes pin sum
    assert resolve_config(DistillConfig, None, base).kd_reduction == "mean"
    assert resolve_config(DistillConfig, None, {**base, "kd_reduction": "sum"}).kd_reduction == "sum"
    with pytest.raises(CompressError, match="kd_reduction must be one of sum, mean; got 'max'"):
        resolve_config(DistillConfig, None, {**base, "kd_reduction": "max"})


def test_kd_weight_warmup_ramps_lambda_and_fills_in_ce():
    # λ_t = λ·min(1, t/warmup): λ=1, warm-up 1 epoch, a quarter of the way in -> 0.25, and the
    # loss is 0.75·CE + 0.25·KD = 0.75·0.753109 + 0.25·0.575210 = 0.708634 (T = 1).
    from compressor.losses import kd_weight_at

    assert kd_weight_at(1.0, 0.0, 1.0) == 0.0 and kd_weight_at(1.0, 0.25, 1.0) == 0.25
    assert kd_weight_at(0.5, 0.5, 2.0) == 0.125 and kd_weight_at(1.0, 3.0, 1.0) == 1.0
    assert kd_weight_at(0.9, 0.0, 0.0) == 0.9  # no warm-up
    lam = kd_weight_at(1.0, 0.25, 1.0)
    t = dgkd_loss(S, [G], Y, temperature=1.0, kd_weight=lam)
    assert abs(t["loss"].item() - 0.708634) < 1e-5


def test_confidence_weighting_hand_values():
    """z_s = [0, 0], z_g = [ln 3, 0]: p_g = [0.75, 0.25], KL(p_g‖p_s) = 0.75 ln 1.5 + 0.25 ln 0.5 = 0.130812,
    CE = ln 2 = 0.693147; λ = 0.5, T = 1. Label 0: c = 0.75, L = (1 − 0.375)·CE + 0.375·KL = 0.482272;
    label 1: c = 0.25, L = 0.875·CE + 0.125·KL = 0.622856; uniform: 0.5·CE + 0.5·KL = 0.411980."""
    import math

    zs, zg = torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]])
    for label, want in ((0, 0.482272), (1, 0.622856)):
        t = dgkd_loss(zs, [zg], torch.tensor([label]), temperature=1.0, kd_weight=0.5, reduction="mean",
                      weighting="confidence")
        assert float(t["loss"]) == pytest.approx(want, abs=1e-5)
    uniform = dgkd_loss(zs, [zg], torch.tensor([0]), temperature=1.0, kd_weight=0.5, reduction="mean")
    assert float(uniform["loss"]) == pytest.approx(0.411980, abs=1e-5)
    # a guide that gives the label probability 1 teaches like the uniform rule; one that gives it 0 hands it back
    sure = dgkd_loss(zs, [torch.tensor([[50.0, 0.0]])], torch.tensor([0]), temperature=1.0, kd_weight=0.5,
                     reduction="mean", weighting="confidence")
    assert float(sure["loss"]) == pytest.approx(float(dgkd_loss(zs, [torch.tensor([[50.0, 0.0]])], torch.tensor([0]),
                                                               temperature=1.0, kd_weight=0.5, reduction="mean")["loss"]),
                                                abs=1e-5)
    wrong = dgkd_loss(zs, [torch.tensor([[0.0, 50.0]])], torch.tensor([0]), temperature=1.0, kd_weight=0.5,
                      reduction="mean", weighting="confidence")
    assert float(wrong["loss"]) == pytest.approx(math.log(2.0), abs=1e-5)
    with pytest.raises(ValueError, match="weighting"):
        dgkd_loss(zs, [zg], torch.tensor([0]), temperature=1.0, kd_weight=0.5, weighting="soft")


# Standardized logits (Sun et al. 2024): every row z-scored (Bessel std) before the temperature.
# z_s = [0, 0, 3]: mean 1, std sqrt(((-1)² + (-1)² + 2²) / 2) = sqrt(3) -> [-1, -1, 2] / sqrt(3)
#   = [-0.577350, -0.577350, 1.154701]; softmax = [0.130681, 0.130681, 0.738638]
# z_g = [1, 2, 3]: mean 2, std 1 -> [-1, 0, 1]; softmax = [0.090031, 0.244728, 0.665241]
# KL(p_g ‖ p_s) = 0.090031·ln(0.090031/0.130681) + 0.244728·ln(0.244728/0.130681)
#               + 0.665241·ln(0.665241/0.738638) = 0.050371 (T = 1)
# T = 2: softmax of the halves, KL · 4 = 0.070594
def test_standardized_kd_hand_values():
    s, g = torch.tensor([[0.0, 0.0, 3.0]]), torch.tensor([[1.0, 2.0, 3.0]])
    assert abs(kd_loss(s, g, temperature=1.0, logits="standardized").item() - 0.050371) < 1e-5
    assert abs(kd_loss(s, g, temperature=2.0, logits="standardized").item() - 0.070594) < 1e-5
    assert abs(kd_loss(s, g, temperature=1.0).item() - 0.050371) > 0.1  # raw logits differ here


def test_standardized_kd_ignores_the_guides_logit_scale_and_shift():
    # S and G rows have std 1 and 0, so standardizing leaves them as they are (row 2: 0/(0 + eps) = 0):
    # the T = 1 value is the raw one; a guide 5x larger and shifted by 7 teaches the same.
    assert abs(kd_loss(S, G, temperature=1.0, logits="standardized").item() - KD_T1) < 1e-5
    assert abs(kd_loss(S, 5 * G + 7, temperature=1.0, logits="standardized").item() - KD_T1) < 1e-5
    assert abs(kd_loss(S, 5 * G + 7, temperature=1.0).item() - KD_T1) > 0.5  # raw: 1.18
    with pytest.raises(ValueError, match="logits must be one of"):
        kd_loss(S, G, temperature=1.0, logits="zscore")


def test_dgkd_loss_passes_the_logits_choice_to_every_guide():
    raw = dgkd_loss(S, [5 * G, G], Y, temperature=1.0, kd_weight=0.5, reduction="mean")
    std = dgkd_loss(S, [5 * G, G], Y, temperature=1.0, kd_weight=0.5, reduction="mean", logits="standardized")
    assert abs(std["kd"].item() - KD_T1) < 1e-5 and abs(std["loss"].item() - (0.5 * CE + 0.5 * KD_T1)) < 1e-5
    assert raw["kd"].item() > KD_T1 + 0.25  # raw: the 5x guide's term is 1.18
