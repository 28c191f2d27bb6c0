"""Guide set and the guide-logit cache (--cache-guides)."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from compressor import guides as guides_mod
from compressor.config import DistillConfig, resolve_config
from compressor.data import ImageSplit, synthetic_data
from compressor.guides import (GuideLogitCache, GuideSet, cache_key, cache_settings, data_fingerprint, densify,
                               sparsify, top_k_for, weights_fingerprint)
from compressor.models import create_model
from compressor.pipeline import _guide_cache_opener, prepare_splits, run_distillation


def test_guide_set_runs_only_kept_guides_in_eval_mode():
    calls = []

    class Probe(torch.nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k = k
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            calls.append((self.k, self.training, torch.is_inference_mode_enabled()))
            return self.lin(x)

    guides = GuideSet([Probe(0), Probe(1), Probe(2)])
    guides.guides[1].train()  # GuideSet must not depend on the caller's mode
    guides = GuideSet(guides.guides)
    out = guides.logits([0, 2], torch.randn(5, 4), 0, 0, torch.no_grad)
    assert [c[0] for c in calls] == [0, 2]
    assert all(not training and inference for _, training, inference in calls)
    assert len(out) == 2 and out[0].shape == (5, 3) and not out[0].is_inference()


def test_cache_round_trip(tmp_path):
    cache = GuideLogitCache(tmp_path / "c", epochs=2, steps=3, batch_size=4, num_classes=5)
    z = torch.randn(3, 5)  # a short last batch
    assert cache.get(1, 2) is None
    stored = cache.put(1, 2, z)
    assert torch.equal(stored, z.half().float())  # what a later hit returns
    cache.flush()
    again = GuideLogitCache(tmp_path / "c", epochs=2, steps=3, batch_size=4, num_classes=5)
    got = again.get(1, 2)
    assert got.shape == (3, 5) and torch.equal(got.float(), stored)
    assert again.get(0, 0) is None and (again.hits, again.misses) == (1, 1)
    assert again.get(2, 0) is None and again.get(1, 3) is None  # beyond epochs / steps: misses
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["epoch-00001.safetensors"]


@pytest.mark.parametrize("classes", [5, 150])  # dense float16 rows, and top-k rows
def test_logits_beyond_float16_range_are_stored_finite_with_the_same_softmax(tmp_path, classes):
    # An untrained ResNet-56 in eval mode gives logits near 1e5; float16 holds +-65,504, so
    # they were stored as inf and the first KD loss was NaN (a CI failure of the paper recipe).
    temperature = 4.0
    z = torch.zeros(2, classes)
    z[0, :3] = torch.tensor([100000.0, 99996.0, -120000.0])  # out of range: shifted by its max
    z[1, :3] = torch.tensor([2.0, -1.0, 0.5])  # in range: stored as before
    cache = GuideLogitCache(tmp_path, 1, 1, 2, classes, temperature=temperature)
    used = cache.put(0, 0, z)
    assert torch.isfinite(used).all()
    assert used[0, 0] == 0 and used[0, 1] == -4  # 100000 - 100000 and 99996 - 100000, exact
    assert used[0, 2] == -65504  # -220000 after the shift, clipped to float16's lowest
    p = torch.softmax(z / temperature, 1)
    assert torch.allclose(torch.softmax(used / temperature, 1)[0, :2], p[0, :2])  # e/(1+e) and 1/(1+e)
    assert torch.allclose(p[0, :2], torch.tensor([math.e / (1 + math.e), 1 / (1 + math.e)]))
    if classes == 5:
        assert torch.equal(used[1], z[1].half().float())


def _held_tensor_bytes(obj) -> int:
    """Bytes of every tensor the cache object holds (attributes, dicts, lists)."""
    def walk(v):
        if isinstance(v, torch.Tensor):
            return v.untyped_storage().nbytes()
        if isinstance(v, dict):
            return sum(walk(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return sum(walk(x) for x in v)
        return 0
    return walk(vars(obj))


def test_one_shard_per_epoch_and_at_most_one_epoch_in_memory(tmp_path):
    steps, batch, classes, epochs = 3, 4, 5, 6
    epoch_bytes = steps * batch * classes * 2  # float16
    bookkeeping = steps * (1 + 4)  # filled (uint8) + rows (int32)
    cache = GuideLogitCache(tmp_path, epochs, steps, batch, classes)
    logits = {(e, s): torch.randn(batch, classes) for e in range(epochs) for s in range(steps)}
    for e in range(epochs):
        for s in range(steps):
            assert cache.get(e, s) is None
            cache.put(e, s, logits[e, s])
            assert _held_tensor_bytes(cache) <= epoch_bytes + bookkeeping
        cache.flush()  # the trainer flushes at every epoch end
    shards = sorted(tmp_path.glob("epoch-*.safetensors"))
    assert [p.name for p in shards] == [f"epoch-{e:05d}.safetensors" for e in range(epochs)]
    assert len({p.stat().st_size for p in shards}) == 1  # every shard holds one epoch, none grows
    assert not list(tmp_path.glob(".*tmp"))  # nothing half-written left
    reader = GuideLogitCache(tmp_path, epochs, steps, batch, classes)
    for e in range(epochs):
        for s in range(steps):
            assert torch.equal(reader.get(e, s).float(), logits[e, s].half().float())
            # complete shards are read memory-mapped: no logits held, only the step bookkeeping
            assert _held_tensor_bytes(reader) <= bookkeeping
    assert (reader.hits, reader.misses) == (epochs * steps, 0)


def test_interrupted_epoch_is_kept_and_completed(tmp_path):
    cache = GuideLogitCache(tmp_path, 2, 3, 4, 5)
    z = [torch.randn(4, 5) for _ in range(3)]
    cache.put(0, 0, z[0])
    cache.put(0, 1, z[1])
    cache.flush()  # Ctrl-C after step 2 of epoch 1
    resumed = GuideLogitCache(tmp_path, 2, 3, 4, 5)
    assert torch.equal(resumed.get(0, 1).float(), z[1].half().float())
    assert resumed.get(0, 2) is None
    resumed.put(0, 2, z[2])
    resumed.flush()
    shard = load_file(str(tmp_path / "epoch-00000.safetensors"))
    assert shard["filled"].tolist() == [1, 1, 1] and shard["rows"].tolist() == [4, 4, 4]
    assert torch.equal(shard["logits"], torch.stack(z).half())


def test_damaged_shard_is_rebuilt(tmp_path):
    (tmp_path / "epoch-00000.safetensors").write_bytes(b"not a safetensors file")
    cache = GuideLogitCache(tmp_path, 1, 2, 4, 5)
    assert cache.get(0, 0) is None
    z = torch.randn(4, 5)
    cache.put(0, 0, z)
    cache.flush()
    assert torch.equal(GuideLogitCache(tmp_path, 1, 2, 4, 5).get(0, 0).float(), z.half().float())


def test_top_k_rule():
    assert top_k_for(10) is None and top_k_for(100) is None  # CIFAR-10/100: dense, exact
    assert top_k_for(101) == 20 and top_k_for(1000) == 20


def test_densify_keeps_the_partition_function_hand_computed():
    # C=4, k=2, T=1: top-2 = {3, 1}; rest = log(e^0 + e^ln2) = ln 3; fill = ln 3 - ln(4-2) = ln 1.5
    z = torch.tensor([[3.0, 1.0, 0.0, math.log(2.0)]])
    rec = sparsify(z, 2, 1.0)
    assert rec["indices"].tolist() == [[0, 1]] and rec["values"].tolist() == [[3.0, 1.0]]
    assert rec["rest"].item() == pytest.approx(math.log(3.0), abs=1e-6)
    full = densify(rec["values"], rec["indices"], rec["rest"], 4, 1.0)
    assert full[0].tolist() == pytest.approx([3.0, 1.0, math.log(1.5), math.log(1.5)], abs=1e-6)
    # T=2: top-2 = {4, 3}; rest = log(e^(0/2) + e^(2 ln3 / 2)) = ln 4; fill = 2 (ln 4 - ln 2) = 2 ln 2
    z = torch.tensor([[0.0, 4.0, 2.0 * math.log(3.0), 3.0]])
    rec = sparsify(z, 2, 2.0)
    assert rec["indices"].tolist() == [[1, 3]] and rec["rest"].item() == pytest.approx(math.log(4.0), abs=1e-6)
    full = densify(rec["values"], rec["indices"], rec["rest"], 4, 2.0)
    fill = 2.0 * math.log(2.0)
    assert full[0].tolist() == pytest.approx([fill, 4.0, fill, 3.0], abs=1e-6)
    # the KD target softmax(z/T) is unchanged on the top-k classes; the others share the rest
    p, q = torch.softmax(z / 2.0, 1), torch.softmax(full / 2.0, 1)
    assert q[0, [1, 3]].tolist() == pytest.approx(p[0, [1, 3]].tolist(), abs=1e-6)
    assert q[0, 0].item() == pytest.approx((p[0, 0] + p[0, 2]).item() / 2, abs=1e-6)


def test_top_k_cache_stores_sparse_rows_and_hits_equal_misses(tmp_path):
    classes, k, temperature = 150, 20, 4.0
    cache = GuideLogitCache(tmp_path, 1, 2, 8, classes, temperature=temperature)  # top_k "auto"
    assert cache.top_k == k
    z = torch.randn(8, classes) * 3
    used = cache.put(0, 0, z)
    cache.flush()
    with safe_open(str(tmp_path / "epoch-00000.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {"values", "indices", "rest", "filled", "rows"}
        assert tuple(f.get_slice("values").get_shape()) == (2, 8, k)
        assert f.get_slice("indices").get_dtype() == "I16"
    hit = GuideLogitCache(tmp_path, 1, 2, 8, classes, temperature=temperature).get(0, 0)
    assert torch.equal(hit, used)  # a run that reads trains exactly like the one that filled
    p, q = torch.softmax(z / temperature, 1), torch.softmax(used / temperature, 1)
    top = z.topk(k, dim=1).indices
    assert torch.allclose(q.gather(1, top), p.gather(1, top), rtol=5e-3, atol=1e-6)
    assert torch.allclose(q.sum(1), torch.ones(8))


def test_data_fingerprint_covers_the_pixels():
    data = synthetic_data(num_classes=10, n_train=64, n_test=16, seed=2)
    same = ImageSplit(data.train.images.clone(), data.train.labels.clone())
    changed = ImageSplit(data.train.images.clone(), data.train.labels.clone())
    changed.images[5, 0, 3, 3] ^= 1  # one pixel of one image: same counts, same labels
    assert data_fingerprint(data.train) == data_fingerprint(same)
    assert data_fingerprint(data.train) != data_fingerprint(changed)

    class OwnFingerprint:
        def fingerprint(self):
            return "abc"
    assert data_fingerprint(OwnFingerprint()) == "abc"  # a split that knows its own content


def _caches_for(data, tmp_path, monkeypatch, **overrides):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    cfg = resolve_config(DistillConfig, None, dict(teacher="t.safetensors", target="resnet8", epochs=1,
                                                   batch_size=16, cache_guides=True, **overrides))
    guide = torch.nn.Linear(3, 10)
    torch.manual_seed(0)
    guide.reset_parameters()
    open_caches = _guide_cache_opener(cfg, SimpleNamespace(num_processes=1), prepare_splits(cfg, data), 10,
                                      (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), cfg.mixed_precision)
    return open_caches([guide], 1, 4)


def test_regenerated_data_with_one_changed_image_misses(tmp_path, monkeypatch):
    data = synthetic_data(num_classes=10, n_train=64, n_test=16, seed=2)
    (cache,) = _caches_for(data, tmp_path, monkeypatch)
    cache.put(0, 0, torch.randn(16, 10))
    cache.flush()
    same = synthetic_data(num_classes=10, n_train=64, n_test=16, seed=2)  # regenerated, identical
    (again,) = _caches_for(same, tmp_path, monkeypatch)
    assert again.get(0, 0) is not None
    same.train.images[7, 1, 0, 0] ^= 1  # one image changed; counts and labels as before
    (changed,) = _caches_for(same, tmp_path, monkeypatch)
    assert changed.get(0, 0) is None and changed.directory != again.directory
    (no_aug,) = _caches_for(data, tmp_path, monkeypatch, augment=False)
    assert no_aug.get(0, 0) is None
    settings = json.loads((again.directory / "settings.json").read_text())
    assert settings["image_size"] == [3, 32, 32] and settings["augment"] == {"policy": "cifar", "pad": 4, "flip": True}
    assert settings["batch_code"] == guides_mod.BATCH_CODE_VERSION and settings["storage"] == {"format": "dense"}


def test_key_covers_image_size_batch_code_and_top_k_temperature(monkeypatch):
    cfg = SimpleNamespace(augment=True, seed=1, batch_size=16, channels_last=False, mixed_precision="no",
                          train_subset=None, val_fraction=0.0, temperature=4.0)
    split = synthetic_data(num_classes=10, n_train=32, n_test=8).train
    mean = std = (0.5, 0.5, 0.5)

    def key(input_size=(3, 32, 32), num_classes=10, **changes):
        return cache_key("w", cache_settings(SimpleNamespace(**{**vars(cfg), **changes}), split, input_size,
                                             mean, std, num_classes))
    base = key()
    assert key() == base
    assert key(input_size=(3, 64, 64)) != base
    assert key(temperature=2.0) == base  # dense logits do not depend on T ...
    assert key(num_classes=1000) != key(num_classes=1000, temperature=2.0)  # ... top-k rows do
    monkeypatch.setattr(guides_mod, "BATCH_CODE_VERSION", guides_mod.BATCH_CODE_VERSION + 1)
    assert key() != base


def test_fingerprint_changes_with_weights():
    a = create_model("resnet8")
    b = create_model("resnet8")
    b.load_state_dict(a.state_dict())
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        b.linear.bias[0] += 1
    assert weights_fingerprint(a) != weights_fingerprint(b)


def test_second_run_hits_the_cache_and_trains_the_same_student(tmp_path, monkeypatch, pretrained_teacher):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    data = synthetic_data(num_classes=10, n_train=64, n_test=16, seed=2)

    def run(name):
        cfg = resolve_config(DistillConfig, None, dict(teacher=str(pretrained_teacher), target="resnet8",
                                                       epochs=2, batch_size=16, out=str(tmp_path / name),
                                                       latency_backend="none", cache_guides=True,
                                                       assistants="resnet14",
                                                       gate_guides=False))  # both guides teach: both cached
        run_distillation(cfg, data=data, show_progress=False)
        lines = (tmp_path / name / "stages" / "2-resnet8" / "metrics.jsonl").read_text().splitlines()
        last = json.loads(lines[-1])
        return last["guide_cache_hits_misses"], last["unlabeled_cache_hits_misses"]

    (first, first_mixed), (second, second_mixed) = run("a"), run("b")
    # first run: the teacher's logits were stored by stage 1 (same batches), so the student
    # stage finds all of them; the assistant's are new
    (t_hits, t_misses), (a_hits, a_misses) = first
    assert t_misses == 0 and t_hits > 0 and a_misses > 0
    assert all(misses == 0 and hits > 0 for hits, misses in second)
    # the mixed training images (kd_mixup, on for a set this small) have caches of their own, used the same way
    (t_hits, t_misses), (a_hits, a_misses) = first_mixed
    assert t_misses == 0 and t_hits > 0 and a_misses > 0
    assert all(misses == 0 and hits > 0 for hits, misses in second_mixed)
    a = load_file(str(tmp_path / "a" / "student.safetensors"))
    b = load_file(str(tmp_path / "b" / "student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    folders = sorted(p for p in (tmp_path / "cache" / "guides").iterdir())
    assert len(folders) == 4  # teacher + assistant, labelled and mixed images, one shard per epoch each
    assert all(sorted(p.name for p in f.glob("epoch-*")) == ["epoch-00000.safetensors", "epoch-00001.safetensors"]
               for f in folders)
