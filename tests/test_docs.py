"""The docs site and the README: generated reference complete, tour runnable, nothing stale or local."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
TOUR_MARKER = "<!-- tour:"


def _gen():
    spec = importlib.util.spec_from_file_location("gen_cli_reference", ROOT / "tools" / "gen_cli_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sections(markdown: str) -> dict[str, str]:
    """``## compress NAME`` section -> its text."""
    parts = re.split(r"^## compress (\S+)\n", markdown, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


# ---------------------------------------------------------------- (a) generated reference


def test_every_cli_option_is_in_the_generated_reference():
    gen = _gen()
    from compressor.cli import cli

    sections = _sections(gen.cli_markdown())
    ctx = click.Context(cli)
    names = cli.list_commands(ctx)
    assert set(sections) == set(names)
    assert {"train", "distill", "plan", "export", "bench", "eval", "import", "models"} <= set(names)
    missing = []
    for name in names:
        cmd = cli.get_command(ctx, name)
        for p in cmd.params:
            flags = [p.human_readable_name] if isinstance(p, click.Argument) else p.opts + p.secondary_opts
            missing += [f"{name} {f}" for f in flags if f"`{f}" not in sections[name] and f" {f}`" not in sections[name]
                        and f", {f}" not in sections[name]]
        if cmd.help:
            assert cmd.help.strip().splitlines()[0] in sections[name]
    assert not missing, missing
    # one pinned row: the type, default and help come from Click, not from hand-written text
    assert re.search(r"^\| `--kd-weight` \| number \|  \| λ in \(1-λ\)", sections["distill"], flags=re.M)
    assert "| `--gate-guides / --no-gate-guides` | flag |" in sections["distill"]
    assert "| `MODEL` (required) | text |  | argument |" in sections["eval"]
    assert "| `--warmup` | integer | `10` | untimed runs per engine first |" in sections["bench"]


def test_every_config_key_is_in_the_generated_reference():
    import dataclasses

    from compressor.config import DistillConfig, TrainConfig

    text = _gen().config_markdown()
    for cls in (TrainConfig, DistillConfig):
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in text, f.name
    assert ("| `batch_size` | int or null | `null` | `--batch-size` | images per step and process [default: auto: "
            "128, halved down to 16 while an epoch would have fewer than 32 steps] |") in text
    assert "| `epochs` | int | `30` | `--epochs` |" in text            # TrainConfig's own default
    assert "| `epochs` | int | `160` | `--epochs` |" in text           # the shared (distill) default
    assert re.search(r"\| `trust_code` \|.*a recipe holding this key is refused", text)


def test_reference_pages_are_generated_by_the_mkdocs_hook():
    gen = _gen()
    cli_page = (DOCS / "reference" / "cli.md").read_text()
    config_page = (DOCS / "reference" / "config.md").read_text()
    assert "<!-- generated: cli -->" in cli_page and "<!-- generated: config -->" in config_page
    rendered = gen.on_page_markdown(cli_page)
    assert "<!-- generated" not in rendered and "## compress distill" in rendered
    assert "tools/gen_cli_reference.py" in (ROOT / "mkdocs.yml").read_text()


# ---------------------------------------------------------------- (c) README shape, (d) no machine paths


def test_readme_is_short_and_starts_with_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    first_block = re.search(r"```\n(.*?)```", text, flags=re.S).group(1).splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == ["make demo", "make test"]
    assert text.index("```") < text.index("\n## ")  # before any section


def _doc_files():
    yield README
    yield ROOT / "mkdocs.yml"
    yield from sorted(DOCS.rglob("*.md"))


@pytest.mark.parametrize("path", list(_doc_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_absolute_machine_paths(path):
    bad = re.findall(r"(?<![\w.])/(?:work|tmp|home)/\S*", path.read_text())
    assert not bad, f"{path.relative_to(ROOT)}: {bad[:3]}"


@pytest.mark.parametrize("path", sorted((DOCS / "study").glob("*.json")), ids=lambda p: p.name)
def test_raw_study_files_name_repo_paths_relative(path):
    # raw records keep the scratch paths they ran with (/tmp/...), but never the checkout's own
    # location on one machine: the commands in them must run from any clone's root
    bad = re.findall(r"(?<![\w.])/(?:work|home)/\S*", path.read_text())
    assert not bad, f"{path.relative_to(ROOT)}: {bad[:3]}"


def test_every_docs_link_in_the_readme_exists():
    for target in re.findall(r"\]\(((?:docs/)[^)#]+)", README.read_text()):
        assert (ROOT / target).is_file(), target


def test_results_page_is_not_stale():
    text = (DOCS / "results.md").read_text()
    assert "does not have yet" not in text
    assert "no assistant in our zoo" not in text


# ---------------------------------------------------------------- mkdocs --strict (fast: a few seconds)


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    cli_html = (tmp_path / "site" / "reference" / "cli.html").read_text()
    assert "--kd-reduction" in cli_html and "generated:" not in cli_html


# ---------------------------------------------------------------- (b) the README's tour runs


def tour_commands(text: str) -> list[str]:
    """The commands of the fenced block after the tour marker, continuation lines joined."""
    after = text[text.index(TOUR_MARKER):]
    block = re.search(r"```bash\n(.*?)```", after, flags=re.S).group(1)
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")]


def test_tour_block_is_found():
    cmds = tour_commands(README.read_text())
    assert [c.split()[1] for c in cmds if c.startswith("compress ")] == \
        ["models", "plan", "distill", "export", "eval", "bench"]
    distill = next(c for c in cmds if c.startswith("compress distill"))
    for tiny in ("--epochs 1", "--train-subset", "--latency-backend none", "--data demo"):
        assert tiny in distill


def test_getting_started_repeats_the_readme_tour_verbatim():
    page = (DOCS / "getting-started.md").read_text()
    block = re.search(r"## A five-minute tour\n.*?```bash\n(.*?)```", page, flags=re.S).group(1)
    readme = README.read_text()
    assert block == re.search(r"```bash\n(.*?)```", readme[readme.index(TOUR_MARKER):], flags=re.S).group(1)


@pytest.mark.timeout(900)
def test_readme_tour_runs(tmp_path):
    """Every command of the tour, as written, from a copy of the repository root's layout."""
    if not (Path(sys.prefix) / "bin" / "compress").exists():
        pytest.skip("the compress script is not installed in this environment")
    (tmp_path / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    (tmp_path / "compressor").symlink_to(ROOT / "compressor", target_is_directory=True)
    script = "set -euo pipefail\n" + "\n".join(tour_commands(README.read_text())) + "\n"
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=850,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "runs" / "tour"
    summary = json.loads((run / "summary.json").read_text())
    assert [m["arch"] for m in summary["chain"]] == ["resnet20", "resnet8"]  # 3.3x: no assistant by default
    assert (run / "student.onnx").is_file()
    assert "parity PASS" in r.stdout + r.stderr
    assert re.search(r"student\.onnx on demo \(1000 images, onnxruntime\): top-1", r.stdout)


def _accuracy_study_module():
    """benchmarks/accuracy_study.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("accuracy_study", ROOT / "benchmarks" / "accuracy_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_study_plot_title_shows_no_machine_path(monkeypatch, tmp_path):
    """benchmarks/accuracy_study.py titles its plot with the data path: relative, or only its name."""
    mod = _accuracy_study_module()
    monkeypatch.chdir(tmp_path)
    assert mod.display_path("/somewhere/else/cifar10-jpeg") == "cifar10-jpeg"
    assert mod.display_path(str(tmp_path / "data" / "cifar10-jpeg")) == "data/cifar10-jpeg"
    assert mod.display_path("data/cifar10-jpeg") == "data/cifar10-jpeg"


def test_study_reports_where_its_runs_trained_not_where_it_combines_them(tmp_path):
    """Runs trained on a GPU and combined on a CPU: study.json names the GPU (a CPU combine once
    wrote "cpu: x86_64, 1 threads" over five H200 runs)."""
    import yaml

    from compressor.config import DistillConfig, config_to_dict

    mod = _accuracy_study_module()
    cfg = DistillConfig(data="d", teacher="t.safetensors", target="resnet8", out=str(tmp_path))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**config_to_dict(cfg), "target": "resnet8"}))
    chain = [{"arch": "resnet56", "final_test_top1": 83.2}, {"arch": "resnet8", "final_test_top1": 66.0,
                                                              "best_val_top1": 66.4}]
    (tmp_path / "summary.json").write_text(json.dumps({"method": "kd", "drop_guides": 1, "chain": chain,
                                                       "total_seconds": 36.0}))
    (tmp_path / "study_timing.json").write_text(json.dumps({"wall_seconds": 38.2, "device": "cuda: NVIDIA H200"}))
    run = mod.run_one(cfg, None, "kd", 0, "cmd", False)  # finished: reused, nothing trains
    assert (run["device"], run["wall_seconds"], run["test_top1"]) == ("cuda: NVIDIA H200", 38.2, 66.0)
    assert mod.study_device([run, dict(run)]) == "cuda: NVIDIA H200"
    assert mod.study_device([run, {**run, "device": None}]) == "cuda: NVIDIA H200; unknown (not recorded)"


def test_study_reuses_a_finished_run_whatever_it_recorded_beside_its_settings(tmp_path):
    """A finished run's config.yaml also holds what it resolved (precision, per-model defaults, rules,
    the teacher's sha256); the study reuses the run all the same, and refuses one made with another lr."""
    import yaml

    from compressor.config import DistillConfig, config_to_dict
    from compressor.errors import CompressError

    mod = _accuracy_study_module()
    cfg = DistillConfig(data="d", teacher="t.safetensors", target="resnet8", out=str(tmp_path))
    recorded = {**config_to_dict(cfg), "target": "resnet8", "temperature_rule": "set", "kd_mixup_rule": "set",
                "num_processes": 1, "teacher_sha256": "99f7", "training_defaults": {"resnet8": {"lr": 0.1}},
                "precision": {"requested": "no", "mixed_precision": "no", "channels_last": True}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(recorded))
    mod._check_same_config(tmp_path, cfg)  # reused: nothing but records differ
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**recorded, "lr": 0.05}))
    with pytest.raises(CompressError, match=r"\(lr: 0\.05 -> None\)"):
        mod._check_same_config(tmp_path, cfg)
