"""Issue 19, the evaluation seams: one accuracy function and tie rule (torch, ONNX, bench tables),
fp32 reported accuracy, one fits-check, sampled (class-spread, decode-only-what-is-needed) export
data, data at the model's size for the provider table, and the import layers."""
from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compressor.data import DataBundle, ImageSplit, make_loader
from compressor.errors import CompressError
from compressor.evaluation import accuracy, check_data_fits, predictions, sample_arrays, sample_indices

REPO = Path(__file__).resolve().parents[1]


def _bench_module():
    spec = importlib.util.spec_from_file_location("export_decode_count", REPO / "benchmarks" / "export_decode_count.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------- item 12: one tie rule
def test_accuracy_ties_go_to_the_lowest_class_index():
    logits = np.array([[1.0, 3.0, 3.0, 0.0],    # 1 and 2 tie: 1 ranks first
                       [2.0, 2.0, 2.0, 2.0],    # all tie: 0, 1, 2, 3
                       [0.0, 5.0, 1.0, 5.0]])   # 1 and 3 tie: 1 first, then 3
    labels = np.array([2, 0, 3])
    assert predictions(logits).tolist() == [1, 0, 1]
    res = accuracy(logits, labels, k=2)
    assert res["top1"] == pytest.approx(100 / 3) and res["top5"] == 100.0 and res["n"] == 3
    # cross-entropy by hand: -log softmax of the label's logit; row 1 is uniform over 4 classes -> ln 4
    row0 = math.log(math.e + 2 * math.e ** 3 + 1) - 3.0
    row2 = math.log(1 + math.e + 2 * math.e ** 5) - 5.0
    assert res["loss"] == pytest.approx((row0 + math.log(4) + row2) / 3, rel=1e-9)
    # torch tensors count the same
    assert accuracy(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels), k=2)["top1"] == res["top1"]


class _Constant(nn.Module):
    """Logits ``values`` for every image (ties on purpose)."""

    def __init__(self, values):
        super().__init__()
        self.values = nn.Parameter(torch.tensor(values, dtype=torch.float32), requires_grad=False)

    def forward(self, x):
        return self.values.expand(x.shape[0], -1) + 0 * x.mean()


class _FakeOnnx:
    def __init__(self, values):
        self.values = np.asarray(values, dtype=np.float32)

    def prepare(self, images):
        return np.asarray(images, dtype=np.float32)

    def predict(self, x):
        return np.repeat(self.values[None], len(x), axis=0)


def test_torch_and_onnx_evaluation_break_ties_alike():
    """10 equal logits: both paths predict class 0 (torch.topk alone picks another index)."""
    from compressor.trainer import evaluate
    from export.runtime import evaluate_batches

    images = torch.zeros(12, 3, 4, 4, dtype=torch.uint8)
    labels = torch.zeros(12, dtype=torch.int64)
    values = [0.0] * 10
    torch_res = evaluate(None, _Constant(values), make_loader(ImageSplit(images, labels), 5, shuffle=False),
                         mean=(0.5,) * 3, std=(0.5,) * 3)
    onnx_res = evaluate_batches(_FakeOnnx(values), [(images.numpy()[:5], labels.numpy()[:5]),
                                                    (images.numpy()[5:], labels.numpy()[5:])])
    assert torch_res["top1"] == onnx_res["top1"] == 100.0
    assert torch_res["top5"] == onnx_res["top5"] == 100.0
    assert torch_res["loss"] == pytest.approx(onnx_res["loss"]) and torch_res["loss"] == pytest.approx(math.log(10))


# ------------------------------------------------------------- item 13: fp32 reported accuracy
class _NearTie(nn.Module):
    """Logits [1, 1.001]: class 1 in fp32; in bf16 both round to 1.0 and class 0 wins the tie."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[1.0], [1.001]]))

    def forward(self, x):
        return self.lin(torch.ones(x.shape[0], 1, device=x.device) + 0 * x.mean())


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_reported_accuracy_is_fp32_under_bf16_training(fresh_accelerate_state):
    from accelerate import Accelerator

    from compressor.trainer import evaluate

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    model = accelerator.prepare(_NearTie())
    split = ImageSplit(torch.zeros(8, 3, 4, 4, dtype=torch.uint8), torch.ones(8, dtype=torch.int64))
    loader = accelerator.prepare(make_loader(split, 4, shuffle=False))
    with torch.no_grad():  # the prepared model itself runs in bf16 autocast: the tie
        assert model(torch.zeros(1, 3, 4, 4)).argmax(1).item() == 0
    assert evaluate(accelerator, model, loader, mean=(0.0,) * 3, std=(1.0,) * 3)["top1"] == 100.0
    assert evaluate(accelerator, model, loader, mean=(0.0,) * 3, std=(1.0,) * 3, autocast=True)["top1"] == 0.0


# ----------------------------------------------------------------------------- fits-check
def _bundle(c=3, h=8, w=8, classes=10, names=None):
    split = ImageSplit(torch.zeros(4, c, h, w, dtype=torch.uint8), torch.arange(4) % classes)
    return DataBundle("imagefolder", None, split, names or [f"c{i}" for i in range(classes)], "x")


def test_one_fits_check_rules():
    from compressor.checkpoint import meta_for

    meta = meta_for("cnn2", num_classes=10, input_size=(3, 8, 8), class_names=[f"c{i}" for i in range(10)])
    check_data_fits(_bundle(), meta=meta, fixed_size=True)
    check_data_fits(_bundle(h=16, w=12), meta=meta)  # torch: another size is fine (the data were fitted)
    with pytest.raises(CompressError, match=r"^model has 10 classes but the data has 3;"):
        check_data_fits(_bundle(classes=3), meta=meta)
    with pytest.raises(CompressError, match="takes 3-channel images but the data has 1 channels"):
        check_data_fits(_bundle(c=1), meta=meta)
    with pytest.raises(CompressError, match=r"does not fit the data's images \(C,H,W\)=\(3, 16, 8\)"):
        check_data_fits(_bundle(h=16), meta=meta, fixed_size=True)
    with pytest.raises(CompressError, match="same class names in another order"):
        check_data_fits(_bundle(names=[f"c{i}" for i in reversed(range(10))]), meta=meta)
    check_data_fits(_bundle(names=[f"c{i}" for i in reversed(range(10))]), meta=meta, ignore_class_names=True)
    # unknown (dynamic) dimensions of an ONNX graph are not checked
    check_data_fits(_bundle(h=16), chw=(3, None, None), num_classes=None, fixed_size=True)


def test_torch_eval_onnx_eval_and_distill_share_the_fits_check(tmp_path):
    from compressor.evaluation import check_data_fits, evaluate_checkpoint
    from export import evaluate_onnx, export_onnx
    from tests.data_folders import write_uniform_folder

    bench = _bench_module()
    ckpt = bench.write_checkpoint(tmp_path / "m.safetensors", size=8, classes=10)
    onnx_path = export_onnx(ckpt, tmp_path / "m.onnx", legacy=True)
    folder = write_uniform_folder(tmp_path / "three", 8, per_class=2, classes=3)
    messages = []
    for run in (lambda: evaluate_checkpoint(ckpt, str(folder)), lambda: evaluate_onnx(onnx_path, str(folder))):
        with pytest.raises(CompressError) as exc:
            run()
        messages.append(str(exc.value).split(": ", 1)[1])
    from compressor.checkpoint import read_checkpoint

    with pytest.raises(CompressError) as exc:
        bundle = _bundle(classes=3)  # what distill's teacher check passes (pipeline.run_distillation)
        check_data_fits(bundle, what="model", meta=read_checkpoint(ckpt)[1], data_chw=bundle.input_size)
    messages.append(str(exc.value))
    assert len(set(messages)) == 1 and messages[0].startswith("model has 10 classes but the data has 3")


# --------------------------------------------------------- item 6: samples spread over classes
def _class_sorted(n_per_class=10, classes=10, hw=8):
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    images = (labels.view(-1, 1, 1, 1) * 20).to(torch.uint8).expand(-1, 3, hw, hw).contiguous()
    return ImageSplit(images, labels)


def test_samples_cover_every_class_of_a_class_sorted_split():
    split = _class_sorted()
    idx = sample_indices(split, 10, seed=0)
    assert sorted(split.labels[idx].tolist()) == list(range(10))  # the first 10 would be class 0 only
    assert idx.tolist() == sorted(idx.tolist()) and sample_indices(split, 10, seed=0).tolist() == idx.tolist()
    images, labels = sample_arrays(split, 20, seed=3)
    assert sorted(labels.tolist()) == sorted(list(range(10)) * 2)
    assert (images[:, 0, 0, 0] == labels * 20).all()  # images travel with their labels
    assert len(sample_indices(split, None)) == len(split) == len(sample_indices(split, 10 ** 6))


def test_int8_evaluation_images_are_spread_over_classes():
    from export.quantize import eval_sample

    bundle = DataBundle("synthetic", _class_sorted(), _class_sorted(), [f"class{i}" for i in range(10)], "s")
    _, images, labels = eval_sample(bundle, 30)
    assert len(labels) == 30 and sorted(set(labels.tolist())) == list(range(10))


# -------------------------------------------- item 7: the provider table loads at the model's size
def test_provider_table_loads_data_at_the_models_size(tmp_path, monkeypatch):
    """An 8-px model on 10x12 photos: compress eval fits them to 8x8; so does bench --provider all."""
    from PIL import Image

    import export.provider_table as pt
    from export import export_onnx

    bench = _bench_module()
    ckpt = bench.write_checkpoint(tmp_path / "m.safetensors", size=8, classes=2)
    onnx_path = export_onnx(ckpt, tmp_path / "m.onnx", legacy=True)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for k in range(2):
            d = tmp_path / "photos" / split / f"class{k:02d}"
            d.mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(d / f"{i}.png")
    seen = []
    original = pt.sample_arrays

    def spy(split, n, seed=0):
        out = original(split, n, seed)
        seen.append(out[1].tolist())
        return out

    monkeypatch.setattr(pt, "sample_arrays", spy)
    rep = pt.provider_table(onnx_path, data=str(tmp_path / "photos"), providers=("cpu",), batch_sizes=(1,),
                            threads=1, iters=2, seconds=None, warmup=0, parity_images=4)
    assert rep["parity_source"] == "data" and rep["parity_inputs"] == 4
    assert sorted(seen[0]) == [0, 0, 1, 1]  # 4 of 12 class-sorted test images, both classes
    assert all(r["parity_passed"] for r in rep["rows"] if r["variant"] == "fp32")


# ------------------------------------------------ item 3: export decodes only what it needs
def test_export_decodes_only_the_sampled_images(tmp_path):
    bench = _bench_module()
    folder = bench.write_folder(tmp_path / "data", images=2000)
    ckpt = bench.write_checkpoint(tmp_path / "m.safetensors")
    plain = bench.run_export(folder, ckpt, tmp_path / "m.onnx", extra=("--legacy",))
    assert plain["decoded"] == 32 and plain["train_decoded"] == 0  # the 32 validation images, no train image
    quant = bench.run_export(folder, ckpt, tmp_path / "q.onnx", quantize=True, calibration_size=24,
                             eval_images=40, extra=("--legacy",))
    assert quant["train_decoded"] == 24 and quant["test_decoded"] == 40


# --------------------------------------------------------------------------- the layers
def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of every module ``path`` imports (top level and inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = f"{package}.{path.stem}" if path.name != "__init__.py" else package
    parent = here.rsplit(".", 1)[0] if path.name != "__init__.py" else here
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parent.split(".")
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # "from . import runtime"
    return out


def _package_modules(root: Path, package: str) -> dict[str, Path]:
    mods = {}
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).with_suffix("")
        parts = [package, *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def test_no_library_module_but_the_cli_imports_export():
    offenders = []
    for name, path in _package_modules(REPO / "compressor", "compressor").items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        imported = _imports(path, pkg)
        if name != "compressor.cli" and any(m == "export" or m.startswith("export.") for m in imported):
            offenders.append(name)
    assert offenders == []


def test_export_has_no_import_circle():
    mods = _package_modules(REPO / "export", "export")
    graph = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        graph[name] = sorted({m for m in _imports(path, pkg) if m in mods and m != name and m != "export"})
    cycles = []

    def visit(node, stack):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        for nxt in graph[node]:
            visit(nxt, stack + [node])

    for start in graph:
        visit(start, [])
    assert cycles == []
    assert "export.runtime" not in graph["export.providers"] and "export.bench" not in graph["export.providers"]
