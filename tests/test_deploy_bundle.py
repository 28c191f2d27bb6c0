"""``compress export --target cpu``: the fastest validated configuration (threads x provider x precision),
written atomically as a deploy bundle whose predict.py reproduces ``compress eval`` (issue 20 item 2)."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor.checkpoint import load_model, meta_for, save_checkpoint
from compressor.errors import CompressError
from export.bundle import BUNDLE_FILES, SCHEMA, build_bundle, choose_config, staged_folder
from tests.conftest import run_export_cli

DEMO_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def demo_folder(root: Path) -> Path:
    """The demo test split as an ImageFolder (test/<class>/NNNNN.jpg): its JPEG files, byte for byte."""
    from safetensors import safe_open

    from compressor.data.formats import DEMO_PATH

    with safe_open(str(DEMO_PATH), "pt") as f:
        names = json.loads(f.metadata()["class_names"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    prefix = t.get("jpeg_prefix", torch.empty(0, dtype=torch.uint8))
    off, labels = t["test_offsets"].tolist(), t["test_labels"].tolist()
    for i in range(len(off) - 1):
        d = root / "test" / names[labels[i]]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:05d}.jpg").write_bytes(torch.cat([prefix, t["test_jpeg"][off[i]:off[i + 1]]]).numpy().tobytes())
    return root


@pytest.fixture(scope="module")
def demo_jpegs(tmp_path_factory) -> Path:
    return demo_folder(tmp_path_factory.mktemp("demo-folder"))


def checkpoint_at(tmp: Path, pretrained: Path, size: int, policy: str) -> Path:
    """The embedded ResNet-20 (trained on CIFAR-10; global pooling, so any size runs) saved as a
    ``size``-px model of augment ``policy``: real predictions, far from ties."""
    model, meta = load_model(pretrained)
    new = meta_for("resnet20", num_classes=10, input_size=(3, size, size), mean=meta.mean, std=meta.std,
                   class_names=DEMO_NAMES, metrics={"augment": policy})
    return save_checkpoint(tmp / f"r20-{size}-{policy}.safetensors", model, new)


def fake_bench(p50: dict):
    """A timer for provider_table: p50 (ms) by (variant file, threads); no real timing."""
    def timer(sessions, *, batch_sizes, **_):
        return {(provider, variant, threads): {b: {"p50_ms": p50[(variant, threads)],
                                                   "throughput_ips": 1000.0 * b / p50[(variant, threads)],
                                                   "cv": 0.01, "iterations": 3} for b in batch_sizes}
                for (provider, variant, threads) in sessions}
    return timer


def run_predict(bundle: Path, *targets: Path) -> subprocess.CompletedProcess:
    """predict.py in a fresh interpreter (the venv's), reporting whether torch/compressor got imported."""
    code = ("import runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n"
            "    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
            "else:\n    code = 0\n"
            "print('IMPORTED', sorted(m for m in ('torch', 'compressor', 'export') if m in sys.modules))\n"
            "sys.exit(code)\n")
    return subprocess.run([sys.executable, "-c", code, str(bundle / "predict.py"), *map(str, targets)],
                          capture_output=True, text=True, timeout=300, cwd=bundle.parent)


def predicted_top1(out: str) -> tuple[int, int]:
    line = next(x for x in out.splitlines() if x.startswith("top-1 "))
    hits, n = line.split("(", 1)[1].split(")", 1)[0].split("/")
    return int(hits), int(n)


# ----------------------------------------------------------------- the choice (pure)
def row(provider, variant, threads, p50, passed=True, top1=80.0):
    return {"provider": provider, "variant": variant, "precision": "bf16" if variant == "bf16" else "f32",
            "threads": threads, "batch_size": 1, "p50_ms": p50, "throughput_ips": 1000.0 / p50, "cv": 0.01,
            "top1": top1, "top1_agreement": 1.0, "parity_passed": passed, "path": f"m.{variant}.onnx"}


def table(*rows, reference_threads=2):
    return {"rows": list(rows), "reference_threads": reference_threads, "reference_top1": 80.0,
            "rules": {"max_accuracy_drop": 0.5}}


def test_choice_takes_the_fastest_thread_count():
    t = table(row("cpu", "fp32", 1, 0.8), row("cpu", "fp32", 2, 1.0), row("openvino", "fp32", 2, 4.0))
    c = choose_config(t)
    assert (c["chosen"]["provider"], c["chosen"]["threads"]) == ("cpu", 1)
    assert c["baseline"]["threads"] == 2 and c["baseline"]["p50_ms"] == 1.0
    assert c["int8"] == "INT8 not tried (no INT8 file)"


def test_int8_rejected_when_slower_than_fp32_on_its_runtime():
    t = table(row("cpu", "fp32", 1, 1.0), row("cpu", "int8", 1, 1.3, top1=80.1))
    c = choose_config(t)
    assert c["chosen"]["variant"] == "fp32"
    assert c["int8"] == "INT8 rejected: not faster than fp32 on cpu x 1 thread (p50 1.300 ms vs fp32 1.000 ms)"
    # equal speed is not faster either
    assert choose_config(table(row("cpu", "fp32", 1, 1.0), row("cpu", "int8", 1, 1.0)))["chosen"]["variant"] == "fp32"


def test_int8_rejected_outside_the_budget_and_kept_inside():
    slow_fp32 = row("cpu", "fp32", 1, 2.0)
    out = choose_config(table(slow_fp32, row("cpu", "int8", 1, 0.5, passed=False, top1=79.2)))
    assert out["chosen"]["variant"] == "fp32"
    assert out["int8"] == "INT8 rejected: outside the 0.5-point accuracy budget (top-1 79.20% vs fp32 80.00%)"
    kept = choose_config(table(slow_fp32, row("cpu", "int8", 1, 0.5, top1=79.6)))
    assert kept["chosen"]["variant"] == "int8"
    assert kept["int8"].startswith("INT8 kept: within the 0.5-point budget (top-1 79.60% vs fp32 80.00%)")


def test_int8_slower_on_one_runtime_is_skipped_there_only():
    # int8 beats fp32 on openvino x1 but not on cpu x1; the fastest valid row wins
    t = table(row("cpu", "fp32", 1, 1.0), row("cpu", "int8", 1, 0.4), row("openvino", "fp32", 1, 0.3),
              row("openvino", "int8", 1, 0.6), row("openvino", "bf16", 1, 0.5))
    c = choose_config(t)
    assert (c["chosen"]["provider"], c["chosen"]["variant"]) == ("openvino", "fp32")
    assert c["int8"].startswith("INT8 rejected: not faster than fp32 on openvino x 1 thread")


def test_no_valid_row_is_bad_input():
    with pytest.raises(CompressError, match="no configuration passed validation"):
        choose_config(table(row("cpu", "fp32", 1, 1.0, passed=False)))


# ----------------------------------------------------------------- building bundles
@pytest.fixture(scope="module")
def cifar_bundle(tmp_path_factory, pretrained_teacher):
    """32-px cifar-policy model, cpu only, INT8 made but slower by a fake timer, threads 1 and 2."""
    tmp = tmp_path_factory.mktemp("bundle32")
    ckpt = checkpoint_at(tmp, pretrained_teacher, 32, "cifar")
    timer = fake_bench({("fp32", 1): 1.0, ("fp32", 2): 1.5, ("int8", 1): 1.2, ("int8", 2): 1.4})
    with pytest.MonkeyPatch.context() as mp:  # the baseline: cpu fp32 at the default count, 2 on any machine
        mp.setattr("export.provider_table.default_threads", lambda: 2)
        # the INT8 accuracy budget opened: INT8 must lose on speed alone (its top-1 differs by machine: it
        # lost 2 of 200 images on a CPU without AVX-512, 79 % vs 80 %, outside the default 0.5 points)
        record = build_bundle(ckpt, tmp / "deploy", "demo", providers=("cpu",), threads=[1, 2], calibration_size=64,
                              parity_images=200, timer=timer, max_accuracy_drop=100.0, echo=lambda *a, **k: None)
    return tmp / "deploy", record, ckpt


def test_bundle_files_and_schema(cifar_bundle):
    out, record, ckpt = cifar_bundle
    assert sorted(p.name for p in out.iterdir()) == sorted(BUNDLE_FILES)
    deploy = json.loads((out / "deploy.json").read_text())
    assert deploy == json.loads(json.dumps(record))
    assert deploy["schema"] == SCHEMA == "compress.deploy/1"
    for key in ("target", "model", "runtime", "input", "preprocessing", "class_names", "latency", "accuracy",
                "decision", "search"):
        assert key in deploy, key
    assert deploy["runtime"] == {"engine": "onnxruntime", "provider": "cpu", "precision": "fp32",
                                 "precision_hint": "f32", "threads": 1, "graph_optimization": "all", "batch": 1}
    prep = deploy["preprocessing"]
    assert (prep["policy"], prep["color_order"], prep["store"], prep["size"], prep["crop"]) == (
        "cifar", "RGB", [32, 32], [32, 32], 1.0)
    assert prep["interpolation"].startswith("bilinear, antialiased") and prep["normalize_in_graph"] is False
    meta = load_model(ckpt)[1]
    assert prep["mean"] == list(meta.mean) and prep["std"] == list(meta.std)
    assert deploy["input"]["shape"] == [1, 3, 32, 32] and deploy["class_names"] == DEMO_NAMES
    from compressor.checkpoint import file_sha256

    assert deploy["model"]["sha256"] == file_sha256(out / "model.onnx") and deploy["model"]["precision"] == "fp32"
    lat = deploy["latency"]  # the fake timer's numbers: chosen fp32 x1 = 1.0 ms, baseline cpu fp32 x2 = 1.5 ms
    assert (lat["p50_ms"], lat["baseline"]["p50_ms"], lat["baseline"]["threads"]) == (1.0, 1.5, 2)
    assert lat["p50_speedup_vs_baseline"] == pytest.approx(1.5)
    assert deploy["decision"]["int8"] == ("INT8 rejected: not faster than fp32 on cpu x 1 thread "
                                          "(p50 1.200 ms vs fp32 1.000 ms)")
    assert {(r["variant"], r["threads"]) for r in deploy["search"]} == {("fp32", 1), ("fp32", 2), ("int8", 1),
                                                                        ("int8", 2)}
    acc = deploy["accuracy"]
    assert acc["images"] == 200 and acc["top1"] == acc["fp32_top1"] and acc["budget_points"] == 100.0


def test_int8_winner_keeps_its_fp32_source_and_valid_metadata_paths(tmp_path, pretrained_teacher):
    """An INT8 winner's metadata names its fp32 source and checkpoint; both resolve inside/beside the bundle."""
    from export.runtime import OnnxModel

    ckpt = checkpoint_at(tmp_path, pretrained_teacher, 32, "cifar")
    timer = fake_bench({("fp32", 1): 1.0, ("int8", 1): 0.5})
    record = build_bundle(ckpt, tmp_path / "deploy", "demo", providers=("cpu",), threads=[1], calibration_size=32,
                          parity_images=50, timer=timer, max_accuracy_drop=100.0, echo=lambda *a, **k: None)
    out = tmp_path / "deploy"
    assert record["model"]["precision"] == "int8"
    assert sorted(p.name for p in out.iterdir()) == sorted(BUNDLE_FILES + ("model.fp32.onnx",))
    meta = OnnxModel(out / "model.onnx").metadata
    assert (out / meta["fp32_source"]).resolve() == (out / "model.fp32.onnx").resolve()
    assert (out / meta["source_checkpoint"]).resolve() == Path(ckpt).resolve()


def test_predict_imports_only_numpy_pillow_onnxruntime():
    tree = ast.parse((Path(__file__).resolve().parents[1] / "export" / "bundle_predict.py").read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    third_party = mods - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party == {"numpy", "PIL", "onnxruntime", "onnxruntime_ep_openvino"}


def _eval_top1(onnx_path) -> dict:
    from export.runtime import evaluate_onnx

    return evaluate_onnx(onnx_path, "demo", threads=1)


def test_predict_reproduces_compress_eval_32px_cifar(cifar_bundle, demo_jpegs):
    out, _, _ = cifar_bundle
    res = run_predict(out, demo_jpegs)
    assert res.returncode == 0, res.stderr
    assert "IMPORTED []" in res.stdout  # neither torch nor compress was loaded
    hits, n = predicted_top1(res.stdout)
    ev = _eval_top1(out / "model.onnx")
    assert n == ev["n"] == 1000
    assert 100.0 * hits / n == ev["top1"]
    assert ev["top1"] > 50  # a trained model: the equality is not between two chance numbers


def test_predict_reproduces_compress_eval_64px_imagenet(tmp_path, pretrained_teacher, demo_jpegs):
    ckpt = checkpoint_at(tmp_path, pretrained_teacher, 64, "imagenet")
    record = build_bundle(ckpt, tmp_path / "b64", "demo", providers=("cpu",), threads=1, int8=False,
                          parity_images=100, timer=fake_bench({("fp32", 1): 1.0}), echo=lambda *a, **k: None)
    assert (record["preprocessing"]["store"], record["preprocessing"]["crop"]) == ([73, 73], 0.875)
    res = run_predict(tmp_path / "b64", demo_jpegs / "test")  # the split folder itself works too
    assert res.returncode == 0, res.stderr
    hits, n = predicted_top1(res.stdout)
    ev = _eval_top1(tmp_path / "b64" / "model.onnx")
    assert n == ev["n"] == 1000 and 100.0 * hits / n == ev["top1"]
    assert ev["top1"] > 12  # 15.1%: the 32-px CIFAR net shown the 64-px view -- poor, but not chance-level ties


def test_predict_one_image_and_bad_input(cifar_bundle, demo_jpegs, tmp_path):
    out, _, _ = cifar_bundle
    one = next((demo_jpegs / "test" / "cat").iterdir())
    res = run_predict(out, one)
    assert res.returncode == 0, res.stderr
    lines = [x for x in res.stdout.splitlines() if x.endswith("%")]
    assert len(lines) == 5 and lines[0].split()[0] in DEMO_NAMES
    res = run_predict(out, tmp_path / "missing.jpg")
    assert res.returncode == 2 and "no such file or folder" in res.stderr and "Traceback" not in res.stderr
    two = sorted((demo_jpegs / "test" / "dog").iterdir())[:2]
    res = run_predict(out, one, *two)  # several images: one line each, in the order given
    assert res.returncode == 0, res.stderr
    rows = [x.split("\t") for x in res.stdout.splitlines() if "\t" in x]
    assert [r[0] for r in rows] == [str(one), *map(str, two)] and all(r[1] in DEMO_NAMES for r in rows)
    res = run_predict(out, one, demo_jpegs / "test")
    assert res.returncode == 2 and "image files only" in res.stderr and "Traceback" not in res.stderr


# ----------------------------------------------------------------- atomic writing
def tiny_checkpoint(tmp: Path) -> Path:
    from compressor.models import create_model

    torch.manual_seed(0)
    return save_checkpoint(tmp / "cnn2.safetensors", create_model("cnn2", num_classes=10).eval(),
                           meta_for("cnn2", num_classes=10, class_names=DEMO_NAMES))


def test_failed_build_leaves_no_half_bundle(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)

    def broken_timer(*a, **k):
        raise RuntimeError("timer broke after export and validation")

    with pytest.raises(RuntimeError, match="timer broke"):
        build_bundle(ckpt, tmp_path / "new", "demo", providers=("cpu",), threads=1, int8=False, parity_images=50,
                     timer=broken_timer, echo=lambda *a, **k: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.name]  # no bundle, no temporary folder

    old = tmp_path / "old"  # an earlier bundle survives a failed rebuild untouched
    old.mkdir()
    (old / "deploy.json").write_text('{"schema": "compress.deploy/1", "old": true}')
    with pytest.raises(RuntimeError):
        build_bundle(ckpt, old, "demo", providers=("cpu",), threads=1, int8=False, parity_images=50,
                     timer=broken_timer, echo=lambda *a, **k: None)
    assert [p.name for p in old.iterdir()] == ["deploy.json"] and '"old": true' in (old / "deploy.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ckpt.name, "old"])


def test_staged_folder_replaces_in_one_step(tmp_path):
    out = tmp_path / "b"
    with staged_folder(out) as tmp:
        (tmp / "deploy.json").write_text("1")
        assert not out.exists()  # nothing visible until the end
    assert (out / "deploy.json").read_text() == "1"
    with staged_folder(out) as tmp:
        (tmp / "deploy.json").write_text("2")
    assert (out / "deploy.json").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_cli_refuses_bad_bundle_requests(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    res = run_export_cli("export", ckpt, "--target", "cpu")
    assert isinstance(res.exception, CompressError) and "--target needs --data" in str(res.exception)
    res = run_export_cli("export", ckpt, "--target", "cpu", "--data", "demo", "--quantize", "int8")
    assert isinstance(res.exception, CompressError) and "--quantize do not apply to --target" in str(res.exception)
    (tmp_path / "notabundle").mkdir()
    (tmp_path / "notabundle" / "keep.txt").write_text("x")
    res = run_export_cli("export", ckpt, "--target", "cpu", "--data", "demo", "--out", tmp_path / "notabundle")
    assert isinstance(res.exception, CompressError) and "not a deploy bundle" in str(res.exception)
    res = run_export_cli("export", ckpt, "--batch-size", "8")
    assert isinstance(res.exception, CompressError) and "add --target cpu" in str(res.exception)


def test_provider_table_tries_thread_counts(tmp_path):
    from export.onnx_export import export_onnx
    from export.provider_table import format_provider_table, provider_table, thread_counts

    assert thread_counts(1) == [1] and thread_counts(2) == [1, 2] and thread_counts(6) == [1, 2, 4, 6]
    assert thread_counts(8) == [1, 2, 4, 8]
    fp32 = export_onnx(tiny_checkpoint(tmp_path), tmp_path / "m.onnx")
    rep = provider_table(fp32, batch_sizes=(1,), threads=[1, 2], providers=("cpu",), parity_images=8,
                         timer=fake_bench({("fp32", 1): 0.5, ("fp32", 2): 2.0}))
    assert [(r["threads"], r["p50_ms"]) for r in rep["rows"]] == [(1, 0.5), (2, 2.0)]
    assert rep["thread_counts"] == [1, 2] and rep["fastest"]["1"]["threads"] == 1
    assert all(r["parity_passed"] for r in rep["rows"])
    assert " thr " in format_provider_table(rep).splitlines()[1]
    assert "cpu fp32 1 thread(s)" in format_provider_table(rep)


def test_provider_table_rows_are_timed_interleaved_in_rounds():
    """Every row runs in each of the TABLE_ROUNDS rounds, on one shared input: a load spike hits all alike."""
    import numpy as np

    from export.provider_table import TABLE_ROUNDS, time_interleaved

    calls, inputs = [], set()

    class Session:
        def __init__(self, key):
            self.key = key

        def random_input(self, n, seed=0):
            return np.zeros((n, 3, 4, 4), np.float32)

        def predict(self, x):
            calls.append(self.key)
            inputs.add(id(x))

    out = time_interleaved({"a": Session("a"), "b": Session("b"), "c": Session("c")}, batch_sizes=[1, 8],
                           warmup=1, iters=12, seconds=None)
    assert set(out) == {"a", "b", "c"} and set(out["a"]) == {1, 8}
    assert all(out[k][b]["iterations"] == 12 for k in out for b in (1, 8))
    timed = calls[3:3 + 36]  # batch 1 after the warm-up: blocks of 12 // TABLE_ROUNDS calls, row after row
    blocks = [timed[i] for i in range(0, 36, 12 // TABLE_ROUNDS)]
    assert blocks == ["a", "b", "c"] * TABLE_ROUNDS
    assert len(inputs) == 2  # one input per batch size, shared by every row
