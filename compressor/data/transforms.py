"""Pixel transforms: fitting an image to the trained size, the augmentation policies, normalisation.

Policies (``--augment``):

``cifar``
    Random crop with zero padding 4 and a horizontal flip, applied to whole
    uint8 batches by :func:`augment_batch` in the training loop (two gathers,
    on the batch's device). The CIFAR recipe of the DGKD paper.
``imagenet``
    ``RandomResizedCrop(size)`` + horizontal flip per sample
    (``torchvision.transforms.v2``), applied by the data loader to the *store*
    source (below); evaluation images are resized to cover ``size / 0.875``
    and center-cropped.
``none``
    No augmentation.

Every image that is not augmented is *fitted* (:func:`fit_image`): resized
(antialiased, aspect ratio kept) so that it just covers the target --
``scale = max(th / h, tw / w)`` -- then center-cropped; for the evaluation view of
the imagenet policy the box to cover is ``size / 0.875`` (:data:`IMAGENET_CROP`).

**One source for both data modes** (the decision behind issue 19, item 2). The
memory backend cannot keep images of mixed sizes in one tensor, and a transform
that ran on different pixels in each mode made ``--data-mode auto`` change what
is trained on. So every view of an image starts from one *store* image,
:func:`store_size`: under ``cifar``/``none`` the image fitted to ``size``; under
``imagenet`` the image fitted to the evaluation box ``round(size / 0.875)``
(256x256 for 224 px; demo/CIFAR keep their 32x32 originals). Memory mode keeps
the store images; stream mode decodes a file and fits it to the same store
size; then the same random transform runs on the same pixels (RandomResizedCrop
and the flip, seeded below, or the cifar batch crop), so the two modes give
pixel-identical training batches for the same seed under every policy. The
evaluation view (:mod:`.view`) is a center crop of the same store, so a file
seen by validation and by the test split gives equal tensors. The cost: under
``imagenet`` RandomResizedCrop of a non-square folder image sees its centred
store box only, not the whole photo; memory mode holds (1/0.875)^2 = 1.31x the
pixels of the training split at ``size``.

Random parameters of the per-sample imagenet policy come from a seed mixed from
(seed, epoch, sample index) (:func:`sample_seed`), so they do not depend on
the worker that decodes the sample or on the batch it lands in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import CompressError

POLICIES = ("cifar", "crop", "imagenet", "none")  # crop: cifar without the flip
IMAGENET_CROP = 0.875  # evaluation: resize to size / 0.875, center-crop size (torchvision's references)


def resolve_policy(value, image_size: tuple[int, int], family: str | None, channels: int = 3) -> tuple[str, str]:
    """``(policy, why)`` for a config value (``auto``, a policy, or the old booleans).

    ``auto``: ``crop`` (pad-4 crop, no flip) for grayscale images at any size; for colour ones
    ``imagenet`` from 64 px or for the ``imagenet_*`` families, else ``cifar``. Why grayscale drops
    the mirror: on 28-px digits it cost 7.5 points (88.5 vs 96.0 %, 5 seeds), on grayscale photos
    (CIFAR-10 luminance) leaving it out was level (47.9 vs 47.8 %, 5 seeds). Why grayscale keeps
    the small crop at 64 px and more: on the digits at 64 px (5 epochs, ResNet-8, 2 seeds)
    RandomResizedCrop + flip reached 58.3 %, RandomResizedCrop alone 79.7 %, the pad-4 crop 92.2 %
    (a crop down to 8 % of the area cuts strokes off); on grayscale photos at 64 px 41.9 vs 47.0 %
    for the pad-4 crop. docs/data.md has the runs."""
    if value is True:
        return "cifar", "augment: true (old recipes) means cifar"
    if value is False:
        return "none", "augment: false means none"
    if value in POLICIES:
        return value, "given"
    if value not in (None, "auto"):
        raise CompressError(f"--augment must be cifar, crop, imagenet, none or auto; got {value!r}")
    px = min(image_size)
    if channels == 1:
        other = "--augment imagenet for photos" if px >= 64 else "--augment cifar adds the flip"
        return "crop", (f"auto: {px}-px grayscale images -> pad-4 crop, no flip: a mirror or a large crop "
                        f"changes digits and text; {other}")
    big = px >= 64
    if big or (family or "").startswith("imagenet"):
        return "imagenet", (f"auto: {'images of ' + str(px) + ' px' if big else 'family ' + family}"
                            f" -> RandomResizedCrop + flip")
    return "cifar", f"auto: {px}-px images -> pad-4 crop + flip"


def eval_crop(policy: str | None) -> float:
    """The share of the resized image kept by the evaluation center crop."""
    return IMAGENET_CROP if policy == "imagenet" else 1.0


def cover_shape(h: int, w: int, box) -> tuple[int, int]:
    """``(H', W')`` of an ``h x w`` image resized, aspect ratio kept, to just cover ``box`` (H, W).

    The side that sets the scale (``max(box_h / h, box_w / w)``) becomes exactly the box's; the
    other is truncated like torchvision's shorter-side resize (so a square box reproduces
    ``resize(img, [side])``), and never falls below the box.
    """
    bh, bw = int(box[0]), int(box[1])
    if bh * w >= bw * h:  # the height sets the scale
        return bh, max(bw, int(bh * w / h))
    return max(bh, int(bw * h / w)), bw


def fit_image(img: torch.Tensor, size: tuple[int, int], crop: float = 1.0) -> torch.Tensor:
    """Resize (antialiased, aspect ratio kept) to cover ``size / crop``, then center-crop ``size``.

    The scale is ``max(H_box / h, W_box / w)`` with the box ``round(size / crop)``
    per side, so a 64x128 image fitted to (32, 64) is a plain 2x downscale, and a
    square target is the usual shorter-side resize. An image already of ``size``
    with ``crop == 1`` is returned as it is. ``img``: ``(C, H, W)`` or ``(N, C, H, W)``.
    """
    from torchvision.transforms.v2 import functional as TF

    h, w = (int(v) for v in img.shape[-2:])
    size = (int(size[0]), int(size[1]))
    if (h, w) == size and crop == 1.0:
        return img
    box = size if crop == 1.0 else (int(round(size[0] / crop)), int(round(size[1] / crop)))
    new = cover_shape(h, w, box)
    if new != (h, w):
        img = TF.resize(img, list(new), antialias=True)
    return TF.center_crop(img, list(size)).contiguous()


def store_size(policy: str | None, size, native=None) -> tuple[int, int]:
    """The size of the source image every view of a sample starts from (both data modes).

    ``cifar``/``none``: ``size`` (the fitted image; the cifar batch crop works on it).
    ``imagenet``: the evaluation box ``round(size / 0.875)`` (``(256, 256)`` for 224 px),
    filled by :func:`fit_image` -- or, when every image of the data has one ``native``
    size (demo/CIFAR), the native image itself, downscaled (aspect kept) only when it is
    larger than needed to cover that box. RandomResizedCrop and the evaluation crop both
    start from this source.
    """
    size = (int(size[0]), int(size[1]))
    if policy != "imagenet":
        return size
    box = (int(round(size[0] / IMAGENET_CROP)), int(round(size[1] / IMAGENET_CROP)))
    if native is None:
        return box
    nh, nw = int(native[0]), int(native[1])
    return cover_shape(nh, nw, box) if box[0] < nh and box[1] < nw else (nh, nw)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed from (seed, epoch, index); the same in every process and worker."""
    acc = 0x9E3779B97F4A7C15
    for v in (int(seed), int(epoch), int(index)):
        acc = ((acc ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) % (2**63 - 25)
    return acc


_RRC_CACHE: dict = {}


def imagenet_train(img: torch.Tensor, size: tuple[int, int], seed: int) -> torch.Tensor:
    """RandomResizedCrop(size) + RandomHorizontalFlip via ``torchvision.transforms.v2``,
    drawing from the global generator seeded with ``seed`` (restored afterwards)."""
    key = tuple(size)
    if key not in _RRC_CACHE:
        from torchvision.transforms import v2

        _RRC_CACHE[key] = v2.Compose([v2.RandomResizedCrop(list(key), antialias=True), v2.RandomHorizontalFlip()])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _RRC_CACHE[key](img).contiguous()


# ----------------------------------------------------------------------------- batch augmentation (cifar)
def crop_flip(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor | None,
              *, pad: int) -> torch.Tensor:
    """Deterministic core of :func:`augment_batch`.

    Zero-pads ``images`` (N, C, H, W) by ``pad`` on every side, then for sample i
    takes rows ``top[i] .. top[i]+H-1`` and columns ``left[i] .. left[i]+W-1`` of
    the padded image (``top``/``left`` in ``0..2*pad``; ``pad, pad`` is the
    identity), mirrored horizontally where ``flip[i]`` is true. Two gathers, no
    loop over images.
    """
    n, c, h, w = images.shape
    dev = images.device
    x = F.pad(images, (pad, pad, pad, pad)) if pad > 0 else images
    rows = top.to(dev, torch.int64).view(n, 1) + torch.arange(h, device=dev).view(1, h)  # (N, H)
    cols = left.to(dev, torch.int64).view(n, 1) + torch.arange(w, device=dev).view(1, w)  # (N, W)
    if flip is not None:
        cols = torch.where(flip.to(dev).view(n, 1), cols.flip(1), cols)
    wp = x.shape[-1]
    x = torch.gather(x, 2, rows.view(n, 1, h, 1).expand(n, c, h, wp))  # (N, C, H, Wp)
    x = torch.gather(x, 3, cols.view(n, 1, 1, w).expand(n, c, h, w))  # (N, C, H, W)
    return x


def augment_batch(images: torch.Tensor, generator: torch.Generator, *, pad: int = 4,
                  flip: bool = True) -> torch.Tensor:
    """Random crop (zero padding ``pad``, same output size) and random horizontal flip (p=0.5).

    ``images``: uint8 (N, C, H, W) on any device; returns uint8 of the same
    shape on the same device. Random numbers come from ``generator`` (a CPU
    ``torch.Generator``) in this order: ``top = randint(0, 2*pad+1, (N,))``,
    ``left = randint(0, 2*pad+1, (N,))``, then (if ``flip``) ``rand(N) < 0.5``;
    so a seeded generator reproduces the batch on CPU and GPU alike.
    """
    if images.dim() != 4:
        raise ValueError(f"augment_batch expects (N, C, H, W), got shape {tuple(images.shape)}")
    n = images.shape[0]
    pad = int(pad)
    if pad > 0:
        top = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        left = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    else:
        top = left = torch.zeros(n, dtype=torch.int64)
    mask = (torch.rand(n, generator=generator) < 0.5) if flip else None
    if pad == 0 and mask is None:
        return images
    return crop_flip(images, top, left, mask, pad=pad)


BATCH_AUGMENTATION = {"cifar": {}, "auto": {}, True: {},  # augment_batch's defaults: pad-4 crop + flip
                      "crop": {"flip": False}}  # for images a mirror changes: digits, text, signs


def batch_augmentation(policy) -> dict | None:
    """The :func:`augment_batch` keyword arguments the training loop uses for ``policy`` on whole
    batches (cifar, crop; ``True``/``auto`` from older callers), or ``None``: no batch augmentation."""
    return BATCH_AUGMENTATION.get(policy) if isinstance(policy, (str, bool)) else None


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 ``(x/255 - mean) / std`` per channel, on the same device."""
    c = images.shape[-3]
    if len(mean) != c or len(std) != c:
        raise CompressError(f"normalisation mean/std have {len(mean)}/{len(std)} values but the images have "
                            f"{c} channels; give one value per channel")
    mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32, device=images.device).view(c, 1, 1)
    std_t = torch.tensor([float(s) for s in std], dtype=torch.float32, device=images.device).view(c, 1, 1)
    x = images.to(torch.float32)
    return x.div_(255.0).sub_(mean_t).div_(std_t)
