"""Would the guide gate decide otherwise with the teacher and an assistant scored on the same images?

The surpass gate (``compressor.stability.surpassed_guides``) compares an assistant's score on the
run's validation split with the teacher's score on the *test* split (the teacher was trained before
the split was drawn and has most likely seen the validation images), and asks for a lead above
``surpass_margin``: the larger of 2 points and 2 standard errors of the difference of two
*independent* accuracies. This script scores the teacher and every assistant of finished
``compress distill`` run directories on both splits, image by image, and prints per assistant:

* ``val`` / ``test``: both scores on the same images, the paired lead (assistant - teacher) and its
  standard error (of the per-image difference of the two 0/1 hits, which is smaller than the
  independent-samples one when the two models get the same images right);
* ``gate``: what the run decided (the assistant's validation score against the teacher's test score,
  today's margin) and ``paired``: what a rule on the same validation images would decide
  (``max(2, 2 * paired SE)``);
* ``teacher_val_honest``: true when the teacher's checkpoint came from ``compress train --seed S``
  with the run's ``val_fraction`` and ``S`` equals the run's seed (``--teacher-seed S``): it then held
  out exactly this validation split, so its validation score is an unseen-image score too.

It reads the run's ``config.yaml`` (data, seed, val_fraction, train_subset, teacher) and
``stages/*/model.safetensors``; the data is loaded at each model's own size and view (as
``compress eval``). fp32, one thread by default.

    python benchmarks/guide_gate_paired.py runs/m/runs/photo96.resnet-mbv2.cpu/dgkd-s{0,1,2} \\
        --teacher-seed 0 --json gate_paired.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_json_report.py, however the script is run
from _json_report import emit_report  # noqa: E402

PAIRED_STANDARD_ERRORS = 2.0  # the same multiple as today's rule (SURPASS_STANDARD_ERRORS)


def paired_lead(hits_a, hits_b) -> dict:
    """Scores (%) of two models on the same images from their 0/1 hits, the lead ``a - b`` and
    the standard error of that lead: the sample standard deviation of the per-image differences
    over ``sqrt(n)``, in points."""
    a, b = [float(v) for v in hits_a], [float(v) for v in hits_b]
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("paired_lead needs two equally long hit lists of at least 2 images")
    n = len(a)
    diffs = [x - y for x, y in zip(a, b)]
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return {"a": round(100.0 * sum(a) / n, 2), "b": round(100.0 * sum(b) / n, 2), "lead": round(100.0 * mean, 2),
            "paired_se": round(100.0 * math.sqrt(var / n), 2), "n": n}


def hits(model, meta, split):
    """0/1 top-1 hits of ``model`` on ``split`` in order (fp32, the tie rule of ``compress eval``)."""
    import torch

    from compressor.data import make_loader, normalize
    from compressor.evaluation import predictions

    model.eval()
    out = []
    with torch.no_grad():
        for images, labels in make_loader(split, 256, shuffle=False):
            logits = model(normalize(images, meta.mean, meta.std)).float()
            out.extend((predictions(logits.numpy()) == labels.numpy()).tolist())
    return out


def score_run(run_dir: Path, teacher_seed: int | None) -> dict:
    import yaml

    from compressor.checkpoint import load_model
    from compressor.evaluation import load_data_for_model
    from compressor.models.user import arch_slug
    from compressor.pipeline import prepare_splits
    from compressor.stability import SURPASS_POINTS, surpass_margin

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    split_cfg = SimpleNamespace(seed=cfg["seed"], val_fraction=cfg["val_fraction"], train_subset=cfg.get("train_subset"))
    if not split_cfg.val_fraction:
        raise SystemExit(f"{run_dir}: val_fraction is 0, the gate used the test split for both (same images already)")

    views: dict = {}  # the splits at each view the models need, decoded once (teacher and assistants often share it)

    def both_splits(model, meta):
        view = (tuple(meta.input_size), (meta.metrics or {}).get("augment"))
        if view not in views:
            bundle = load_data_for_model(meta, cfg["data"], splits=("train", "test"))
            views[view] = (prepare_splits(split_cfg, bundle).eval, bundle.test)
        val_split, test_split = views[view]
        return hits(model, meta, val_split), hits(model, meta, test_split)

    chain = json.loads((run_dir / "plan.json").read_text())["chain"]
    stages = [run_dir / "stages" / f"{k}-{arch_slug(m['arch'])}" for k, m in enumerate(chain) if m["role"] == "assistant"]
    for stage in stages:
        if not (stage / "model.safetensors").is_file():
            raise SystemExit(f"{run_dir}: assistant stage {stage.name} has not finished")
    teacher, tmeta = load_model(cfg["teacher"])
    t_val, t_test = both_splits(teacher, tmeta)
    assistants = []
    for stage in stages:
        model_path = stage / "model.safetensors"
        model, meta = load_model(model_path)
        a_val, a_test = both_splits(model, meta)
        val, test = paired_lead(a_val, t_val), paired_lead(a_test, t_test)
        gate_margin = surpass_margin(val["a"], val["n"], test["b"], test["n"])
        paired_margin = max(SURPASS_POINTS, PAIRED_STANDARD_ERRORS * val["paired_se"])
        assistants.append({
            "stage": model_path.parent.name, "val": val, "test": test,
            "gate": {"assistant_val": val["a"], "teacher_test": test["b"], "lead": round(val["a"] - test["b"], 2),
                     "margin": round(gate_margin, 2), "drops_teacher": val["a"] - test["b"] > gate_margin},
            "paired": {"lead": val["lead"], "margin": round(paired_margin, 2),
                       "drops_teacher": val["lead"] > paired_margin}})
    return {"run": str(run_dir), "seed": cfg["seed"], "teacher": Path(cfg["teacher"]).name,
            "teacher_val_honest": teacher_seed is not None and teacher_seed == cfg["seed"],
            "assistants": assistants}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished compress distill run directories")
    ap.add_argument("--teacher-seed", type=int, default=None,
                    help="the --seed the teacher was trained with by compress train on the same folder")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    report = {"runs": [score_run(r, args.teacher_seed) for r in args.runs], "threads": args.threads}
    return emit_report(report, args.json)


if __name__ == "__main__":
    sys.exit(main())
