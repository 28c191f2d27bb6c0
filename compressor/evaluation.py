"""Evaluate a checkpoint on a dataset's test split (torch).

Only the test split is read. Images are brought to the size and channels the
model was trained at (recorded in the checkpoint): data of another size is
resized (shorter side) and center-cropped with the model's evaluation
transform -- the same rule as ``export.runtime.evaluate_onnx``. The
bundle's ``notes`` say what was done.
"""
from __future__ import annotations

from .checkpoint import file_sha256, load_model
from .data import DataBundle, load_data, make_loader
from .errors import CompressError
from .trainer import evaluate


def evaluate_model(model, split, *, mean, std, batch_size: int = 256, device="cpu") -> dict:
    """Top-1/top-5 (%) and loss of ``model`` on ``split`` (the training loop's :func:`evaluate`)."""
    return evaluate(None, model.to(device), make_loader(split, batch_size, shuffle=False), mean=mean, std=std)


def load_data_for_model(meta, data: str, *, splits=("test",), image_size=None, mode: str = "auto",
                        skip_bad_images: bool = False) -> DataBundle:
    """``splits`` of ``data`` at the model's (C, H, W) (``image_size`` overrides H, W), with the
    evaluation transform of the augmentation policy the model was trained with. One rule for the
    torch path (:func:`evaluate_checkpoint`) and the ONNX path (``export.runtime.load_bundle``)."""
    size = image_size or tuple(int(v) for v in meta.input_size[1:])
    return load_data(str(data), image_size=size, channels=int(meta.input_size[0]), splits=splits, mode=mode,
                     augment=(meta.metrics or {}).get("augment", "cifar"), skip_bad_images=skip_bad_images)


def evaluate_checkpoint(path, data: str, *, batch_size: int = 256, arch: str | None = None, image_size=None,
                        mode: str = "auto", skip_bad_images: bool = False, notes: list | None = None,
                        trust_code: bool = False, ignore_class_names: bool = False) -> dict:
    """Metrics of the checkpoint at ``path`` on the test split of ``data``, plus its provenance
    (``sha256`` of the file and the ``source`` its metadata records); ``notes`` (a list)
    receives how the data was loaded."""
    from .pipeline import check_class_names

    model, meta = load_model(path, arch=arch, trust_code=trust_code)
    bundle = load_data_for_model(meta, data, image_size=image_size, mode=mode, skip_bad_images=skip_bad_images)
    if meta.num_classes != bundle.num_classes:
        raise CompressError(f"{path} predicts {meta.num_classes} classes but {data} has {bundle.num_classes}; "
                            f"evaluate on matching data")
    if tuple(meta.input_size)[0] != bundle.input_size[0]:
        raise CompressError(f"{path} takes {meta.input_size[0]}-channel images but {data} has {bundle.input_size[0]}")
    if notes is not None:
        notes.extend(bundle.notes)
    check_class_names(meta, bundle, "model", ignore=ignore_class_names)
    result = evaluate_model(model, bundle.test, mean=meta.mean, std=meta.std, batch_size=batch_size)
    return {**result, "sha256": file_sha256(path), "source": meta.source}
