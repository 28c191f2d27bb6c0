"""The in-memory backend: a split decoded once into one uint8 tensor ``(N, C, H, W)``.

Right for CIFAR-sized data (3 KB per 32-px image: all of CIFAR-10 is 180 MB)
and for folders that fit the memory budget of ``--data-mode auto``. Files are
decoded straight into a preallocated tensor (no list of tensors plus a
stacked copy), so the peak is the decoded bytes plus a few images per thread.
A training split under the imagenet policy keeps its images at the store size
(:func:`.transforms.store_size`): the same source pixels the stream backend
makes from each file, so both backends augment the same pixels.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from .formats import BadFiles, decode_file, io_threads, one_intra_op_thread, quiet_torchvision
from .transforms import fit_image, imagenet_train, sample_seed


class ImageSplit:
    """One split in memory: ``images`` uint8 ``(N, C, H, W)`` contiguous CPU (what the model is fed
    without augmentation), ``labels`` int64 ``(N,)``.

    Under the imagenet policy a training split also holds ``source``: the images at
    the store size (:func:`.transforms.store_size`), the pixels RandomResizedCrop
    draws from -- the same pixels the stream backend makes from each file.
    ``images`` is then the plain view of the source (``fit_image(source, size)``),
    made on first access. ``eval_crop`` (a training split's) is the center crop of
    the evaluation view of the source (:func:`as_eval`); ``None`` when ``images``
    already are an evaluation view (a test split).
    """

    def __init__(self, images, labels, *, source=None, size=None, eval_crop=None):
        self._images = images
        self.labels = labels
        self.source = source
        self.eval_crop = eval_crop
        ref = images if images is not None else source
        if ref is None or ref.dim() != 4 or ref.dtype != torch.uint8:
            shape = None if ref is None else f"{ref.dtype} {tuple(ref.shape)}"
            raise ValueError(f"images must be uint8 (N, C, H, W), got {shape}")
        self.size = (int(size[0]), int(size[1])) if size is not None else tuple(int(v) for v in ref.shape[-2:])
        if images is not None and tuple(images.shape[-2:]) != self.size:
            raise ValueError(f"images are {tuple(images.shape[-2:])}, not the split's size {self.size}")
        if self.labels.dim() != 1 or self.labels.shape[0] != ref.shape[0]:
            raise ValueError(f"labels must be (N,) with N={ref.shape[0]}, got {tuple(self.labels.shape)}")
        if self.labels.dtype != torch.int64:
            self.labels = self.labels.to(torch.int64)

    @property
    def images(self) -> torch.Tensor:
        if self._images is None:  # the plain view of the source, made once
            self._images = fit_images(self.source, self.size, 1.0)
        return self._images

    @images.setter
    def images(self, value) -> None:
        self._images = value

    @property
    def pixels(self) -> torch.Tensor:
        """What augmentation starts from: ``source`` when there is one, else ``images``."""
        return self.source if self.source is not None else self.images

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return (f"ImageSplit(n={len(self)}, size={self.size}"
                f"{', source ' + str(tuple(self.source.shape[-2:])) if self.source is not None else ''})")

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (int(self.pixels.shape[1]), *self.size)

    def fingerprint(self) -> str:
        """sha256 (hex) of the shape, the decoded pixels and the labels: changes when any pixel does."""
        if self.source is not None:
            pixels = self.source
            h = hashlib.sha256(f"memory:{tuple(pixels.shape)}:{self.size}:{self.eval_crop}".encode())
        else:
            pixels = self.images
            h = hashlib.sha256(f"memory:{tuple(pixels.shape)}".encode())
        flat = pixels.contiguous().view(-1)
        step = 1 << 26  # hash in 64 MB views, no copy of the whole tensor
        for i in range(0, flat.numel(), step):
            h.update(flat[i:i + step].numpy().data)
        h.update(self.labels.contiguous().numpy().data)
        return h.hexdigest()


def fit_images(pixels: torch.Tensor, size, crop: float) -> torch.Tensor:
    """:func:`.transforms.fit_image` of each image (one at a time: the same pixels as the stream
    backend's per-file call), as one contiguous uint8 tensor."""
    size = (int(size[0]), int(size[1]))
    if tuple(pixels.shape[-2:]) == size and crop == 1.0:
        return pixels
    out = torch.empty((pixels.shape[0], pixels.shape[1], *size), dtype=torch.uint8)
    with one_intra_op_thread():
        for i in range(pixels.shape[0]):
            out[i] = fit_image(pixels[i], size, crop)
    return out


def subset_images(split: ImageSplit, idx: torch.Tensor) -> ImageSplit:
    images = split._images.index_select(0, idx).contiguous() if split._images is not None else None
    source = split.source.index_select(0, idx).contiguous() if split.source is not None else None
    return ImageSplit(images, split.labels.index_select(0, idx), source=source, size=split.size,
                      eval_crop=split.eval_crop)


def eval_images(split: ImageSplit) -> ImageSplit:
    """``split`` in its evaluation view (see :func:`.loader.as_eval`)."""
    if split.eval_crop is None:
        return split
    return ImageSplit(fit_images(split.pixels, split.size, split.eval_crop), split.labels)


def decode_into(files: list[str], size: tuple[int, int], channels: int, crop: float,
                bad: BadFiles, *, store=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode and fit ``files`` into one preallocated uint8 tensor; returns ``(images, ok_mask)``.

    Each image is brought to ``store`` first when given (:func:`.transforms.store_size`),
    then fitted to ``size`` with ``crop`` -- :meth:`.view.EvalView.apply`, image by image.
    Files that do not decode are added to ``bad`` and leave their slot zero.
    """
    out = torch.empty((len(files), channels, *size), dtype=torch.uint8)
    ok = torch.ones(len(files), dtype=torch.bool)

    def work(start: int, stop: int):
        errors = []
        for i in range(start, stop):
            try:
                img = decode_file(files[i], channels)
                if store is not None:
                    img = fit_image(img, store)
                out[i] = fit_image(img, size, crop)
            except ValueError as exc:
                errors.append((i, str(exc)))
                out[i].zero_()
        return errors

    workers = io_threads()
    step = max(1, min(512, -(-len(files) // (4 * workers))))
    ranges = [(i, min(i + step, len(files))) for i in range(0, len(files), step)]
    with quiet_torchvision(), one_intra_op_thread():
        if workers == 1 or len(ranges) == 1:
            results = [work(a, b) for a, b in ranges]
        else:
            with ThreadPoolExecutor(max_workers=workers) as ex:
                results = list(ex.map(lambda r: work(*r), ranges))
    for errors in results:
        for i, reason in errors:
            ok[i] = False
            bad.add(files[i], reason)
    return out, ok


def resize_split(split: ImageSplit, size: tuple[int, int]) -> ImageSplit:
    """Fit every image of ``split`` to ``size`` (chunks of 1,024 images)."""
    if tuple(split.images.shape[-2:]) == tuple(size):
        return split
    chunks = [fit_image(split.images[i:i + 1024], size) for i in range(0, len(split), 1024)]
    return ImageSplit(torch.cat(chunks).contiguous(), split.labels)


class BatchedSplit(torch.utils.data.Dataset):
    """Map-style dataset over an :class:`ImageSplit` that gathers whole batches at once.

    With ``policy="imagenet"`` (training) the keys are ``(epoch, index)`` pairs and
    every image gets its own RandomResizedCrop + flip seeded by (seed, epoch, index).
    """

    def __init__(self, split: ImageSplit, policy: str | None = None, seed: int = 0):
        self.augments = policy == "imagenet"
        # RandomResizedCrop draws from the source pixels; plain access gets the fitted view.
        self.images = split.pixels if self.augments else split.images
        self.size = split.size
        self.labels = split.labels
        self.seed = int(seed)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i):
        return self.__getitems__([i])

    def __getitems__(self, keys):
        if not self.augments:
            idx = torch.as_tensor(keys, dtype=torch.int64)
            return self.images.index_select(0, idx), self.labels.index_select(0, idx)
        size = self.size
        with one_intra_op_thread():
            imgs = [imagenet_train(self.images[i], size, sample_seed(self.seed, e, i)) for e, i in keys]
        idx = torch.as_tensor([i for _, i in keys], dtype=torch.int64)
        return torch.stack(imgs), self.labels.index_select(0, idx)


# ----------------------------------------------------------------------------- synthetic
def synthetic_split_pair(num_classes: int, input_size, n_train: int, n_test: int, seed: int):
    """A tiny learnable data set for tests: one smooth random pattern per class plus noise."""
    c, h, w = (int(v) for v in input_size)
    g = torch.Generator().manual_seed(int(seed))
    base = torch.rand(num_classes, c, max(1, h // 8), max(1, w // 8), generator=g)
    base = F.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)

    def make(n: int) -> ImageSplit:
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        noise = torch.rand(n, c, h, w, generator=g)
        x = (0.7 * base[labels] + 0.3 * noise) * 255.0
        return ImageSplit(x.round().clamp_(0, 255).to(torch.uint8).contiguous(), labels.to(torch.int64))

    return make(n_train), make(n_test)


__all__ = ["ImageSplit", "BatchedSplit", "decode_into", "eval_images", "fit_images", "resize_split", "subset_images"]
