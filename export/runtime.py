"""Run exported models with onnxruntime: :class:`OnnxModel` and :func:`evaluate_onnx`.

An :class:`OnnxModel` reads the compress metadata stored in the file
(``metadata_props``), so it knows the input shape, the normalisation and
whether the normalisation is folded into the graph (``preprocessing``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from compressor.checkpoint import CheckpointMeta, check_readable_file, file_sha256
from compressor.errors import CompressError

from .onnx_export import meta_from_onnx_props
from .options import GRAPH_OPT_LEVELS
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
MAX_DEFAULT_THREADS = 8


def default_threads() -> int:
    """Intra-op threads when none are given: the usable cores, capped at 8.

    Small CNNs stop scaling long before that, and more threads only add
    synchronisation noise to latency measurements.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_DEFAULT_THREADS))


def resolve_providers(providers=None) -> list[str]:
    """``None``/``"cpu"``/``"cuda"``/a list of provider names -> onnxruntime provider list.

    ``"cuda"`` needs the CUDA provider to be available (onnxruntime-gpu and a GPU);
    otherwise this is a :class:`CompressError`.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [providers]
    out = []
    for p in providers:
        name = PROVIDER_ALIASES.get(str(p).lower(), str(p))
        if name not in available:
            hint = (" (install onnxruntime-gpu and run on a machine with a CUDA GPU)"
                    if name == "CUDAExecutionProvider" else "")
            raise CompressError(
                f"execution provider {p!r} is not available{hint}; available: {', '.join(available)}"
            )
        out.append(name)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")  # fallback for ops the accelerator lacks
    return out


def graph_opt_level(name: str):
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    key = str(name).lower()
    if key not in levels:
        raise CompressError(f"unknown graph optimisation level {name!r}; use one of {', '.join(GRAPH_OPT_LEVELS)}")
    return levels[key]


def check_onnx_file(path) -> Path:
    """A readable ONNX file whose external data (if any) stays inside its own folder."""
    p = check_readable_file(path, "ONNX model")
    check_external_data(p)
    return p


def check_external_data(path) -> None:
    """Refuse ONNX files whose tensors point at data outside the model's folder.

    An ONNX tensor may keep its bytes in a side file named by a ``location``
    string. A crafted file can name ``../../etc/passwd`` or an absolute path,
    so that loading the model reads (and a benchmark or an error message may
    echo) any file the user can read. Only plain relative paths that resolve
    (symlinks included) inside the model's own folder are accepted. onnx and
    onnxruntime check this too in current versions; this check does not depend
    on them and names the tensor.
    """
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    p = Path(path)
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception:
        return  # not parseable: onnxruntime reports it as "not a loadable ONNX model"
    root = p.resolve().parent
    for tensor in _get_all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (root / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(root):
            raise CompressError(
                f"{p}: tensor {tensor.name!r} reads its data from {location!r}, outside the model's folder; "
                f"refusing to load it (re-export the model, or keep its .data file next to the .onnx file)")


class OnnxModel:
    """An onnxruntime session plus the model's compress metadata.

    ``threads`` pins the intra-op thread count (default :func:`default_threads`);
    ``providers`` is ``"cpu"``, ``"cuda"``, ``"openvino"`` (see :mod:`export.providers`)
    or a list of provider names; ``precision`` (``f32``/``bf16``) is OpenVINO's
    inference precision hint; ``graph_optimization`` is one of ``disable|basic|extended|all``.
    """

    def __init__(self, path, threads: int | None = None, providers=None, graph_optimization: str = "all",
                 precision: str = "f32"):
        import onnxruntime as ort

        from .providers import OPENVINO_EP, add_openvino, check_precision

        self.path = check_onnx_file(path)
        self.threads = int(threads) if threads else default_threads()
        if self.threads < 1:
            raise CompressError(f"threads must be >= 1, got {threads}")
        self.graph_optimization = str(graph_optimization).lower()
        openvino = isinstance(providers, str) and providers.lower() == "openvino"
        self.precision = check_precision("openvino" if openvino else "cpu", precision)
        self.providers = [OPENVINO_EP, "CPUExecutionProvider"] if openvino else resolve_providers(providers)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = graph_opt_level(self.graph_optimization)
        opts.log_severity_level = 3
        if openvino:  # a plugin EP is added to the options by device, not named in providers=
            add_openvino(opts, self.precision, self.threads)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts,
                                                providers=None if openvino else self.providers)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CompressError(
                f"{self.path}: not a loadable ONNX model ({reason[:300]}); "
                f"export one with 'compress export --onnx'"
            ) from None
        inputs = self.session.get_inputs()
        outputs = self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise CompressError(f"{self.path}: expected one image input and a logits output, "
                                f"got {len(inputs)} inputs / {len(outputs)} outputs")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        shape = list(inputs[0].shape)
        self.input_shape = tuple(int(d) if isinstance(d, int) else None for d in shape[1:])
        out_shape = list(outputs[0].shape)
        self.output_classes = int(out_shape[-1]) if out_shape and isinstance(out_shape[-1], int) else None
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.preprocessing = self.metadata.get("preprocessing", "none")
        if self.preprocessing not in ("none", "normalize"):
            raise CompressError(f"{self.path}: unknown preprocessing {self.preprocessing!r} in metadata")
        self.meta: CheckpointMeta | None = (
            meta_from_onnx_props(self.metadata, str(self.path)) if "arch" in self.metadata else None
        )
        self.active_providers = self.session.get_providers()

    # ------------------------------------------------------------------ info
    @property
    def provider(self) -> str:
        return self.active_providers[0]

    @property
    def num_classes(self) -> int | None:
        if self.meta is not None:
            return self.meta.num_classes
        return self.output_classes

    @property
    def chw(self) -> tuple:
        """(C, H, W) the model takes: from metadata, else from the graph input."""
        if self.meta is not None:
            return tuple(int(v) for v in self.meta.input_size)
        return self.input_shape

    def require_meta(self) -> CheckpointMeta:
        if self.meta is None:
            raise CompressError(
                f"{self.path}: ONNX file has no compress metadata (arch, mean, std ...); "
                f"export it with 'compress export --onnx'"
            )
        return self.meta

    # ------------------------------------------------------------- inference
    def predict(self, batch) -> np.ndarray:
        """Logits for a float batch in the model's input space (see :meth:`prepare`)."""
        x = np.ascontiguousarray(np.asarray(batch, dtype=np.float32))
        return self.session.run([self.output_name], {self.input_name: x})[0]

    __call__ = predict

    def prepare(self, images) -> np.ndarray:
        """uint8 images (N, C, H, W) -> what the graph takes: normalised floats, or
        floats in [0, 1] when the normalisation is inside the graph."""
        images = np.asarray(images)
        if images.dtype == np.uint8:
            raw = images.astype(np.float32) / 255.0
        else:
            raw = images.astype(np.float32)
        if self.preprocessing == "normalize":
            return raw
        meta = self.require_meta()
        return normalize_float(raw, meta.mean, meta.std)

    def predict_images(self, images) -> np.ndarray:
        return self.predict(self.prepare(images))

    def random_input(self, batch: int, seed: int = 0) -> np.ndarray:
        """A random batch in the graph's input space (for timing)."""
        if any(d is None for d in self.chw):
            raise CompressError(f"{self.path}: input shape {self.chw} is not fully known; cannot make inputs")
        rng = np.random.default_rng(seed)
        shape = (int(batch), *self.chw)
        if self.preprocessing == "normalize":
            return rng.random(shape, dtype=np.float32)
        return rng.standard_normal(shape, dtype=np.float32)


def normalize_float(raw, mean, std) -> np.ndarray:
    c = len(mean)
    m = np.asarray(mean, dtype=np.float32).reshape(1, c, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, c, 1, 1)
    return ((np.asarray(raw, dtype=np.float32) - m) / s).astype(np.float32)


def load_bundle(data, meta: CheckpointMeta | None = None, *, splits=("train", "test"), image_size=None,
                mode: str = "auto", skip_bad_images: bool = False):
    """A data spec (``demo``, a CIFAR folder, an ImageFolder root) or an already loaded bundle.

    With ``meta`` (a model's metadata) a spec is loaded at the model's channels and
    size (``image_size`` overrides H, W) with its evaluation transform: data of
    another size is resized (shorter side) and center-cropped, the same rule as
    ``compress eval`` of a checkpoint. ``bundle.notes`` says what was done.
    """
    if isinstance(data, (str, os.PathLike)):
        from compressor.data import load_data
        from compressor.evaluation import load_data_for_model

        if meta is None:
            return load_data(str(data), splits=splits, mode=mode, skip_bad_images=skip_bad_images)
        return load_data_for_model(meta, data, splits=splits, image_size=image_size, mode=mode,
                                   skip_bad_images=skip_bad_images)
    if not hasattr(data, "test"):
        raise CompressError(f"expected a data spec or a DataBundle, got {type(data).__name__}")
    return data


def _split_batches(split, batch_size: int = 256):
    """``(uint8 images, int64 labels)`` numpy batches of a split, in order (either backend)."""
    from compressor.data import make_loader

    if hasattr(split, "images"):
        images, labels = _split_arrays(split)
        for start in range(0, len(labels), batch_size):
            yield images[start:start + batch_size], labels[start:start + batch_size]
        return
    for x, y in make_loader(split, batch_size, shuffle=False, pin_memory=False):
        yield x.numpy(), y.numpy().astype(np.int64)


def _split_arrays(split):
    if not hasattr(split, "images"):  # a streamed split: decode it (export checks use a few hundred images)
        parts = list(_split_batches(split))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    images = np.asarray(split.images.numpy() if hasattr(split.images, "numpy") else split.images)
    labels = np.asarray(split.labels.numpy() if hasattr(split.labels, "numpy") else split.labels).astype(np.int64)
    return images, labels


def check_fits_data(model: OnnxModel, bundle, images=None, *, ignore_class_names: bool = False) -> None:
    """The model's (C, H, W), class count and class names must match the data (``images``, else the
    test split's size)."""
    data_chw = tuple(int(v) for v in (images.shape[1:] if images is not None else bundle.test.input_size))
    model_chw = tuple(model.chw)
    graph_chw = tuple(model.input_shape)
    if model_chw != data_chw or any(g is not None and g != d for g, d in zip(graph_chw, data_chw)):
        raise CompressError(
            f"{model.path}: model input (C,H,W)={model_chw} does not fit the data's images "
            f"(C,H,W)={data_chw}; use data of the size the model was trained on"
        )
    data_classes = getattr(bundle, "num_classes", None)
    if data_classes is not None and model.num_classes is not None and int(data_classes) != int(model.num_classes):
        raise CompressError(
            f"{model.path}: model has {model.num_classes} classes but the data has {data_classes}; "
            f"evaluate on the dataset the model was trained for"
        )
    if model.meta is not None:
        from compressor.pipeline import check_class_names

        check_class_names(model.meta, bundle, "model", ignore=ignore_class_names)


def evaluate_arrays(model: OnnxModel, images, labels, batch_size: int = 256) -> dict:
    """top-1 / top-5 (percent), mean cross-entropy and count over uint8 images."""
    if batch_size < 1:
        raise CompressError(f"batch_size must be >= 1, got {batch_size}")
    return evaluate_batches(model, ((images[s:s + batch_size], labels[s:s + batch_size])
                                    for s in range(0, int(len(labels)), batch_size)))


def evaluate_batches(model: OnnxModel, batches) -> dict:
    """:func:`evaluate_arrays` over an iterable of ``(uint8 images, labels)`` batches."""
    k = min(5, model.num_classes or 5)
    correct1 = correct5 = 0
    loss_sum = 0.0
    n = 0
    for images, y in batches:
        x = model.prepare(images)
        n += int(len(y))
        logits = model.predict(x).astype(np.float64)
        if y.max(initial=0) >= logits.shape[1] or y.min(initial=0) < 0:
            raise CompressError(f"labels go up to {int(y.max())} but the model has {logits.shape[1]} outputs")
        shifted = logits - logits.max(axis=1, keepdims=True)
        logsumexp = np.log(np.exp(shifted).sum(axis=1))
        loss_sum += float((logsumexp - shifted[np.arange(len(y)), y]).sum())
        topk = np.argsort(-logits, axis=1)[:, :k]
        correct1 += int((topk[:, 0] == y).sum())
        correct5 += int((topk == y[:, None]).any(axis=1).sum())
    if n == 0:
        raise CompressError("the test split is empty; nothing to evaluate")
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n, "n": n}


def evaluate_onnx(path, data, batch_size: int = 256, *, threads: int | None = None, providers=None,
                  image_size=None, mode: str = "auto", skip_bad_images: bool = False,
                  notes: list | None = None, ignore_class_names: bool = False) -> dict:
    """Evaluate an ONNX model (path or :class:`OnnxModel`) on the test split of ``data``.

    Only the test split is read, at the model's (C, H, W) from its metadata
    (see :func:`load_bundle`). Returns ``{"top1": %, "top5": %, "loss": mean
    cross-entropy, "n": images}``; ``notes`` (a list) receives how the data was loaded.
    """
    model = path if isinstance(path, OnnxModel) else OnnxModel(path, threads=threads, providers=providers)
    bundle = load_bundle(data, model.meta, splits=("test",), image_size=image_size, mode=mode,
                         skip_bad_images=skip_bad_images)
    if batch_size < 1:
        raise CompressError(f"batch_size must be >= 1, got {batch_size}")
    check_fits_data(model, bundle, ignore_class_names=ignore_class_names)
    if notes is not None:
        notes.extend(getattr(bundle, "notes", []))
    result = evaluate_batches(model, _split_batches(bundle.test, batch_size))
    props = model.metadata
    source = props.get("source", "")
    if props.get("source_checkpoint"):
        source = (f"{source}; " if source else "") + (f"exported from {props['source_checkpoint']} "
                                                      f"(sha256 {props.get('source_sha256', '?')[:16]})")
    return {**result, "sha256": file_sha256(model.path), "source": source}
