import pytest

from compressor.errors import CompressError
from compressor.planning import auto_assistant_count, guides_for_stage, plan_chain, relative_training_cost


def names(plan):
    return [m.arch for m in plan.members]


def test_auto_count_rule():
    # fewest assistants so that neighbours differ by at most 2.5x: ceil(log r / log 2.5) - 1
    assert auto_assistant_count(2.0, 2.5) == 0
    assert auto_assistant_count(3.31, 2.5) == 1
    assert auto_assistant_count(10.25, 2.5) == 2
    assert auto_assistant_count(20.66, 2.5) == 3
    assert auto_assistant_count(6.25, 2.5) == 1  # exactly 2.5^2: one assistant suffices


@pytest.mark.parametrize("spacing,teacher,target,expected", [
    (2.5, "resnet20", "resnet8", ["resnet20", "resnet14", "resnet8"]),
    (2.5, "resnet56", "resnet8", ["resnet56", "resnet26", "resnet14", "resnet8"]),
    # ideal sizes 12.2M x 20.7^(i/4) = 26.0M, 55.6M, 119M -> resnet14, resnet26, resnet56
    (2.5, "resnet110", "resnet8", ["resnet110", "resnet56", "resnet26", "resnet14", "resnet8"]),
    # the default, 6x: none for 40.6M / 12.2M = 3.3x; one for 10.3x (sqrt(125.5M x 12.2M) = 39.2M)
    # and for 20.7x (sqrt(252.9M x 12.2M) = 55.6M); MobileNetV2 1.0 -> 0.35 at 32 px: 5.6x, none
    (None, "resnet20", "resnet8", ["resnet20", "resnet8"]),
    (None, "resnet56", "resnet8", ["resnet56", "resnet20", "resnet8"]),
    (None, "resnet110", "resnet8", ["resnet110", "resnet26", "resnet8"]),
    (None, "mobilenetv2_100", "mobilenetv2_035", ["mobilenetv2_100", "mobilenetv2_035"]),
])
def test_auto_plans(spacing, teacher, target, expected):
    kw = {} if spacing is None else {"spacing": spacing}
    stem = {"stem": "cifar"} if teacher.startswith("mobilenet") else {}  # 88.0M MACs, as the matrix's teacher
    plan = plan_chain(teacher, 10, target, measure_latency=False, input_size=(3, 32, 32), teacher_kwargs=stem, **kw)
    assert names(plan) == expected
    assert [m.role for m in plan.members] == ["teacher"] + ["assistant"] * (len(expected) - 2) + ["student"]
    if len(expected) == 2:  # says why a dgkd run has no assistant, and how to get one
        assert "no assistant: the teacher teaches the student directly (as --method kd)" in plan.rule


def test_max_assistants_caps_auto():
    plan = plan_chain("resnet110", 10, "resnet8", max_assistants=1, spacing=2.5, measure_latency=False)
    assert names(plan) == ["resnet110", "resnet26", "resnet8"]  # sqrt(252.9M x 12.2M) = 55.6M


def test_fixed_count_and_named_assistants():
    assert names(plan_chain("resnet56", 10, "resnet8", assistants="1", measure_latency=False)) == \
        ["resnet56", "resnet20", "resnet8"]  # sqrt(125.5M x 12.2M) = 39.2M
    plan = plan_chain("resnet56", 10, "resnet8", assistants="resnet14,resnet32", measure_latency=False)
    assert names(plan) == ["resnet56", "resnet32", "resnet14", "resnet8"]  # ordered largest first


def test_cross_family_assistants_come_from_student_family():
    plan = plan_chain("resnet110", 10, "wrn16_1", measure_latency=False)
    assert plan.members[0].arch == "resnet110"
    assert all(m.arch.startswith("wrn") for m in plan.members[1:])
    assert len(plan.assistants) >= 1


def test_kd_and_ce_have_no_assistants():
    for method in ("kd", "ce"):
        assert names(plan_chain("resnet56", 10, "resnet8", method=method, measure_latency=False)) == \
            ["resnet56", "resnet8"]


def test_plan_errors():
    with pytest.raises(CompressError, match="not smaller than the teacher"):
        plan_chain("resnet8", 10, "resnet20", measure_latency=False)
    with pytest.raises(CompressError, match="no room for 2 assistants"):
        plan_chain("resnet14", 10, "resnet8", assistants="2", measure_latency=False)
    with pytest.raises(CompressError, match="not between"):
        plan_chain("resnet56", 10, "resnet8", assistants="resnet110", measure_latency=False)
    with pytest.raises(CompressError, match="unknown model"):
        plan_chain("resnet56", 10, "resnet9", measure_latency=False)
    with pytest.raises(CompressError, match="cnn2 cannot take 3x224x224 inputs"):
        plan_chain("resnet18", 10, "cnn2", measure_latency=False)  # a fixed 32 px classifier


def test_guides_for_each_method_on_a_four_model_chain():
    # chain: 0 teacher, 1 A1, 2 A2, 3 student; trained stages 0..2 are A1, A2, student
    assert [guides_for_stage("dgkd", k) for k in range(3)] == [[0], [0, 1], [0, 1, 2]]
    assert [guides_for_stage("takd", k) for k in range(3)] == [[0], [1], [2]]
    assert guides_for_stage("kd", 0) == [0]
    assert guides_for_stage("ce", 0) == []


def test_relative_training_cost_pinned():
    # resnet20 -> resnet14 -> resnet8, MACs 40,551,040 / 26,395,264 / 12,239,488, drop 1:
    # stage A: 3*26,395,264 + 40,551,040 = 119,736,832
    # stage S: 3*12,239,488 + (40,551,040 + 26,395,264)/2 = 70,191,616
    # / (3*12,239,488) -> 189,928,448 / 36,718,464 = 5.1726
    plan = plan_chain("resnet20", 10, "resnet8", measure_latency=False, drop_guides=1, spacing=2.5)
    assert plan.relative_cost == pytest.approx(5.173, abs=1e-3)
    ce_cost = relative_training_cost(plan.members[-1:] and [plan.members[0], plan.members[-1]], "ce", 1, 1, 1)
    assert ce_cost == pytest.approx(1.0)


def test_plan_measures_torch_latency():
    plan = plan_chain("resnet20", 10, "resnet8")
    assert all(m.latency_ms and m.latency_ms > 0 for m in plan.members)
    assert plan.to_dict()["chain"][0]["arch"] == "resnet20"
