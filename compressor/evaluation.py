"""Evaluate a checkpoint on a dataset's test split (torch)."""
from __future__ import annotations

from .checkpoint import file_sha256, load_model
from .data import load_data, make_loader
from .errors import CompressError
from .trainer import evaluate


def evaluate_model(model, split, *, mean, std, batch_size: int = 256, device="cpu") -> dict:
    """Top-1/top-5 (%) and loss of ``model`` on ``split`` (the training loop's :func:`evaluate`)."""
    return evaluate(None, model.to(device), make_loader(split, batch_size, shuffle=False), mean=mean, std=std)


def evaluate_checkpoint(path, data: str, *, batch_size: int = 256, arch: str | None = None,
                        trust_code: bool = False, ignore_class_names: bool = False) -> dict:
    """Metrics of the checkpoint at ``path`` on ``data``'s test split, plus its provenance
    (``sha256`` of the file and the ``source`` its metadata records)."""
    from .pipeline import check_class_names

    model, meta = load_model(path, arch=arch, trust_code=trust_code)
    bundle = load_data(data)
    if meta.num_classes != bundle.num_classes:
        raise CompressError(f"{path} predicts {meta.num_classes} classes but {data} has {bundle.num_classes}; "
                            f"evaluate on matching data")
    if tuple(meta.input_size)[0] != bundle.input_size[0]:
        raise CompressError(f"{path} takes {meta.input_size[0]}-channel images but {data} has {bundle.input_size[0]}")
    check_class_names(meta, bundle, "model", ignore=ignore_class_names)
    result = evaluate_model(model, bundle.test, mean=meta.mean, std=meta.std, batch_size=batch_size)
    return {**result, "sha256": file_sha256(path), "source": meta.source}
