"""The in-memory backend: a split decoded once into one uint8 tensor ``(N, C, H, W)``.

Right for CIFAR-sized data (3 KB per 32-px image: all of CIFAR-10 is 180 MB)
and for folders that fit the memory budget of ``--data-mode auto``. Files are
decoded straight into a preallocated tensor (no list of tensors plus a
stacked copy), so the peak is the decoded bytes plus a few images per thread.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .formats import BadFiles, decode_file, io_threads, one_intra_op_thread, quiet_torchvision
from .transforms import fit_image, imagenet_train, sample_seed


@dataclass
class ImageSplit:
    """One split: ``images`` uint8 ``(N, C, H, W)`` contiguous CPU, ``labels`` int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        if self.images.dim() != 4 or self.images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"labels must be (N,) with N={self.images.shape[0]}, got {tuple(self.labels.shape)}")
        if self.labels.dtype != torch.int64:
            self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.images.shape[1:])

    def fingerprint(self) -> str:
        """sha256 (hex) of the shape, the decoded pixels and the labels: changes when any pixel does."""
        h = hashlib.sha256(f"memory:{tuple(self.images.shape)}".encode())
        flat = self.images.contiguous().view(-1)
        step = 1 << 26  # hash in 64 MB views, no copy of the whole tensor
        for i in range(0, flat.numel(), step):
            h.update(flat[i:i + step].numpy().data)
        h.update(self.labels.contiguous().numpy().data)
        return h.hexdigest()


def subset_images(split: ImageSplit, idx: torch.Tensor) -> ImageSplit:
    return ImageSplit(split.images.index_select(0, idx).contiguous(), split.labels.index_select(0, idx))


def decode_into(files: list[str], size: tuple[int, int], channels: int, crop: float,
                bad: BadFiles) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode and fit ``files`` into one preallocated uint8 tensor; returns ``(images, ok_mask)``.

    Files that do not decode are added to ``bad`` and leave their slot zero.
    """
    out = torch.empty((len(files), channels, *size), dtype=torch.uint8)
    ok = torch.ones(len(files), dtype=torch.bool)

    def work(start: int, stop: int):
        errors = []
        for i in range(start, stop):
            try:
                out[i] = fit_image(decode_file(files[i], channels), size, crop)
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
        self.images = split.images
        self.labels = split.labels
        self.augments = policy == "imagenet"
        self.seed = int(seed)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i):
        return self.__getitems__([i])

    def __getitems__(self, keys):
        if not self.augments:
            idx = torch.as_tensor(keys, dtype=torch.int64)
            return self.images.index_select(0, idx), self.labels.index_select(0, idx)
        size = tuple(self.images.shape[-2:])
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


__all__ = ["ImageSplit", "BatchedSplit", "decode_into", "resize_split", "subset_images"]
