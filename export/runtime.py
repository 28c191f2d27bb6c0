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

from .machine import default_threads
from .onnx_export import meta_from_onnx_props
from .options import GRAPH_OPT_LEVELS
from .providers import OPENVINO_EP, add_openvino, check_precision, resolve_providers

__all__ = ["OnnxModel", "default_threads", "evaluate_onnx", "load_bundle", "resolve_providers"]


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


def check_input_shape(shape, path) -> tuple:
    """``(C, H, W)`` of a graph input shape ``(N, C, H, W)`` (``None`` for a symbolic dim); refuses
    another rank, and static dims whose image would hold more values than a checkpoint may
    (:data:`compressor.checkpoint.MAX_INPUT_ELEMENTS`) -- before any input array is made."""
    from compressor.checkpoint import MAX_INPUT_ELEMENTS
    from compressor.fileio import shorten

    if len(shape) != 4:
        raise CompressError(f"{shorten(str(path))}: the graph input has shape {shorten(shape)}, expected an image "
                            f"batch (N, C, H, W); export the model with 'compress export --onnx'")
    chw = tuple(int(d) if isinstance(d, int) else None for d in shape[1:])
    if any(d is not None and d < 1 for d in chw):
        raise CompressError(f"{shorten(str(path))}: the graph input has shape {shorten(shape)}; "
                            f"its dims must be positive")
    known = [d for d in chw if d is not None]
    if known and int(np.prod(known, dtype=np.float64)) > MAX_INPUT_ELEMENTS:
        raise CompressError(f"{shorten(str(path))}: the graph input {shorten(shape)} is larger than "
                            f"{MAX_INPUT_ELEMENTS:,} values per image (e.g. 3x2048x2048); refusing to allocate it")
    return chw


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
        shape = list(inputs[0].shape or [])
        self.input_shape = check_input_shape(shape, self.path)
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
                mode: str = "auto", skip_bad_images: bool = False, sample: int | None = None, seed: int = 0):
    """A data spec (``demo``, a CIFAR folder, an ImageFolder root) or an already loaded bundle.

    A spec is loaded by :func:`compressor.evaluation.load_data_for_model`: at the
    model's channels and size (``meta``; ``image_size`` overrides H, W) with its
    evaluation transform, the same rule as ``compress eval`` of a checkpoint;
    with ``sample`` only that many images of each split (seeded, spread over the
    classes) are decoded. A bundle is returned as it is (callers sample from it
    with :func:`compressor.evaluation.sample_arrays`). ``bundle.notes`` says what was done.
    """
    if isinstance(data, (str, os.PathLike)):
        from compressor.evaluation import load_data_for_model

        return load_data_for_model(meta, data, splits=splits, image_size=image_size, mode=mode,
                                   skip_bad_images=skip_bad_images, sample=sample, seed=seed)
    if not hasattr(data, "test"):
        raise CompressError(f"expected a data spec or a DataBundle, got {type(data).__name__}")
    return data


def check_fits_data(model: OnnxModel, bundle, images=None, *, ignore_class_names: bool = False) -> None:
    """The model's (C, H, W), class count and class names must match the data (``images``, else the
    test split's size): :func:`compressor.evaluation.check_data_fits` with the graph's fixed size."""
    from compressor.evaluation import check_data_fits

    data_chw = tuple(images.shape[1:]) if images is not None else tuple(bundle.test.input_size)
    check_data_fits(bundle, where=model.path, meta=model.meta, chw=model.chw, num_classes=model.num_classes,
                    data_chw=data_chw, fixed_size=True, ignore_class_names=ignore_class_names)
    graph = tuple(model.input_shape)
    if graph != tuple(model.chw):  # the graph's fixed dimensions must fit too
        check_data_fits(bundle, what="model graph", where=model.path, chw=graph, data_chw=data_chw,
                        fixed_size=True)


def evaluate_arrays(model: OnnxModel, images, labels, batch_size: int = 256) -> dict:
    """top-1 / top-5 (percent), mean cross-entropy and count over uint8 images."""
    if batch_size < 1:
        raise CompressError(f"batch_size must be >= 1, got {batch_size}")
    return evaluate_batches(model, ((images[s:s + batch_size], labels[s:s + batch_size])
                                    for s in range(0, int(len(labels)), batch_size)))


def evaluate_batches(model: OnnxModel, batches) -> dict:
    """:func:`evaluate_arrays` over an iterable of ``(uint8 images, labels)`` batches, counted by
    :class:`compressor.evaluation.Accuracy` (the torch path's counter and tie rule)."""
    from compressor.evaluation import Accuracy

    acc = Accuracy()
    for images, y in batches:
        acc.update(model.predict(model.prepare(images)), np.asarray(y))
    if acc.n == 0:
        raise CompressError("the test split is empty; nothing to evaluate")
    return acc.result()


def evaluate_onnx(path, data, batch_size: int = 256, *, threads: int | None = None, providers=None,
                  image_size=None, mode: str = "auto", skip_bad_images: bool = False,
                  notes: list | None = None, ignore_class_names: bool = False) -> dict:
    """Evaluate an ONNX model (path or :class:`OnnxModel`) on the test split of ``data``.

    Only the test split is read, at the model's (C, H, W) from its metadata
    (see :func:`load_bundle`). Returns ``{"top1": %, "top5": %, "loss": mean
    cross-entropy, "n": images}``; ``notes`` (a list) receives how the data was loaded.
    """
    from compressor.evaluation import split_batches

    model = path if isinstance(path, OnnxModel) else OnnxModel(path, threads=threads, providers=providers)
    bundle = load_bundle(data, model.meta, splits=("test",), image_size=image_size, mode=mode,
                         skip_bad_images=skip_bad_images)
    if batch_size < 1:
        raise CompressError(f"batch_size must be >= 1, got {batch_size}")
    check_fits_data(model, bundle, ignore_class_names=ignore_class_names)
    if notes is not None:
        notes.extend(getattr(bundle, "notes", []))
    result = evaluate_batches(model, split_batches(bundle.test, batch_size))
    props = model.metadata
    source = props.get("source", "")
    if props.get("source_checkpoint"):
        source = (f"{source}; " if source else "") + (f"exported from {props['source_checkpoint']} "
                                                      f"(sha256 {props.get('source_sha256', '?')[:16]})")
    return {**result, "sha256": file_sha256(model.path), "source": source}
