"""The one evaluation view: how an image becomes the pixels a model is scored on.

Validation (``val_fraction``), the test split, ``compress eval``, export parity,
INT8 calibration, the provider table and bench all see images through
:class:`EvalView`: bring the decoded image to the **store** size (the source
both data modes keep, see :mod:`.transforms`), then :func:`.transforms.fit_image`
it to ``size`` with the policy's center ``crop`` (0.875 under the imagenet policy,
1.0 otherwise), bilinear antialiased resizing. One function of (policy, size,
native size of the data) -- :func:`eval_view` -- so the val and test views of the
same file are equal tensors, and demo/CIFAR data get the same crop as folders.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .transforms import eval_crop, fit_image, store_size


@dataclass(frozen=True)
class EvalView:
    """``size`` (H, W) out, center ``crop`` share, ``store`` (H, W) the source size images are
    brought to first (``None``: none), ``interpolation`` of every resize (antialiased)."""

    size: tuple
    crop: float = 1.0
    store: tuple | None = None
    interpolation: str = "bilinear"

    def apply(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 ``(C, H, W)`` or ``(N, C, H, W)`` (one shape) -> the view's pixels at ``size``."""
        if self.store is not None:
            img = fit_image(img, self.store)
        return fit_image(img, self.size, self.crop)


def eval_view(policy: str | None, size, native=None) -> EvalView:
    """The evaluation view of ``policy`` (``cifar``, ``imagenet``, ``none``) at ``size`` (int or (H, W)).

    ``native``: the one size every image of the data set has (demo/CIFAR: 32x32),
    or ``None`` for folders of mixed sizes (the store is then fixed by size and policy).
    """
    size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return EvalView(size, eval_crop(policy), store_size(policy, size, native))


__all__ = ["EvalView", "eval_view"]
