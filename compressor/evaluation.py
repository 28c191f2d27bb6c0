"""Evaluate a checkpoint on a dataset's test split (torch)."""
from __future__ import annotations

import torch

from .checkpoint import load_model
from .data import load_data, make_loader, normalize
from .errors import CompressError


@torch.inference_mode()
def evaluate_model(model, split, *, mean, std, batch_size: int = 256, device="cpu") -> dict:
    model = model.to(device).eval()
    correct1 = correct5 = 0
    loss_sum = 0.0
    for images, labels in make_loader(split, batch_size, shuffle=False):
        logits = model(normalize(images.to(device), mean, std)).float()
        labels = labels.to(device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == labels).sum())
        correct5 += int((top == labels[:, None]).any(dim=1).sum())
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
    n = max(len(split), 1)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n, "n": len(split)}


def evaluate_checkpoint(path, data: str, *, batch_size: int = 256, arch: str | None = None) -> dict:
    model, meta = load_model(path, arch=arch)
    bundle = load_data(data)
    if meta.num_classes != bundle.num_classes:
        raise CompressError(f"{path} predicts {meta.num_classes} classes but {data} has {bundle.num_classes}; "
                            f"evaluate on matching data")
    if tuple(meta.input_size)[0] != bundle.input_size[0]:
        raise CompressError(f"{path} takes {meta.input_size[0]}-channel images but {data} has {bundle.input_size[0]}")
    return evaluate_model(model, bundle.test, mean=meta.mean, std=meta.std, batch_size=batch_size)
