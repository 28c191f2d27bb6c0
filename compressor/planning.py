"""Teacher-assistant planning: which models go between the teacher and the student.

Rule for ``assistants="auto"`` (documented in docs/distillation.md): take the fewest
assistants such that no two neighbours in the chain differ by more than
``spacing`` (default :data:`~compressor.config.AUTO_SPACING`, 6x) in the chosen metric (MACs by default), i.e.
``n = ceil(log(M_teacher / M_student) / log(spacing)) - 1``, capped by
``max_assistants`` and by the number of candidates. The n assistants are
placed at the log-evenly spaced ideal sizes ``M_student · r^(i/(n+1))``
(r = M_teacher / M_student), each taken as the closest unused candidate in
log space.

Candidates, strictly between student and teacher in the metric:

* a zoo student: the members of the *student's* family (the teacher may be of
  any family: cross-family chains take assistants of the student's kind);
* a user-code student (``file.py:NAME``) with a ``LADDER``: its ladder sizes;
* a user-code student without one: the teacher's family (when the teacher is
  a zoo model); otherwise name assistants with ``--assistants``.

Every model is measured at the teacher's input size (the data's), and
models with a ``stem`` option get the stem that size calls for unless
``--option stem=...`` says otherwise (see :mod:`compressor.models.stems`).

With ``--method kd`` or ``ce`` there are no assistants.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from .config import AUTO_SPACING
from .errors import CompressError
from .models import family_ladder, get_entry
from .models.registry import profile_arch as _profile_arch
from .models.stems import CIFAR_STEM_MAX_PX, with_auto_stem
from .models.user import accepted_options, is_user_ref, user_ladder


@dataclass
class ChainMember:
    role: str                 # teacher | assistant | student
    arch: str
    params: int
    macs: int
    latency_ms: float | None = None
    model_kwargs: dict = field(default_factory=dict)


@dataclass
class Plan:
    members: list[ChainMember]
    method: str
    by: str
    latency_backend: str
    spacing: float
    rule: str
    relative_cost: float = 1.0
    latency_failed: dict = field(default_factory=dict)  # arch -> why its plan-table latency is missing

    @property
    def teacher(self) -> ChainMember:
        return self.members[0]

    @property
    def assistants(self) -> list[ChainMember]:
        return [m for m in self.members if m.role == "assistant"]

    @property
    def student(self) -> ChainMember:
        return self.members[-1]

    def to_dict(self) -> dict:
        return {"method": self.method, "by": self.by, "latency_backend": self.latency_backend,
                "spacing": self.spacing, "rule": self.rule, "relative_cost": self.relative_cost,
                "chain": [asdict(m) for m in self.members],
                **({"latency_failed": dict(self.latency_failed)} if self.latency_failed else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(members=[ChainMember(**m) for m in d["chain"]], method=d["method"], by=d["by"],
                   latency_backend=d["latency_backend"], spacing=d["spacing"], rule=d["rule"],
                   relative_cost=d.get("relative_cost", 1.0), latency_failed=dict(d.get("latency_failed") or {}))


def profile_arch(arch: str, num_classes: int, model_kwargs: dict | None = None,
                 input_size=None) -> tuple[int, int]:
    """(parameters, MACs) of ``arch`` built with these options, at ``input_size`` (default: its own)."""
    return _profile_arch(get_entry(arch).name, num_classes, json.dumps(model_kwargs or {}, sort_keys=True),
                         tuple(input_size) if input_size else None)


def chain_model_kwargs(arch: str, model_kwargs: dict, input_size=None) -> dict:
    """The options of ``model_kwargs`` the arch's builder accepts (e.g. ``shortcut`` for CIFAR ResNets),
    plus the stem ``input_size`` calls for when the builder has one and none is given."""
    import inspect

    entry = get_entry(arch)
    if entry.user_ref or entry.timm_name:  # timm models take any timm option (checked when built)
        kwargs = accepted_options(entry, model_kwargs)
    else:
        accepted = inspect.signature(entry.builder).parameters
        kwargs = {k: v for k, v in model_kwargs.items() if k in accepted}
    return with_auto_stem(entry.builder, kwargs, input_size or entry.input_size)


def member_label(arch: str, kwargs: dict) -> str:
    """How the plan table names a model: user code shows its options (ladder sizes differ only there)."""
    if not is_user_ref(arch):
        return arch
    shown = {k: v for k, v in kwargs.items() if k != "stem"}
    return f"{arch}({', '.join(f'{k}={v}' for k, v in shown.items())})" if shown else arch


def _candidates(teacher_entry, student_entry, student_kwargs: dict, model_kwargs: dict,
                input_size) -> tuple[list[tuple[str, str, dict]], str]:
    """(label, arch, kwargs) of every possible assistant, and where they come from (module docstring)."""
    if student_entry.user_ref:
        ladder = user_ladder(student_entry.name)
        if ladder:
            out = []
            for label, kw in ladder.items():
                kwargs = {**student_kwargs, **kw}
                if kwargs != student_kwargs:
                    out.append((f"{student_entry.name}[{label}]", student_entry.name, kwargs))
            return out, f"the LADDER of {student_entry.name}"
        if teacher_entry.user_ref or teacher_entry.timm_name:
            return [], ("no LADDER on the student and a user-code or timm teacher: name assistants with "
                        "--assistants")
        family = teacher_entry.family
        source = f"the teacher's family {family} ({student_entry.name} has no LADDER)"
    elif student_entry.timm_name:
        return [], "no ladder for a timm student: name assistants with --assistants (e.g. timm:NAME,...)"
    else:
        family = student_entry.family
        source = f"the student's family {family}"
    out = [(name, name, chain_model_kwargs(name, model_kwargs, input_size))
           for name in family_ladder(family) if name != student_entry.name]
    return out, source


def relative_training_cost(members: list[ChainMember], method: str, drop_guides: int,
                           epochs: int, assistant_epochs: int) -> float:
    """Compute of the whole chain relative to training the student alone (same epochs).

    Per image, training a model costs ~3x its forward MACs (forward + backward);
    each guide that runs costs 1x its MACs. Dropped guides do not run.
    """
    trained = members[1:]
    total = 0.0
    for k, m in enumerate(trained):
        n_guides = len(guides_for_stage(method, k))
        run = n_guides - min(drop_guides, max(n_guides - 1, 0))
        guide_macs = [members[i].macs for i in guides_for_stage(method, k)]
        mean_guide = sum(guide_macs) / n_guides if n_guides else 0.0
        ep = epochs if m.role == "student" else assistant_epochs
        total += ep * (3 * m.macs + run * mean_guide)
    return total / (epochs * 3 * members[-1].macs)


def guides_for_stage(method: str, stage: int) -> list[int]:
    """Chain indices (0 = teacher) guiding trained stage ``stage`` (0-based, chain index stage+1).

    dgkd: every model before it; takd: only the previous one; kd: the teacher; ce: none.
    """
    if method == "dgkd":
        return list(range(stage + 1))
    if method == "takd":
        return [stage]
    if method == "kd":
        return [0]
    if method == "ce":
        return []
    raise CompressError(f"unknown method {method!r}; use dgkd, takd, kd or ce")


def auto_assistant_count(ratio: float, spacing: float) -> int:
    if ratio <= spacing:
        return 0
    return max(0, math.ceil(math.log(ratio) / math.log(spacing) - 1e-9) - 1)


def pick_evenly(candidates: list[tuple[str, float]], low: float, high: float, n: int) -> list[str]:
    """``n`` candidates closest (log scale) to log-even points between low and high; largest first."""
    chosen: list[str] = []
    pool = list(candidates)
    for i in range(n, 0, -1):
        ideal = math.log(low) + (math.log(high) - math.log(low)) * i / (n + 1)
        best = min(pool, key=lambda c: abs(math.log(c[1]) - ideal))
        chosen.append(best[0])
        pool.remove(best)
    order = {name: value for name, value in candidates}
    return sorted(chosen, key=lambda name: -order[name])


def plan_chain(teacher_arch: str, num_classes: int, target: str, *, teacher_kwargs: dict | None = None,
               assistants: str = "auto", by: str = "macs", max_assistants: int = 4, spacing: float = AUTO_SPACING,
               method: str = "dgkd", model_kwargs: dict | None = None, latency_backend: str = "torch",
               measure_latency: bool = True, drop_guides: int = 1, epochs: int = 1,
               assistant_epochs: int | None = None, input_size=None) -> Plan:
    """Plan the chain teacher -> assistants -> student (see the module docstring).

    ``input_size`` (C, H, W): the images the chain sees (default: the teacher's default input size).
    """
    model_kwargs = dict(model_kwargs or {})
    teacher_entry, student_entry = get_entry(teacher_arch), get_entry(target)
    size = tuple(input_size) if input_size else teacher_entry.input_size
    if by == "latency":
        latency_backend = "onnxruntime"
    measure_latency = measure_latency and latency_backend != "none"

    def metric(arch: str, kwargs: dict) -> float:
        params, macs = profile_arch(arch, num_classes, kwargs, size)
        if by == "params":
            return float(params)
        if by == "latency":
            from .latency import latency_ms

            return latency_ms(arch, backend="onnxruntime", num_classes=num_classes, model_kwargs=kwargs,
                              input_size=size)
        return float(macs)

    t_kwargs = dict(teacher_kwargs or {})
    s_kwargs = chain_model_kwargs(student_entry.name, model_kwargs, size)
    m_teacher, m_student = metric(teacher_entry.name, t_kwargs), metric(student_entry.name, s_kwargs)
    s_label = member_label(student_entry.name, s_kwargs)
    if m_student >= m_teacher:
        raise CompressError(
            f"target {s_label} is not smaller than the teacher {teacher_entry.name} by {by} "
            f"({m_student:,.0f} vs {m_teacher:,.0f}); choose a smaller --target"
        )
    pool, source = ([], "") if method in ("kd", "ce") or str(assistants).strip() == "0" else \
        _candidates(teacher_entry, student_entry, s_kwargs, model_kwargs, size)
    candidates, spec = [], {}
    for label, arch, kwargs in pool:
        value = metric(arch, kwargs)
        if m_student < value < m_teacher:
            candidates.append((label, value))
            spec[label] = (arch, kwargs)

    if method in ("kd", "ce"):
        chosen: list[str] = []
        rule = f"method {method}: no assistants"
    elif assistants == "auto":
        n = min(auto_assistant_count(m_teacher / m_student, spacing), max_assistants, len(candidates))
        chosen = pick_evenly(candidates, m_student, m_teacher, n) if n else []
        rule = (f"auto: fewest assistants with at most {spacing:g}x {by} between neighbours "
                f"(ratio {m_teacher / m_student:.1f}x -> {n}, max {max_assistants}) from {source}")
        if method == "dgkd" and m_teacher / m_student <= spacing:  # why no assistant, and how to get one
            rule += ("; no assistant: the teacher teaches the student directly (as --method kd); "
                     "--assistants N or a smaller --spacing plans some")
    elif str(assistants).strip().isdigit():
        n = int(assistants)
        if n > len(candidates):
            names = ", ".join(c[0] for c in candidates) or "none"
            raise CompressError(
                f"no room for {n} assistants between {teacher_entry.name} and {s_label} in {source} "
                f"(candidates: {names}); ask for fewer with --assistants"
            )
        chosen = pick_evenly(candidates, m_student, m_teacher, n) if n else []
        rule = f"fixed count: {n} assistants spaced evenly by log {by}" + (f" from {source}" if n else "")
    else:
        names = [get_entry(a.strip()).name for a in str(assistants).split(",") if a.strip()]
        values = {}
        for name in names:
            kwargs = chain_model_kwargs(name, model_kwargs, size)
            v = metric(name, kwargs)
            if not m_student < v < m_teacher:
                raise CompressError(
                    f"assistant {name} ({by} {v:,.0f}) is not between the student {s_label} "
                    f"({m_student:,.0f}) and the teacher {teacher_entry.name} ({m_teacher:,.0f})"
                )
            values[name] = v
            spec[name] = (name, kwargs)
        if len(set(names)) != len(names):
            raise CompressError("an assistant is named twice in --assistants")
        chosen = sorted(names, key=lambda n_: -values[n_])
        rule = "named by the user (ordered largest first)"

    latency_failed = {}

    def member(role: str, arch: str, kwargs: dict) -> ChainMember:
        params, macs = profile_arch(arch, num_classes, kwargs, size)
        lat = None
        if measure_latency:
            from .latency import NoOnnxTimer, failure_text, latency_ms

            try:
                lat = round(latency_ms(arch, backend=latency_backend, num_classes=num_classes, model_kwargs=kwargs,
                                       input_size=size), 4)
            except NoOnnxTimer:
                raise
            except Exception as exc:  # a model that does not export leaves a gap in the table, not a failed plan
                if by == "latency":  # the plan needs the number
                    raise
                latency_failed[arch] = failure_text(exc)
        return ChainMember(role=role, arch=arch, params=params, macs=macs, latency_ms=lat, model_kwargs=kwargs)

    members = [member("teacher", teacher_entry.name, t_kwargs)]
    members += [member("assistant", *spec[label]) for label in chosen]
    members.append(member("student", student_entry.name, s_kwargs))
    plan = Plan(members=members, method=method, by=by, latency_backend=latency_backend, spacing=spacing, rule=rule,
                latency_failed=latency_failed)
    plan.relative_cost = round(relative_training_cost(members, method, drop_guides, epochs,
                                                      assistant_epochs or epochs), 3)
    return plan


def pick_student_by_latency(family: str, budget_ms: float, teacher_arch: str, num_classes: int,
                            model_kwargs: dict | None = None, input_size=None,
                            teacher_kwargs: dict | None = None) -> tuple[str, list[tuple[str, float]]]:
    """Largest member of ``family`` smaller than the teacher whose onnxruntime batch-1 latency fits.

    Returns ``(arch, [(candidate, latency_ms), ...])`` so the caller can say why.
    """
    from .latency import latency_ms

    size = tuple(input_size) if input_size else get_entry(teacher_arch).input_size
    t_macs = profile_arch(teacher_arch, num_classes, teacher_kwargs or {}, size)[1]
    measured = []
    fitting = None
    for name in family_ladder(family):
        kwargs = chain_model_kwargs(name, model_kwargs or {}, size)
        if profile_arch(name, num_classes, kwargs, size)[1] >= t_macs:
            break
        ms = latency_ms(name, backend="onnxruntime", num_classes=num_classes, model_kwargs=kwargs, input_size=size)
        measured.append((name, ms))
        if ms <= budget_ms:
            fitting = name
    if fitting is None:
        fastest = min(measured, key=lambda c: c[1]) if measured else None
        detail = f"; the fastest, {fastest[0]}, takes {fastest[1]:.3f} ms" if fastest else ""
        raise CompressError(f"no {family} model smaller than the teacher runs within {budget_ms} ms{detail}; "
                            f"raise --target-latency or pick --target")
    return fitting, measured


def format_plan(plan: Plan) -> str:
    from .report import format_table

    rows = []
    for m in plan.members:
        rows.append([m.role, member_label(m.arch, m.model_kwargs), f"{m.params:,}", f"{m.macs / 1e6:.1f}M",
                     "-" if m.latency_ms is None else f"{m.latency_ms:.3f}"])
    lat = {"torch": "torch eager", "onnxruntime": "onnxruntime", "none": "not measured"}[plan.latency_backend]
    after = plan.latency_backend != "none" and all(m.latency_ms is None for m in plan.members)
    if after:  # distill does not time the plan: the run table's latency is measured after training (pipeline)
        table = format_table(["role", "model", "params", "MACs"], [r[:4] for r in rows])
        table += "\nlatency: measured once after training, in onnxruntime (the final table)"
    else:
        table = format_table(["role", "model", "params", "MACs", f"latency ms ({lat}, batch 1)"], rows)
        table += "".join(f"\nlatency: not measured for {arch} ({why})" for arch, why in plan.latency_failed.items())
    stems = {}
    for m in plan.members[1:]:
        if "stem" in m.model_kwargs:
            stems.setdefault(m.model_kwargs["stem"], []).append(member_label(m.arch, m.model_kwargs))
    stem_line = "".join(f"stem: {stem} for {', '.join(names)} (default: cifar for inputs up to "
                        f"{CIFAR_STEM_MAX_PX} px, else imagenet; --option stem=imagenet|cifar)\n"
                        for stem, names in stems.items())
    return (f"{table}\nassistants: {plan.rule}\n{stem_line}"
            f"estimated training cost: {plan.relative_cost:.2f}x training the student alone "
            f"(method {plan.method})")
