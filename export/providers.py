"""onnxruntime execution providers: which are usable here, and how a session gets one.

``cpu`` and ``cuda`` are built into onnxruntime (``cuda`` needs onnxruntime-gpu
and a GPU). ``openvino`` is the plugin EP of the optional extra
(``pip install -e ".[openvino]"`` installs ``onnxruntime-ep-openvino``): the
library is registered with onnxruntime once, the OpenVINO device is picked from
``ort.get_ep_devices()`` and added with ``SessionOptions.add_provider_for_devices``
(a plugin EP cannot be named in ``providers=``). Its precision is not a provider
option: it goes through OpenVINO's ``load_config`` (``INFERENCE_PRECISION_HINT``
``f32`` or ``bf16``). The plugin offers Intel devices only; on other CPUs it is
reported as unavailable.
"""
from __future__ import annotations

import json

from compressor.errors import CompressError

from .options import PRECISIONS, PROVIDERS

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
OPENVINO_EP = "OpenVINOExecutionProvider"
OPENVINO_INSTALL = 'pip install -e ".[openvino]" (the onnxruntime-ep-openvino plugin)'
_registered: dict[str, bool] = {}


def _openvino_devices() -> tuple[list, str | None]:
    """(OpenVINO EP devices, None) or ([], why not)."""
    import onnxruntime as ort

    try:
        import onnxruntime_ep_openvino as ov_ep
    except ImportError:
        return [], f"the OpenVINO execution provider is not installed; {OPENVINO_INSTALL}"
    if not _registered.get(OPENVINO_EP):
        try:
            ort.register_execution_provider_library(ov_ep.get_ep_name(), ov_ep.get_library_path())
        except Exception as exc:  # registering twice in one process is harmless
            if "already" not in str(exc).lower():
                reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                return [], (f"the OpenVINO plugin does not load ({reason}); reinstall it: {OPENVINO_INSTALL}")
        _registered[OPENVINO_EP] = True
    devices = [d for d in ort.get_ep_devices() if d.ep_name == OPENVINO_EP]
    if not devices:
        from .machine import cpu_model

        return [], (f"the OpenVINO plugin offers no device on this machine ({cpu_model()}; it supports Intel "
                    f"CPUs, GPUs and NPUs); use --provider cpu")
    return devices, None


def unavailable_reason(name: str) -> str | None:
    """None when provider ``name`` can run here, else a one-line reason with the fix."""
    name = str(name).lower()
    if name not in PROVIDERS:
        return f"unknown execution provider {name!r}; use one of {', '.join(PROVIDERS)}"
    if name == "cpu":
        return None
    if name == "openvino":
        return _openvino_devices()[1]
    try:
        resolve_providers(name)  # one availability rule and install hint for onnxruntime's built-in providers
    except CompressError as exc:
        return str(exc)
    return None


def check_precision(provider: str, precision: str) -> str:
    precision = str(precision).lower()
    if precision not in PRECISIONS:
        raise CompressError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision != "f32" and str(provider).lower() != "openvino":
        raise CompressError(f"--precision {precision} is an OpenVINO hint; add --provider openvino, or use f32")
    return precision


def add_openvino(opts, precision: str = "f32", threads: int | None = None) -> None:
    """Add the OpenVINO EP (its CPU device when there is one) to session options ``opts``."""
    import onnxruntime as ort

    devices, why = _openvino_devices()
    if why:
        raise CompressError(why)
    cpu = [d for d in devices if d.device.type == ort.OrtHardwareDeviceType.CPU]
    device = (cpu or devices)[0]
    kind = "CPU" if cpu else str(device.device.type).rsplit(".", 1)[-1]
    props = {"INFERENCE_PRECISION_HINT": check_precision("openvino", precision)}
    if threads and kind == "CPU":
        props["INFERENCE_NUM_THREADS"] = int(threads)  # OpenVINO ignores onnxruntime's intra-op threads
    opts.add_provider_for_devices([device], {"load_config": json.dumps({kind: props})})


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
