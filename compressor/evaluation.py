"""One home for "how good is this model on this data", shared by the torch and the ONNX paths.

* :func:`accuracy` / :class:`Accuracy` -- top-1, top-5 and mean cross-entropy from
  logits and labels, with ONE tie rule: among equal logits the lowest class index
  ranks first (a stable sort). ``trainer.evaluate`` (torch), ``export.runtime``
  (ONNX), the provider table and the INT8 search all count with it.
* :func:`check_data_fits` -- "does this model fit this data": class count, channels,
  size (where the model's size is fixed) and class names.
* :func:`load_data_for_model` -- a data spec at a model's (C, H, W) with the
  evaluation transform of the augmentation policy it was trained with;
  :func:`sample_arrays` decodes only a seeded sample spread over the classes.
* :func:`evaluate_checkpoint` -- ``compress eval`` of a ``.safetensors`` file.

Images of another size are resized (shorter side) and center-cropped with the
model's evaluation transform; the bundle's ``notes`` say what was done.
No module here imports the deployment package (``export``).
"""
from __future__ import annotations

import numpy as np

from .checkpoint import file_sha256, load_model
from .data import DataBundle, load_data, make_loader, subset
from .errors import CompressError

TOP_K = 5
SMALL_SAMPLE = 64  # a sample this small is decoded in this process (no loader workers to start)


# ------------------------------------------------------------------ accuracy
def ranked(logits) -> np.ndarray:
    """Class indices of each row by decreasing logit; ties: the lowest index first (stable).

    NaN logits rank last. Row ``i``'s prediction is ``ranked(logits)[i, 0]``.
    """
    a = np.asarray(logits, dtype=np.float64)
    if a.ndim != 2:
        raise CompressError(f"logits must be (N, classes), got shape {a.shape}")
    return np.argsort(-a, axis=1, kind="stable")


def predictions(logits) -> np.ndarray:
    """Top-1 class per row under the tie rule of :func:`ranked`."""
    return ranked(logits)[:, 0]


def batch_counts(logits, labels, k: int = TOP_K) -> tuple[int, int, float, int]:
    """``(top-1 hits, top-k hits, summed cross-entropy, n)`` of one batch (numpy or torch inputs)."""
    a = _as_numpy(logits).astype(np.float64)
    y = _as_numpy(labels).astype(np.int64).reshape(-1)
    if a.ndim != 2 or a.shape[0] != y.shape[0]:
        raise CompressError(f"logits {a.shape} and labels {y.shape} do not match")
    if len(y) == 0:
        return 0, 0, 0.0, 0
    if y.max() >= a.shape[1] or y.min() < 0:
        raise CompressError(f"labels go up to {int(y.max())} but the model has {a.shape[1]} outputs")
    order = ranked(a)[:, :min(int(k), a.shape[1])]
    top1 = int((order[:, 0] == y).sum())
    topk = int((order == y[:, None]).any(axis=1).sum())
    shifted = a - a.max(axis=1, keepdims=True)
    loss = float((np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(y)), y]).sum())
    return top1, topk, loss, int(len(y))


class Accuracy:
    """Running top-1/top-5 (%) and mean cross-entropy over batches (:func:`batch_counts`)."""

    def __init__(self, k: int = TOP_K):
        self.k = k
        self.top1 = self.topk = self.n = 0
        self.loss = 0.0

    def update(self, logits, labels) -> None:
        c1, ck, loss, n = batch_counts(logits, labels, self.k)
        self.top1 += c1
        self.topk += ck
        self.loss += loss
        self.n += n

    def result(self) -> dict:
        n = max(self.n, 1)
        return {"top1": 100.0 * self.top1 / n, "top5": 100.0 * self.topk / n, "loss": self.loss / n, "n": self.n}


def accuracy(logits, labels, k: int = TOP_K) -> dict:
    """``{"top1": %, "top5": %, "loss": mean cross-entropy, "n"}`` of one set of logits."""
    acc = Accuracy(k)
    acc.update(logits, labels)
    return acc.result()


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, maybe on an accelerator
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


# ---------------------------------------------------------------- fits-check
def check_class_names(meta, bundle, what: str, *, ignore: bool = False) -> None:
    """``meta`` (a checkpoint's) and ``bundle`` must name the same classes in the same order.

    Skipped when either side stores no names (imported weights without
    ``--class-names``), for the placeholder names of ``synthetic_data``, or with
    ``ignore`` (``--ignore-class-names``).
    """
    ours, theirs = list(getattr(meta, "class_names", []) or []), list(getattr(bundle, "class_names", []) or [])
    if ignore or not ours or not theirs or ours == theirs or getattr(bundle, "name", "") == "synthetic":
        return
    if sorted(ours) == sorted(theirs):
        diff = [f"#{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(ours, theirs)) if a != b][:3]
        what_differs = "the same class names in another order (" + ", ".join(diff) + ")"
    else:
        only_model = [c for c in ours if c not in theirs][:3]
        only_data = [c for c in theirs if c not in ours][:3]
        what_differs = (f"other class names ({what} only: {', '.join(map(repr, only_model)) or '-'}; "
                        f"data only: {', '.join(map(repr, only_data)) or '-'})")
    raise CompressError(f"{what} and data have {what_differs}; use the data the {what} was trained on, "
                        f"or pass --ignore-class-names if the names were never stored meaningfully")


def check_data_fits(bundle, *, what: str = "model", where=None, meta=None, chw=None, num_classes=None,
                    data_chw=None, fixed_size: bool = False, ignore_class_names: bool = False) -> None:
    """Refuse (one line) a model that does not fit ``bundle``: one rule for torch and ONNX.

    The model is ``meta`` (a checkpoint's metadata) and/or ``chw``/``num_classes``
    (e.g. an ONNX graph's; ``None`` entries are unknown and not checked); ``what``
    names it in the message (``model``, ``teacher``), ``where`` (a path) prefixes
    it. The data's (C, H, W) is ``data_chw``, else its test split's. Checked: the
    class count, the channels, with ``fixed_size`` the height and width (an ONNX
    graph or a validation input), and the class names (:func:`check_class_names`).
    """
    at = f"{where}: " if where else ""
    chw = tuple(chw) if chw is not None else (tuple(int(v) for v in meta.input_size) if meta is not None else None)
    if num_classes is None and meta is not None:
        num_classes = meta.num_classes
    split = bundle.test if getattr(bundle, "test", None) is not None else getattr(bundle, "train", None)
    data_chw = tuple(int(v) for v in (data_chw if data_chw is not None else split.input_size))
    data_classes = getattr(bundle, "num_classes", None)
    if data_classes is not None and num_classes is not None and int(data_classes) != int(num_classes):
        raise CompressError(f"{at}{what} has {num_classes} classes but the data has {data_classes}; "
                            f"use data with the same classes or a matching {what}")
    if chw is not None:
        if fixed_size and any(m is not None and int(m) != d for m, d in zip(chw, data_chw)):
            raise CompressError(f"{at}{what} input (C,H,W)={tuple(chw)} does not fit the data's images "
                                f"(C,H,W)={data_chw}; use data of the size the {what} was trained on")
        if chw[0] is not None and int(chw[0]) != data_chw[0]:
            raise CompressError(f"{at}{what} takes {chw[0]}-channel images but the data has {data_chw[0]} "
                                f"channels; use data with the channels the {what} was trained on")
    if meta is not None:
        try:
            check_class_names(meta, bundle, what, ignore=ignore_class_names)
        except CompressError as exc:
            raise CompressError(f"{at}{exc}") from None


# ---------------------------------------------------------------------- data
def load_data_for_model(meta, data: str, *, splits=("test",), image_size=None, mode: str = "auto",
                        skip_bad_images: bool = False, sample: int | None = None, seed: int = 0) -> DataBundle:
    """``splits`` of ``data`` at the model's (C, H, W) (``image_size`` overrides H, W), with the
    evaluation transform of the augmentation policy the model was trained with. One rule for
    every path that puts data in front of a trained model: ``compress eval`` (torch and ONNX),
    export validation and calibration, the INT8 search and the provider table. With
    ``meta=None`` (an ONNX file without compress metadata) the data is loaded as it is.

    ``sample``: only that many images of each split, seeded and spread over the classes
    (:func:`compressor.data.sampling.load_sample`): only those files are decoded."""
    view = {}
    if meta is not None:
        view = dict(image_size=image_size or tuple(int(v) for v in meta.input_size[1:]),
                    channels=int(meta.input_size[0]), augment=(meta.metrics or {}).get("augment", "cifar"))
    elif image_size is not None:
        view = dict(image_size=image_size)
    if sample is None:
        return load_data(str(data), splits=splits, mode=mode, skip_bad_images=skip_bad_images, **view)
    from .data.sampling import load_sample

    parts = {s: load_sample(str(data), s, int(sample), int(seed), skip_bad_images=skip_bad_images, **view)
             for s in splits}
    if len(parts) == 1:
        return parts[splits[0]]
    train, test = parts["train"], parts["test"]
    return DataBundle(name=test.name, train=train.train, test=test.test, class_names=list(test.class_names),
                      source=test.source, mode=test.mode, skipped=train.skipped + test.skipped,
                      notes=test.notes + [n for n in train.notes if n not in test.notes], augment=test.augment,
                      view=test.view, decoded=(train.decoded or 0) + (test.decoded or 0))


def sample_indices(split, n: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``n`` samples of ``split`` spread over its classes (seeded); all when
    ``n`` is ``None`` or not smaller than the split. Test splits are often sorted by class:
    the first ``n`` would all be class 0."""
    from .data.sampling import spread_indices

    total = len(split)
    if n is None or int(n) >= total:
        return np.arange(total, dtype=np.int64)
    if int(n) < 1:
        raise CompressError(f"a sample needs at least one image, got {n}")
    idx = np.asarray(spread_indices(_as_numpy(split.labels), int(n), int(seed)), dtype=np.int64)
    return np.sort(idx)


def split_arrays(split, batch_size: int = 256):
    """``(uint8 images (N, C, H, W), int64 labels)`` numpy arrays of a whole split, decoding a
    streamed one (keep it small: see :func:`sample_arrays`)."""
    if hasattr(split, "images"):
        images = split.images.numpy() if hasattr(split.images, "numpy") else np.asarray(split.images)
        labels = split.labels.numpy() if hasattr(split.labels, "numpy") else np.asarray(split.labels)
        return images, labels.astype(np.int64)
    parts = list(split_batches(split, batch_size))
    if not parts:
        c, h, w = split.input_size
        return np.zeros((0, c, h, w), np.uint8), np.zeros((0,), np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def split_batches(split, batch_size: int = 256):
    """``(uint8 images, int64 labels)`` numpy batches of a split, in order (either backend)."""
    if hasattr(split, "images"):
        images, labels = split_arrays(split)
        for start in range(0, len(labels), batch_size):
            yield images[start:start + batch_size], labels[start:start + batch_size]
        return
    workers = 0 if len(split) <= SMALL_SAMPLE else None
    for x, y in make_loader(split, batch_size, shuffle=False, pin_memory=False, workers=workers):
        yield x.numpy(), y.numpy().astype(np.int64)


def sample_arrays(split, n: int | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images of ``split`` spread over its classes (:func:`sample_indices`), as uint8
    ``(N, C, H, W)`` and int64 labels. Only those images are decoded from a streamed split."""
    idx = sample_indices(split, n, seed)
    if len(idx) == len(split):
        return split_arrays(split)
    return split_arrays(subset(split, idx))


# ------------------------------------------------------------------- torch
def evaluate_model(model, split, *, mean, std, batch_size: int = 256, device="cpu") -> dict:
    """Top-1/top-5 (%) and loss of ``model`` on ``split`` (the training loop's :func:`evaluate`, fp32)."""
    from .trainer import evaluate

    return evaluate(None, model.to(device), make_loader(split, batch_size, shuffle=False), mean=mean, std=std)


def evaluate_checkpoint(path, data: str, *, batch_size: int = 256, arch: str | None = None, image_size=None,
                        mode: str = "auto", skip_bad_images: bool = False, notes: list | None = None,
                        trust_code: bool = False, ignore_class_names: bool = False,
                        accept_code_change: bool = False) -> dict:
    """Metrics of the checkpoint at ``path`` on the test split of ``data``, plus its provenance
    (``sha256`` of the file and the ``source`` its metadata records); ``notes`` (a list)
    receives how the data was loaded. Computed in fp32, as the deployed file runs."""
    model, meta = load_model(path, arch=arch, trust_code=trust_code, accept_code_change=accept_code_change)
    bundle = load_data_for_model(meta, data, image_size=image_size, mode=mode, skip_bad_images=skip_bad_images)
    check_data_fits(bundle, where=path, meta=meta, ignore_class_names=ignore_class_names)
    if notes is not None:
        notes.extend(bundle.notes)
    result = evaluate_model(model, bundle.test, mean=meta.mean, std=meta.std, batch_size=batch_size)
    return {**result, "sha256": file_sha256(path), "source": meta.source}
