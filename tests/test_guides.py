"""Guide set and the guide-logit cache (--cache-guides)."""
import json

import torch
from safetensors.torch import load_file

from compressor.config import DistillConfig, resolve_config
from compressor.data import synthetic_data
from compressor.guides import GuideLogitCache, GuideSet, weights_fingerprint
from compressor.models import create_model
from compressor.pipeline import run_distillation


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
    cache = GuideLogitCache(tmp_path / "c.safetensors", epochs=2, steps=3, batch_size=4, num_classes=5)
    z = torch.randn(3, 5)  # a short last batch
    assert cache.get(1, 2) is None
    cache.put(1, 2, z)
    cache.flush()
    again = GuideLogitCache(tmp_path / "c.safetensors", epochs=2, steps=3, batch_size=4, num_classes=5)
    got = again.get(1, 2)
    assert got.shape == (3, 5) and torch.allclose(got.float(), z, atol=1e-2)
    assert again.get(0, 0) is None and (again.hits, again.misses) == (1, 1)


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
                                                       latency_backend="none", cache_guides=True))
        run_distillation(cfg, data=data, show_progress=False)
        lines = (tmp_path / name / "stages" / "2-resnet8" / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["guide_cache_hits_misses"]

    first = run("a")
    second = run("b")
    # first run: the teacher's logits were stored by stage 1 (same batches), so the student
    # stage finds all of them; the assistant's are new
    (t_hits, t_misses), (a_hits, a_misses) = first
    assert t_misses == 0 and t_hits > 0 and a_misses > 0
    assert all(misses == 0 and hits > 0 for hits, misses in second)
    a = load_file(str(tmp_path / "a" / "student.safetensors"))
    b = load_file(str(tmp_path / "b" / "student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "cache" / "guides").glob("*.safetensors"))) == 2  # teacher + assistant
