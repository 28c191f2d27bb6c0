"""Crafted inputs (issue 19, items 16-21): refusals before allocation, no hangs, one-line errors.

Every row of ``CASES`` runs ``compress ...`` in-process on one crafted file and checks:
exit code 2, exactly one ``error:`` line on stderr naming the problem, no ``Traceback``,
and that no file of the work folder was created or changed (paths, sizes, mtimes,
hashes; FIFOs and symlinks are compared by ``lstat`` only, never opened). A ``SIGALRM``
guard turns a hang (a FIFO named ``x.png``, a YAML alias bomb) into a failure.

The unit tests below the table pin what a table row cannot see: the image listing
(symlink loops counted once, FIFOs left out), PostScript never reaching Ghostscript,
``shorten``, the output-is-an-input rule (hard links), stale temporary files, the
``runs/latest`` link, the RNG state on resume, and the bounds taken from metadata.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli_inprocess, snapshot
from PIL import Image
from safetensors.torch import save_file

from compressor.checkpoint import meta_for, save_checkpoint
from compressor.models import create_model

pytestmark = pytest.mark.timeout(120)

ARCH = "cnn2"
PS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n"
TINY = ["--epochs", "1", "--train-subset", "8", "--batch-size", "8"]


# ----------------------------------------------------------------- builders
def _png(path: Path, seed: int, size: int = 8) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def _good_meta():
    return meta_for(ARCH, num_classes=10, mean=[0.5] * 3, std=[0.25] * 3)


def _crafted_ckpt(path: Path, **overrides) -> None:
    """The good cnn2 checkpoint with some metadata strings replaced (``None`` deletes the key)."""
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in create_model(ARCH).state_dict().items()}
    meta = _good_meta().to_strings()
    for k, v in overrides.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    save_file(state, str(path), metadata=meta)


def _onnx_graph(path: Path, shape, *, op: str = "Identity") -> None:
    """A one-node ONNX graph whose input declares ``shape`` (ints or names)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"])], "crafted", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _folder(root: Path, per_class: dict) -> None:
    """ImageFolder ``root`` with train/ and val/; ``per_class``: class -> callable(folder) adding files."""
    for split in ("train", "val"):
        for c, add in per_class.items():
            d = root / split / c
            d.mkdir(parents=True)
            add(d, split)


def _good_files(d: Path, split: str) -> None:
    _png(d / "a.png", hash((str(d), 1)) % 1000)
    _png(d / "b.png", hash((str(d), 2)) % 1000)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("crafted")
    torch.manual_seed(0)
    good = create_model(ARCH)
    save_checkpoint(d / "good.safetensors", good, _good_meta())
    torch.save(good.state_dict(), d / "good.pth")
    # --- checkpoints that lie in their metadata
    save_file({"w": torch.zeros(2)}, str(d / "million_classes.safetensors"),
              metadata={**_good_meta().to_strings(), "num_classes": "1000000"})
    _crafted_ckpt(d / "huge_input.safetensors", input_size="[3, 8192, 8192]")
    _crafted_ckpt(d / "nan_mean.safetensors", mean="[NaN, 0.5, 0.5]")
    _crafted_ckpt(d / "inf_std.safetensors", std="[0.25, Infinity, 0.25]")
    _crafted_ckpt(d / "neg_inf_mean.safetensors", mean="[-Infinity, 0.5, 0.5]")
    _crafted_ckpt(d / "deep_json.safetensors", input_size="[" * 100000 + "]" * 100000)
    _crafted_ckpt(d / "long_arch.safetensors", arch="x" * 2_000_000)
    _crafted_ckpt(d / "newline_arch.safetensors", arch="nosuchnet\nsaved test top-1 99.99%")
    _crafted_ckpt(d / "bad_option.safetensors", model_kwargs='{"book": "no-such-book"}')
    _crafted_ckpt(d / "nan_classes.safetensors", num_classes="NaN")
    # --- recipes
    recipes = {
        "alias_bomb": "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                      "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
                      "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
                      "g: [*f, *f, *f, *f, *f, *f, *f, *f, *f]\n",
        "alias_value": "epochs: &n 2\neval_every: *n\n",
        "alias_in_milestones": "m: &m 0.5\nmilestones: [*m]\n",
        "nan_lr": "lr: .nan\n",
        "inf_lr": "lr: .inf\n",
        "neg_inf_lr": "lr: -.inf\n",
        "nan_momentum": "momentum: .nan\n",
        "nan_weight_decay": "weight_decay: .nan\n",
        "nan_gamma": "gamma: .NaN\n",
        "nan_val_fraction": "val_fraction: .nan\n",
        "nan_milestone": "milestones: [0.5, .nan]\n",
        "inf_model_option": "model_kwargs: {width: .inf}\n",
        "workers_1000": "data_workers: 1000\n",
        "int_key": "1: 2\n",
        "bool_key": "true: 1\n",
        "list_key": "? [a, b]\n: 1\n",
        "non_utf8": b"epochs: 1\nname: \xff\xfe\xfa\n",
        "deep": "model_kwargs: " + "[" * 3000 + "]" * 3000 + "\n",  # deeper than Python's recursion limit
        "deep_map": "model_kwargs: " + "{a: " * 50 + "1" + "}" * 50 + "\n",
        "huge": "# " + "x" * (2 << 20) + "\nepochs: 1\n",
        "long_key": ("k" * 5_000_000) + ": 1\n",
        "not_mapping": "- epochs\n- 1\n",
    }
    for name, text in recipes.items():
        p = d / f"{name}.yaml"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
    (d / "distill_nan_temperature.yaml").write_text("temperature: .nan\n")
    (d / "distill_inf_temperature.yaml").write_text("temperature: .inf\n")
    (d / "distill_nan_kd_weight.yaml").write_text("kd_weight: .nan\n")
    (d / "distill_inf_spacing.yaml").write_text("spacing: .inf\n")
    (d / "distill_inf_latency.yaml").write_text("target: null\ntarget_latency_ms: .inf\n")
    # --- ONNX graphs that lie about their input
    _onnx_graph(d / "huge_input.onnx", [1, 3, 100000, 100000])
    _onnx_graph(d / "rank2.onnx", [1, 10])
    _onnx_graph(d / "rank5.onnx", [1, 3, 8, 8, 2])
    _onnx_graph(d / "zero_dim.onnx", [1, 3, 0, 8])
    _onnx_graph(d / "good.onnx", ["N", 3, 8, 8])
    # --- bench baselines
    row = {"role": "model", "engine": "onnxruntime", "batch_size": 1, "p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0}
    baselines = {
        "inf": '{"results": [{"role": "model", "engine": "onnxruntime", "batch_size": 1, "p50_ms": Infinity}]}',
        "nan": '{"results": [{"role": "model", "engine": "onnxruntime", "batch_size": 1, "p50_ms": NaN}]}',
        "neg_inf_p99": json.dumps({"results": [{**row, "p99_ms": float("-inf")}]}),
        "zero": json.dumps({"results": [{**row, "p50_ms": 0}]}),
        "negative": json.dumps({"results": [{**row, "p90_ms": -3.5}]}),
        "string": json.dumps({"results": [{**row, "p50_ms": "fast"}]}),
        "bool": json.dumps({"results": [{**row, "p50_ms": True}]}),
        "empty": "",
        "list": "[]",
        "entry_not_dict": '{"results": [1]}',
        "deep": "[" * 100000 + "]" * 100000,
        "non_utf8": b'{"results": [\xff]}',
        "huge_entry": json.dumps({"results": ["x" * 3_000_000]}),
    }
    for name, text in baselines.items():
        p = d / f"baseline_{name}.json"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
    # --- data folders
    def ps_and_good(folder, split):
        _good_files(folder, split)
        (folder / "x.png").write_bytes(PS)

    _folder(d / "ps_data", {"a": ps_and_good, "b": _good_files})

    def eps_jpg(folder, split):
        _good_files(folder, split)
        (folder / "x.jpg").write_bytes(b"\xc5\xd0\xd3\xc6" + b"\x00" * 28 + PS)

    _folder(d / "eps_data", {"a": eps_jpg, "b": _good_files})

    def pdf_png(folder, split):
        _good_files(folder, split)
        (folder / "x.png").write_bytes(b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n")

    _folder(d / "pdf_data", {"a": pdf_png, "b": _good_files})

    def fifo_only(folder, split):
        if split == "train":
            os.mkfifo(folder / "x.png")
        else:
            _good_files(folder, split)

    _folder(d / "fifo_data", {"a": fifo_only, "b": _good_files})

    def devzero_only(folder, split):
        if split == "train":
            os.symlink("/dev/zero", folder / "zero.png")
        else:
            _good_files(folder, split)

    _folder(d / "devzero_data", {"a": devzero_only, "b": _good_files})

    def loop_only(folder, split):
        if split == "train":
            os.symlink(".", folder / "loop")          # a folder loop, no images
            os.symlink("self.png", folder / "self.png")  # a file that links to itself
        else:
            _good_files(folder, split)

    _folder(d / "loop_data", {"a": loop_only, "b": _good_files})
    # --- run directories for distill --resume
    for name, config in {"run_alias": "seed: &s 3\nepochs: *s\n", "run_deep": "seed: " + "[" * 3000 + "]" * 3000,
                         "run_binary": b"\xff\xfe\x00seed: 1\n"}.items():
        (d / name).mkdir()
        p = d / name / "config.yaml"
        p.write_bytes(config if isinstance(config, bytes) else config.encode())
    for name, content in {"report_empty": "", "report_list": "[]", "report_deep": "[" * 100000 + "]" * 100000}.items():
        (d / name).mkdir()
        (d / name / "summary.json").write_text(content)
    # --- pipes where files are expected (a reader would block forever)
    for name in ("fifo.safetensors", "fifo.onnx", "fifo.pth", "fifo.yaml", "fifo.json"):
        os.mkfifo(d / name)
    # --- outputs that are inputs
    os.link(d / "good.safetensors", d / "hardlink.safetensors")
    os.symlink("good.safetensors", d / "symlink.onnx")
    os.link(d / "good.onnx", d / "good_hardlink.json")
    (d / "plan_recipe.yaml").write_text("epochs: 1\n")
    (d / "baseline_good.json").write_text(json.dumps({"results": [row]}))
    return d


def _on_alarm(signum, frame):
    raise TimeoutError("the command hung (crafted input)")


def run_guarded(args, capsys, seconds: int = 60):
    """The in-process CLI with a SIGALRM: a hang becomes a failure, not a stuck suite."""
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(seconds)
    try:
        return run_cli_inprocess(args, capsys)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_one_line_exit_2(code, out, err, expect: str) -> None:
    assert "Traceback" not in out + err, err[-3000:]
    assert code == 2, f"exit code {code}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err[:3000]}"
    assert lines[0].startswith("error: "), lines[0][:500]
    assert len(lines[0]) <= 4000, f"a {len(lines[0])}-character error line"
    assert expect in lines[0], f"{expect!r} not in {lines[0][:1000]!r}"


# ----------------------------------------------------------------- the table
def _recipe_rows():
    expect = {
        "alias_bomb": "YAML anchor", "alias_value": "YAML anchor", "alias_in_milestones": "YAML anchor",
        "nan_lr": "key 'lr' is nan", "inf_lr": "key 'lr' is inf", "neg_inf_lr": "key 'lr' is -inf",
        "nan_momentum": "key 'momentum' is nan", "nan_weight_decay": "key 'weight_decay' is nan",
        "nan_gamma": "key 'gamma' is nan", "nan_val_fraction": "key 'val_fraction' is nan",
        "nan_milestone": "key 'milestones' is nan", "inf_model_option": "key 'model_kwargs' is inf",
        "workers_1000": "data_workers must be in 0..64, got 1000",
        "int_key": "has a key that is not a name (1)", "bool_key": "has a key that is not a name (True)",
        "list_key": "is not valid YAML", "non_utf8": "is not UTF-8 text",
        "deep": "nests deeper than 8 levels", "deep_map": "nests deeper than 8 levels",
        "huge": "bytes (at most 1,048,576)", "long_key": "bytes (at most 1,048,576)",
        "not_mapping": "must be a mapping of key: value",
    }
    commands = {
        "train": ["train", "--arch", ARCH, "--out", "out.safetensors", "--recipe"],
        "plan": ["plan", "--teacher", "good.safetensors", "--target", ARCH, "--latency-backend", "none", "--recipe"],
        "distill": ["distill", "--teacher", "good.safetensors", "--target", ARCH, "--out", "runs/x", "--recipe"],
    }
    rows = [(f"{cmd}-recipe-{name}", [*argv, f"{name}.yaml"], text)
            for name, text in expect.items() for cmd, argv in commands.items()]
    for name, text in {"nan_temperature": "key 'temperature' is nan", "inf_temperature": "key 'temperature' is inf",
                       "nan_kd_weight": "key 'kd_weight' is nan", "inf_spacing": "key 'spacing' is inf",
                       "inf_latency": "key 'target_latency_ms' is inf"}.items():
        for cmd in ("plan", "distill"):
            rows.append((f"{cmd}-recipe-{name}", [*commands[cmd], f"distill_{name}.yaml"], text))
    return rows


def _flag_rows():
    distill = ["distill", "--teacher", "good.safetensors", "--target", ARCH, "--out", "runs/x"]
    train = ["train", "--arch", ARCH, "--out", "out.safetensors"]
    return [
        ("train-flag-lr-nan", [*train, "--lr", "nan"], "key 'lr' is nan"),
        ("train-flag-lr-inf", [*train, "--lr", "inf"], "key 'lr' is inf"),
        ("train-flag-momentum-nan", [*train, "--momentum", "nan"], "key 'momentum' is nan"),
        ("train-flag-workers-65", [*train, "--data-workers", "65"], "data_workers must be in 0..64, got 65"),
        ("train-flag-mean-nan", [*train, "--mean", "nan,0.5,0.5"], "key 'mean' is nan"),
        ("train-flag-std-inf", [*train, "--std", "0.2,inf,0.2"], "key 'std' is inf"),
        ("train-flag-image-size-8192", [*train, "--image-size", "8192"], "image_size must be in 8..2048"),
        ("train-option-rejected", [*train, "--option", "book=no-such-book", "--data", "demo", *TINY],
         "does not accept these options"),
        ("distill-flag-temperature-nan", [*distill, "--temperature", "nan"], "key 'temperature' is nan"),
        ("distill-flag-temperature-inf", [*distill, "--temperature", "inf"], "key 'temperature' is inf"),
        ("distill-flag-kd-weight-nan", [*distill, "--kd-weight", "nan"], "key 'kd_weight' is nan"),
        ("distill-flag-lr-nan", [*distill, "--lr", "nan"], "key 'lr' is nan"),
        ("distill-flag-workers-1000", [*distill, "--data-workers", "1000"], "data_workers must be in 0..64"),
        ("plan-flag-spacing-inf", ["plan", "--teacher", "good.safetensors", "--target", ARCH, "--spacing", "inf"],
         "key 'spacing' is inf"),
        ("import-option-rejected", ["import", "good.pth", "--arch", ARCH, "--out", "imp.safetensors",
                                    "--option", "book=no-such-book"], "does not accept these options"),
    ]


def _checkpoint_rows():
    crafted = {
        "million_classes": "no tensor in the file has 1000000 outputs",
        "huge_input": "values per image",
        "nan_mean": "mean/std must be finite numbers",
        "inf_std": "mean/std must be finite numbers",
        "neg_inf_mean": "mean/std must be finite numbers",
        "deep_json": "checkpoint metadata is malformed",
        "long_arch": "arch must be a model name",
        "newline_arch": "unknown model 'nosuchnet",
        "bad_option": "does not accept these options",
        "nan_classes": "checkpoint metadata is malformed",
    }
    commands = {
        "eval": lambda f: ["eval", f, "--data", "demo"],
        "export": lambda f: ["export", "--onnx", f, "--out", "exported.onnx", "--no-validate"],
        "plan": lambda f: ["plan", "--teacher", f, "--target", ARCH, "--latency-backend", "none"],
        "distill": lambda f: ["distill", "--teacher", f, "--target", ARCH, "--out", "runs/x", "--data", "demo",
                              "--latency-backend", "none", *TINY],
        "train-init": lambda f: ["train", "--arch", ARCH, "--init", f, "--out", "out.safetensors", "--data", "demo",
                                 *TINY],
    }
    rows = []
    for name, text in crafted.items():
        for cmd, argv in commands.items():
            if name in ("bad_option", "newline_arch") and cmd == "train-init":
                continue  # train builds its own --arch model: the init file's arch and options are not used
            rows.append((f"{cmd}-ckpt-{name}", argv(f"{name}.safetensors"), text))
    return rows


def _onnx_rows():
    crafted = {"huge_input": "larger than 16,777,216 values per image", "rank2": "expected an image batch",
               "rank5": "expected an image batch", "zero_dim": "its dims must be positive"}
    rows = []
    for name, text in crafted.items():
        rows += [
            (f"eval-onnx-{name}", ["eval", f"{name}.onnx", "--data", "demo"], text),
            (f"bench-onnx-{name}", ["bench", f"{name}.onnx", "--iters", "1", "--warmup", "0"], text),
            (f"bench-compare-{name}", ["bench", "good.onnx", "--compare", f"{name}.onnx", "--iters", "1",
                                       "--warmup", "0"], text),
        ]
    return rows


def _baseline_rows():
    expect = {
        "inf": "p50_ms inf of batch 1 is not a finite latency > 0",
        "nan": "p50_ms nan of batch 1 is not a finite latency > 0",
        "neg_inf_p99": "p99_ms -inf of batch 1", "zero": "p50_ms 0 of batch 1", "negative": "p90_ms -3.5",
        "string": "p50_ms fast of batch 1", "bool": "p50_ms True", "empty": "is not valid JSON",
        "list": "no 'results' list", "entry_not_dict": "malformed entry in 'results': 1",
        "deep": "is not valid JSON", "non_utf8": "is not valid JSON", "huge_entry": "malformed entry in 'results'",
    }
    return [(f"bench-baseline-{name}", ["bench", "good.onnx", "--baseline", f"baseline_{name}.json", "--iters", "1",
                                        "--warmup", "0"], text) for name, text in expect.items()]


def _data_rows():
    rows = []
    for name, text in {"ps_data": "cannot decode image file", "eps_data": "cannot decode image file",
                       "pdf_data": "cannot decode image file"}.items():
        rows += [
            (f"eval-{name}", ["eval", "good.safetensors", "--data", name], text),
            (f"eval-onnx-{name}", ["eval", "good.onnx", "--data", name], text),
            (f"train-{name}", ["train", "--arch", ARCH, "--out", "out.safetensors", "--data", name, *TINY], text),
        ]
    for name in ("fifo_data", "devzero_data", "loop_data"):
        rows += [
            (f"train-{name}", ["train", "--arch", ARCH, "--out", "out.safetensors", "--data", name, *TINY],
             "have no images"),
            (f"distill-{name}", ["distill", "--teacher", "good.safetensors", "--target", ARCH, "--out", "runs/x",
                                 "--data", name, "--latency-backend", "none", *TINY], "have no images"),
        ]
    return rows


def _run_dir_rows():
    distill = ["distill", "--teacher", "good.safetensors", "--target", ARCH, "--data", "demo",
               "--latency-backend", "none", *TINY, "--resume", "--out"]
    return [
        ("resume-config-alias", [*distill, "run_alias"], "config.yaml is damaged"),
        ("resume-config-deep", [*distill, "run_deep"], "config.yaml is damaged"),
        ("resume-config-binary", [*distill, "run_binary"], "config.yaml is damaged"),
        ("report-summary-empty", ["report", "report_empty"], "summary.json"),
        ("report-summary-list", ["report", "report_list"], "summary.json"),
        ("report-summary-deep", ["report", "report_deep"], "summary.json"),
    ]


def _output_rows():
    return [
        ("import-out-is-input", ["import", "good.pth", "--arch", ARCH, "--out", "good.pth"], "is the input file"),
        ("eval-json-is-model", ["eval", "good.safetensors", "--json", "good.safetensors"], "is the input file"),
        ("eval-json-is-hardlink", ["eval", "good.safetensors", "--json", "hardlink.safetensors"],
         "is the input file"),
        ("eval-onnx-json-is-model", ["eval", "good.onnx", "--json", "good.onnx"], "is the input file"),
        ("bench-json-is-model", ["bench", "good.onnx", "--json", "good.onnx", "--iters", "1"], "is the input file"),
        ("bench-json-is-hardlink", ["bench", "good.onnx", "--json", "good_hardlink.json", "--iters", "1"],
         "is the input file"),
        ("bench-json-is-compare", ["bench", "good.onnx", "--compare", "huge_input.onnx", "--json", "huge_input.onnx",
                                   "--iters", "1"], "is the input file"),
        ("bench-json-is-baseline", ["bench", "good.onnx", "--baseline", "baseline_good.json", "--json",
                                    "baseline_good.json", "--iters", "1"], "is the input file"),
        ("bench-all-json-is-model", ["bench", "good.onnx", "--provider", "all", "--json", "good.onnx"],
         "is the input file"),
        ("plan-json-is-teacher", ["plan", "--teacher", "good.safetensors", "--target", ARCH, "--latency-backend",
                                  "none", "--json", "good.safetensors"], "is the input file"),
        ("plan-json-is-recipe", ["plan", "--teacher", "good.safetensors", "--target", ARCH, "--latency-backend",
                                 "none", "--recipe", "plan_recipe.yaml", "--json", "plan_recipe.yaml"],
         "is the input file"),
        ("export-out-is-checkpoint", ["export", "--onnx", "good.safetensors", "--out", "symlink.onnx"],
         "is the input file"),
        ("train-out-is-init", ["train", "--arch", ARCH, "--init", "good.safetensors", "--out", "good.safetensors"],
         "is the input file"),
        ("train-out-is-recipe", ["train", "--arch", ARCH, "--recipe", "plan_recipe.yaml", "--out",
                                 "plan_recipe.yaml"], "is the input file"),
    ]


def _fifo_rows():
    regular = "is not a regular file"
    return [
        ("eval-fifo-checkpoint", ["eval", "fifo.safetensors"], regular),
        ("eval-fifo-onnx", ["eval", "fifo.onnx"], regular),
        ("bench-fifo-onnx", ["bench", "fifo.onnx", "--iters", "1"], regular),
        ("bench-fifo-baseline", ["bench", "good.onnx", "--baseline", "fifo.json", "--iters", "1"], regular),
        ("import-fifo-pth", ["import", "fifo.pth", "--arch", ARCH, "--out", "imp.safetensors"], regular),
        ("export-fifo-checkpoint", ["export", "--onnx", "fifo.safetensors", "--out", "f.onnx"], regular),
        ("plan-fifo-teacher", ["plan", "--teacher", "fifo.safetensors", "--target", ARCH], regular),
        ("train-fifo-recipe", ["train", "--arch", ARCH, "--out", "out.safetensors", "--recipe", "fifo.yaml"],
         regular),
        ("train-fifo-init", ["train", "--arch", ARCH, "--init", "fifo.safetensors", "--out", "out.safetensors",
                             "--data", "demo", *TINY], regular),
        ("eval-image-size-8192", ["eval", "good.safetensors", "--image-size", "8192"], "at most 2048 pixels"),
    ]


CASES = (_fifo_rows() + _recipe_rows() + _flag_rows() + _checkpoint_rows() + _onnx_rows() + _baseline_rows() + _data_rows()
         + _run_dir_rows() + _output_rows())


def test_the_table_is_big_enough():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 100, len(CASES)


@pytest.mark.parametrize("args,expect", [pytest.param(a, e, id=i) for i, a, e in CASES])
def test_crafted_input_is_one_line_exit_2(work, args, expect, capsys, monkeypatch, one_torch_thread):
    monkeypatch.chdir(work)
    monkeypatch.setenv("COLUMNS", "200")
    before = snapshot(work)
    code, out, err = run_guarded(args, capsys)
    assert_one_line_exit_2(code, out, err, expect)
    assert snapshot(work) == before, "a failing command created or changed files"


# ----------------------------------------------------------------- image files (item 16, 19)
def test_postscript_named_png_never_reaches_ghostscript(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    from compressor.data.formats import decode_file, probe_file

    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(
        AssertionError("Ghostscript called")))
    (tmp_path / "x.png").write_bytes(PS)
    assert isinstance(probe_file(str(tmp_path / "x.png")), str)  # a reason, not (h, w, gray)
    with pytest.raises(ValueError):
        decode_file(str(tmp_path / "x.png"))
    assert calls == []


def test_supported_formats_still_decode(tmp_path):
    from compressor.data.formats import decode_file, probe_file, quiet_torchvision

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for fmt, ext in (("PNG", "png"), ("BMP", "bmp"), ("GIF", "gif"), ("TIFF", "tif"), ("PPM", "ppm"),
                     ("WEBP", "webp")):
        p = tmp_path / f"x.{ext}.png"  # the content decides, not the extension
        Image.fromarray(arr).save(p, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        assert probe_file(str(p)) == (5, 7, False), fmt
        with quiet_torchvision():
            assert tuple(decode_file(str(p)).shape) == (3, 5, 7), fmt


def test_listing_counts_each_image_once_through_symlink_loops(tmp_path):
    from compressor.data.formats import _image_files

    cls = tmp_path / "cat"
    (cls / "sub").mkdir(parents=True)
    _png(cls / "a.png", 0)
    _png(cls / "sub" / "b.png", 1)
    os.symlink("..", cls / "sub" / "up")       # sub/up -> cat: a loop
    os.symlink(".", cls / "self")              # cat/self -> cat
    os.symlink("a.png", cls / "again.png")     # the same file under another name
    os.symlink("loop.png", cls / "loop.png")   # a link to itself
    os.mkfifo(cls / "fifo.png")                # would block a reader forever
    os.symlink("/dev/zero", cls / "zero.png")  # endless
    files = _image_files(cls)
    assert [Path(f).relative_to(cls).as_posix() for f in files] == ["a.png", "sub/b.png"]


def test_header_probes_keep_file_order_across_pool_chunks(tmp_path, monkeypatch):
    # probe_files hands the pool chunks of files (a future per file cost 2 KB each: 2.4 GB for
    # ImageNet-1k); the answers must still line up with the files, bad ones included.
    from compressor.data import formats

    monkeypatch.setattr(formats, "PROBE_CHUNK", 7)
    files = []
    for i in range(68):  # >= 64: the pool path; 10 chunks, the last one of 5
        p = tmp_path / f"{i:03d}.png"
        if i % 9 == 4:
            p.write_bytes(b"not an image")
        else:
            Image.fromarray(np.zeros((3 + i % 5, 4 + i % 3, 3), np.uint8)).save(p)
        files.append(str(p))
    expected = [formats.probe_file(f) for f in files]
    assert formats.probe_files(files) == expected
    assert expected[4] == "UnidentifiedImageError" and expected[5] == (3, 6, False)


def test_fifo_is_not_read(tmp_path):
    from compressor.data.formats import decode_file, probe_file

    os.mkfifo(tmp_path / "x.png")
    start = time.perf_counter()
    assert probe_file(str(tmp_path / "x.png")) == "not a regular file"
    with pytest.raises(ValueError, match="not a regular file"):
        decode_file(str(tmp_path / "x.png"))
    assert time.perf_counter() - start < 5


# ----------------------------------------------------------------- outputs (item 17)
def test_output_that_is_an_input_is_refused(tmp_path):
    from compressor.errors import CompressError
    from compressor.fileio import check_output_path

    src = tmp_path / "m.safetensors"
    src.write_bytes(b"x")
    os.link(src, tmp_path / "hard.json")
    os.symlink(src, tmp_path / "soft.json")
    (tmp_path / "sub").mkdir()
    for out in (src, tmp_path / "hard.json", tmp_path / "soft.json", tmp_path / "sub" / ".." / "m.safetensors"):
        with pytest.raises(CompressError, match="is the input file"):
            check_output_path(out, inputs=[None, str(src)])
    assert check_output_path(tmp_path / "other.json", inputs=[src]) == tmp_path / "other.json"
    assert check_output_path(src) == src  # no inputs named: the old behaviour


def test_runs_latest_that_is_not_a_link_is_left_alone(tmp_path, capsys):
    from compressor.pipeline import _link_latest

    runs = tmp_path / "runs"
    (runs / "a").mkdir(parents=True)
    (runs / "latest").write_text("my notes\n")
    _link_latest(runs / "a")
    assert (runs / "latest").read_text() == "my notes\n"
    assert "is not a symlink, left as it is" in capsys.readouterr().out
    (runs / "latest").unlink()
    _link_latest(runs / "a")
    assert os.readlink(runs / "latest") == "a"
    (runs / "b").mkdir()
    _link_latest(runs / "b")  # a link is still moved
    assert os.readlink(runs / "latest") == "b"


# ----------------------------------------------------------------- temporary files (item 21)
def _dead_pid() -> int:
    pid = 4_000_000  # above the default pid_max (4,194,304 is the maximum; rarely used)
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


def test_atomic_write_names_its_temp_file_and_removes_stale_ones(tmp_path):
    from compressor.fileio import TMP_PREFIX, atomic_write, write_json

    dead = tmp_path / f"{TMP_PREFIX}{_dead_pid()}.student.onnx.abc.onnx.tmp"
    live = tmp_path / f"{TMP_PREFIX}{os.getppid()}.other.json.xyz.tmp"
    for p in (dead, live):
        p.write_text("half")
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    mine = tmp_path / ".student.onnx.keep.tmp"  # not our prefix: never touched
    mine.write_text("x")
    with atomic_write(tmp_path / "m.json") as tmp:
        assert tmp.name.startswith(f"{TMP_PREFIX}{os.getpid()}.m.json.")
        assert tmp.parent == tmp_path
        tmp.write_text("{}")
    assert not dead.exists() and live.exists() and mine.exists()
    write_json(tmp_path / "n.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, mine.name, "m.json", "n.json"])


def test_fresh_temp_file_of_a_dead_process_is_kept_until_older_than_us(tmp_path):
    from compressor.fileio import TMP_PREFIX, remove_stale_tmp

    name = f"{TMP_PREFIX}{_dead_pid()}.x.json.abc.tmp"
    for folder, age in (("fresh", -60), ("old", 3600)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_text("half")
        os.utime(tmp_path / folder / name, (time.time() - age, time.time() - age))
    assert remove_stale_tmp(tmp_path / "fresh") == 0 and (tmp_path / "fresh" / name).exists()
    os.symlink("old", tmp_path / "link")
    assert remove_stale_tmp(tmp_path / "link") == 1 and not (tmp_path / "old" / name).exists()
    (tmp_path / "old" / name).write_text("half")
    os.utime(tmp_path / "old" / name, (1, 1))
    assert remove_stale_tmp(tmp_path / "old") == 0  # looked at once per real folder and process


def test_written_yaml_has_no_aliases_and_reads_back(tmp_path):
    from compressor.config import load_yaml
    from compressor.fileio import write_yaml

    shared = [1, 2]
    write_yaml(tmp_path / "c.yaml", {"a": shared, "b": shared})
    text = (tmp_path / "c.yaml").read_text()
    assert "&" not in text and "*" not in text
    assert load_yaml(text) == {"a": [1, 2], "b": [1, 2]}


# ----------------------------------------------------------------- messages (item 21)
@pytest.mark.parametrize("value,expect", [
    ("plain", "plain"),
    ("a\nb\r\nc\td", "a b c d"),
    ("x" * 250, "x" * 197 + "..."),
    ("\x1b[31mred\x1b[0m", " [31mred [0m"),
    ("line\u2028sep", "line sep"),
    (["a\nb"], "['a\\nb']"),
    (3.5, "3.5"),
])
def test_shorten(value, expect):
    from compressor.fileio import shorten

    assert shorten(value) == expect


def test_shorten_caps_a_ten_megabyte_value_quickly():
    from compressor.fileio import shorten

    start = time.perf_counter()
    text = shorten("\n" * 10_000_000 + "tail")
    assert text == " "
    assert len(shorten("y" * 10_000_000, 50)) == 50
    assert time.perf_counter() - start < 1.0


def test_eval_prints_a_forged_source_on_its_own_line_only(tmp_path, capsys, monkeypatch, one_torch_thread):
    _crafted_ckpt(tmp_path / "m.safetensors", source="mine\nm.safetensors on demo (1000 images, torch): top-1 99.99%")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_guarded(["eval", "m.safetensors", "--data", "demo"], capsys)
    assert code == 0, err
    assert "99.99%" not in "\n".join(line for line in out.splitlines() if not line.startswith("m.safetensors: sha256"))
    assert sum("top-1" in line for line in out.splitlines()) == 1 + 1  # the forged text stays in the source line


# ----------------------------------------------------------------- bounds from metadata (item 18, 20)
def test_million_classes_refused_before_building(tmp_path, monkeypatch):
    from compressor import checkpoint
    from compressor.errors import CompressError

    save_file({"w": torch.zeros(2)}, str(tmp_path / "m.safetensors"),
              metadata={**_good_meta().to_strings(), "num_classes": "1000000"})
    assert (tmp_path / "m.safetensors").stat().st_size < 1000
    monkeypatch.setattr(checkpoint, "build_model", lambda meta: pytest.fail("built the model"))
    with pytest.raises(CompressError, match="no tensor in the file has 1000000 outputs"):
        checkpoint.load_model(tmp_path / "m.safetensors")


@pytest.mark.parametrize("size,ok", [([3, 2048, 2048], True), ([4, 2048, 2048], True), ([5, 2048, 2048], False),
                                     ([3, 8192, 8192], False), ([1, 4096, 4096], True), ([1, 4097, 4096], False)])
def test_input_size_cap(size, ok):
    from compressor.checkpoint import CheckpointMeta

    meta = CheckpointMeta(arch=ARCH, num_classes=10, in_chans=size[0], input_size=tuple(size),
                          mean=(0.5,) * size[0], std=(0.25,) * size[0])
    assert (meta.problem() == "") is ok, meta.problem()


@pytest.mark.parametrize("shape", [[1, 3, 100000, 100000], [None, 17, 2048, 2048]])
def test_onnx_input_cap_before_any_array(shape):
    from compressor.errors import CompressError
    from export.runtime import check_input_shape

    with pytest.raises(CompressError, match="larger than 16,777,216 values per image"):
        check_input_shape(shape, "m.onnx")
    assert check_input_shape(["N", 3, 8, "W"], "m.onnx") == (3, 8, None)


def test_baseline_infinity_no_longer_passes_the_gate():
    from compressor.errors import CompressError
    from export.bench import check_baseline

    report = {"results": [{"role": "model", "engine": "onnxruntime", "batch_size": 1, "p50_ms": 5.0}],
              "machine": {}}
    base = {"results": [{"role": "model", "engine": "onnxruntime", "batch_size": 1, "p50_ms": float("inf")}]}
    with pytest.raises(CompressError, match="not a finite latency"):
        check_baseline(report, base, 0.1)


def test_config_numbers_must_be_finite_and_workers_bounded():
    from compressor.config import DistillConfig, TrainConfig, resolve_config
    from compressor.errors import CompressError

    base = {"arch": ARCH, "out": "o.safetensors"}
    assert resolve_config(TrainConfig, None, {**base, "data_workers": 64}).data_workers == 64
    cfg = TrainConfig(**base, lr=float("nan"))
    with pytest.raises(CompressError, match="lr is nan"):
        cfg.validate()
    cfg = DistillConfig(teacher="t", target=ARCH, temperature=float("inf"))
    with pytest.raises(CompressError, match="temperature is inf"):
        cfg.validate()


# ----------------------------------------------------------------- resume (item 21)
@pytest.mark.parametrize("content", [b"", b"not a pickle", None])
def test_damaged_rng_state_is_refused(tmp_path, content):
    from compressor.trainer import _check_rng_state

    if content is not None:
        (tmp_path / "random_states_0.pkl").write_bytes(content)
    with pytest.raises(ValueError, match="random number state random_states_0.pkl is"):
        _check_rng_state(tmp_path, 0)


def test_good_rng_state_passes(tmp_path):
    import random

    from compressor.trainer import _check_rng_state

    torch.save({"random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
                "torch_manual_seed": torch.get_rng_state()}, tmp_path / "random_states_0.pkl")
    _check_rng_state(tmp_path, 0)


# ----------------------------------------------------------------- a run directory (item 21)
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, pretrained_teacher):
    """One tiny finished distillation (kd, no assistants) to damage: the files --resume reads."""
    from compressor.cli import main

    d = tmp_path_factory.mktemp("run")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    cwd = os.getcwd()
    os.chdir(d)
    try:
        with pytest.raises(SystemExit) as exc:
            main(["distill", "--teacher", str(pretrained_teacher), *RUN_ARGS])
    finally:
        os.chdir(cwd)
        torch.set_num_threads(previous)
    assert exc.value.code == 0
    return d


RUN_ARGS = ["--target", ARCH, "--data", "demo", "--epochs", "1", "--train-subset", "8", "--batch-size", "8",
            "--latency-backend", "none", "--assistants", "0", "--method", "kd", "--out", "r"]


@pytest.mark.parametrize("content", ["", "[]", '{"top1": "high", "top5": 1, "loss": 1}', "[" * 100000])
def test_damaged_teacher_eval_is_one_line_on_resume(finished_run, pretrained_teacher, content, capsys,
                                                    monkeypatch, one_torch_thread):
    monkeypatch.chdir(finished_run)
    path = finished_run / "r" / "teacher_eval.json"
    good = path.read_bytes()
    path.write_text(content)
    try:
        code, out, err = run_guarded(["distill", "--teacher", str(pretrained_teacher), *RUN_ARGS, "--resume"],
                                     capsys)
    finally:
        path.write_bytes(good)
    assert_one_line_exit_2(code, out, err, "teacher_eval.json is damaged")
