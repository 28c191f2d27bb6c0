"""Start a model from weights you have (``train --init``, ``distill --init-student``).

Any checkpoint ``compress import`` accepts works: a compress safetensors file,
a safetensors file without metadata, or a PyTorch ``.pth``/``.th`` state dict
(e.g. torchvision's ImageNet weights; read with ``weights_only=True``). No code
runs: only tensors are read, the model is the one the command builds.

How the weights are fitted to the model, the way timm's ``load_pretrained`` and
torchvision's fine-tuning references do it:

* every tensor whose name and shape match is copied;
* **classifier**: when the class count differs, the tensors whose first
  dimension is the file's class count and the model's differs (the head's weight
  and bias) keep the model's fresh initialisation -- printed as "classifier
  replaced";
* **input channels**: a 3-channel first convolution for 1-channel data is summed
  over its input channels (and the other way round, repeated and scaled), so an
  RGB-pretrained model starts well on grayscale images;
* anything else that does not match (another stem, another width) is left at
  its initialisation and listed; when less than :data:`MIN_LOADED_SHARE` of the
  model's parameters come from the file, the file is for another model and is
  refused (exit 2) rather than silently ignored.

The normalisation the weights expect travels with them: a compress checkpoint's
``mean``/``std``, else the model family's (ImageNet statistics for torchvision
families). The input size follows the data; a compress checkpoint's own input
size is kept in the report (``input_size``), so the weights can be scored at the
size they were trained at too (:func:`compressor.pipeline.init_val_score`). The
file's sha256 is recorded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from safetensors import safe_open

from .checkpoint import (_infer_num_classes, check_readable_file, family_normalisation, file_sha256,
                         load_foreign_state_dict, read_checkpoint)
from .data.transforms import fit_image
from .errors import CompressError
from .fileio import shorten

MIN_LOADED_SHARE = 0.5  # of the model's parameter elements; below it the file is for another model


@dataclass
class InitReport:
    path: str
    sha256: str
    loaded: int                     # tensors copied as they are
    total: int                      # tensors of the model's state dict
    loaded_share: float             # share of the model's parameter elements that came from the file
    classifier_replaced: list = field(default_factory=list)
    channels_adapted: list = field(default_factory=list)
    skipped: list = field(default_factory=list)   # "name (file shape vs model shape)"
    mean: tuple | None = None       # what the file says its weights expect (None: not recorded)
    std: tuple | None = None
    input_size: tuple | None = None  # (C, H, W) the file says its weights were trained at (None: not recorded)

    def describe(self) -> str:
        parts = [f"init: {self.loaded}/{self.total} tensors from {self.path} (sha256 {self.sha256[:16]}, "
                 f"{100 * self.loaded_share:.0f}% of the parameters)"]
        if self.classifier_replaced:
            parts.append(f"classifier replaced ({', '.join(self.classifier_replaced)}: other class count)")
        if self.channels_adapted:
            parts.append(f"input channels adapted ({', '.join(self.channels_adapted)})")
        if self.skipped:
            more = f" and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
            parts.append(f"left at init: {'; '.join(self.skipped[:3])}{more}")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "loaded": self.loaded, "total": self.total,
                "loaded_share": round(self.loaded_share, 4), "classifier_replaced": self.classifier_replaced,
                "channels_adapted": self.channels_adapted, "skipped": self.skipped[:20]}


def read_init_state(path, *, allow_pickle: bool = False) -> tuple[dict, object | None]:
    """``(state_dict, meta)`` of any checkpoint ``compress import`` accepts; ``meta`` is the compress
    metadata (:class:`~compressor.checkpoint.CheckpointMeta`: mean, std, input size), ``None`` when
    the file has none. Never imports code."""
    p = Path(path)
    if p.suffix == ".safetensors":
        try:
            with safe_open(str(check_readable_file(p, "checkpoint")), framework="pt") as fh:
                raw = fh.metadata() or {}
        except Exception:  # noqa: BLE001 - unreadable: the reader below names the problem
            raw = {}
        if "arch" in raw and "num_classes" in raw:
            return read_checkpoint(p)  # metadata validated against the tensors; no code runs
        return load_foreign_state_dict(p), None
    return load_foreign_state_dict(p, allow_pickle=allow_pickle), None


def adapt_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A conv weight ``(out, c, kh, kw)`` for ``in_chans`` inputs: summed to 1 channel, or repeated
    and rescaled (timm's ``adapt_input_conv``) so the response to a grey image stays the same."""
    c = weight.shape[1]
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_chans // c)
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (c / in_chans)


def init_from_checkpoint(model: nn.Module, path, *, allow_pickle: bool = False) -> InitReport:
    """Copy the weights of ``path`` into ``model`` as described in the module docstring."""
    state, meta = read_init_state(path, allow_pickle=allow_pickle)
    own = model.state_dict()
    file_classes = _classifier_rows(state)
    new, loaded, replaced, adapted, skipped = {}, 0, [], [], []
    for name, target in own.items():
        if name not in state:
            if not name.endswith("num_batches_tracked"):
                skipped.append(f"{name} (not in the file)")
            continue
        source = state[name]
        if tuple(source.shape) == tuple(target.shape):
            new[name] = source.to(target.dtype)
            loaded += 1
        elif (source.ndim == target.ndim and source.ndim in (1, 2) and file_classes is not None
              and source.shape[0] == file_classes and source.shape[1:] == target.shape[1:]):
            replaced.append(name)
        elif (source.ndim == 4 and target.ndim == 4 and source.shape[0] == target.shape[0]
              and source.shape[2:] == target.shape[2:] and source.shape[1] != target.shape[1]
              and source.shape[1] in (1, 3) and target.shape[1] in (1, 3)):
            new[name] = adapt_channels(source.float(), target.shape[1]).to(target.dtype)
            adapted.append(f"{name} {source.shape[1]}->{target.shape[1]}")
        else:
            skipped.append(f"{name} ({list(source.shape)} vs {list(target.shape)})")
    params = dict(model.named_parameters())
    total_elements = sum(p.numel() for p in params.values()) or 1
    from_file = sum(params[n].numel() for n in new if n in params)
    share = from_file / total_elements
    if share < MIN_LOADED_SHARE:
        example = shorten("; ".join(skipped[:2]))
        raise CompressError(f"{path}: only {100 * share:.0f}% of the model's parameters match the file "
                            f"(e.g. {example}); it holds weights of another model: check the file and --arch")
    model.load_state_dict({**own, **new}, strict=True)
    return InitReport(path=str(path), sha256=file_sha256(path), loaded=loaded, total=len(own),
                      loaded_share=share, classifier_replaced=replaced, channels_adapted=adapted,
                      skipped=skipped, mean=tuple(meta.mean) if meta else None, std=tuple(meta.std) if meta else None,
                      input_size=tuple(int(v) for v in meta.input_size) if meta else None)


def init_normalisation(report: InitReport, entry, channels: int, mean, std) -> tuple[list, list]:
    """The mean/std a model started from ``report``'s weights should see: what the file records,
    else the family's usual statistics for families whose weights expect ImageNet's (torchvision),
    else ``mean``/``std`` (the data's). Per-channel values are averaged for 1-channel data."""
    if report.mean is not None:
        m, s = report.mean, report.std
    elif entry.norm == "imagenet":
        _, m, s = family_normalisation(entry)
    else:
        return list(mean), list(std)
    if len(m) != channels:
        m, s = [sum(m) / len(m)] * channels, [sum(s) / len(s)] * channels
    return [float(v) for v in m], [float(v) for v in s]


class ResizedInput(nn.Module):
    """``model`` fed its input fitted to ``size`` (H, W) first (:func:`~compressor.data.transforms.fit_image`,
    the data pipeline's antialiased resize): weights scored at the size they were trained at."""

    def __init__(self, model: nn.Module, size):
        super().__init__()
        self.model, self.size = model, (int(size[0]), int(size[1]))

    def forward(self, x):
        return self.model(fit_image(x, self.size))


def _classifier_rows(state: dict) -> int | None:
    """The file's class count (:func:`compressor.checkpoint._infer_num_classes`), None without a head."""
    try:
        return _infer_num_classes(state)
    except CompressError:
        return None
