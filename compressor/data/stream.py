"""The streaming backend: a split is a list of files, decoded by ``DataLoader`` worker processes.

For folders that do not fit the memory budget (ImageNet: 193 GB decoded at
224 px). Memory use does not grow with the number of images beyond the file
list. Each batch is decoded by one worker (``__getitems__``), brought to the
store size (imagenet policy: the source the memory backend keeps, see
:mod:`.transforms`), fitted to the trained size (or, for training with the
imagenet policy, RandomResizedCrop + flip seeded by (seed, epoch, sample
index)), stacked into uint8 ``(N, C, H, W)``
and pinned when a GPU is in use. In a multi-process run Accelerate hands each
process its own batches, so each process decodes only its share.

Headers are checked for every file when the split is made (a bad file is
reported before training starts); a file whose header reads but whose pixels
do not decode stops the run with its name.

The paths are held in a :class:`FileList` (one byte buffer and an offset array),
not a Python list: a forked worker that reads a list of str touches every
string's reference count and so copies the pages they live on (108 MB per worker
at 1 million ImageNet-style paths, measured; 0.3 MB with the buffer) -- the
copy-on-read of PyTorch issue 13246.
"""
from __future__ import annotations

import hashlib
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CompressError
from .formats import decode_file, one_intra_op_thread, quiet_torchvision
from .transforms import fit_image, imagenet_train, sample_seed


TAKE_CHUNK = 1 << 16  # paths per vectorised step of FileList.take


class FileList(Sequence):
    """An immutable sequence of paths (``str``) packed into one ``uint8`` buffer plus ``int64`` end
    offsets (see the module docstring). Paths round-trip through :func:`os.fsencode`, so names that
    are not valid UTF-8 come back as they went in."""

    __slots__ = ("_blob", "_ends")

    def __init__(self, paths=()):
        if isinstance(paths, FileList):
            self._blob, self._ends = paths._blob, paths._ends
            return
        encoded = [os.fsencode(p) for p in paths]
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._ends = np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))

    def __len__(self) -> int:
        return int(self._ends.shape[0])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        i = operator.index(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"file index {i} out of range for {n} files")
        return os.fsdecode(self._blob[(int(self._ends[i - 1]) if i else 0):int(self._ends[i])].tobytes())

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def take(self, idx) -> "FileList":
        """The paths at ``idx`` (int array or tensor), copied into a new buffer without decoding them
        (vectorised, :data:`TAKE_CHUNK` paths at a time: the byte index arrays stay small)."""
        idx = np.asarray(idx.tolist() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"file index out of range for {n} files")
        idx = np.where(idx < 0, idx + n, idx)
        ends, starts = self._ends[idx], np.concatenate(([0], self._ends[:-1]))[idx]
        parts = []
        for a in range(0, idx.size, TAKE_CHUNK):
            s, length = starts[a:a + TAKE_CHUNK], ends[a:a + TAKE_CHUNK] - starts[a:a + TAKE_CHUNK]
            # byte k of the chunk is byte (k - its path's start in the chunk + its old start) of the buffer
            shift = np.repeat(s - (np.cumsum(length) - length), length)
            parts.append(self._blob[np.arange(shift.size, dtype=np.int64) + shift])
        out = FileList()
        out._ends = np.cumsum(ends - starts, dtype=np.int64)
        out._blob = np.concatenate(parts) if parts else out._blob
        return out

    def __eq__(self, other):
        if isinstance(other, FileList):
            return np.array_equal(self._ends, other._ends) and np.array_equal(self._blob, other._blob)
        return isinstance(other, Sequence) and not isinstance(other, (str, bytes)) and list(self) == list(other)

    __hash__ = None

    def __repr__(self) -> str:
        head = ", ".join(repr(p) for p in self[:3])
        return f"FileList([{head}{', ...' if len(self) > 3 else ''}], {len(self)} files)"

    def __getstate__(self):
        return self._blob, self._ends

    def __setstate__(self, state):
        self._blob, self._ends = state


@dataclass
class FileSplit:
    """One split on disk: ``files``, ``labels`` int64 ``(N,)``, the output ``size`` (H, W),
    ``channels`` (1 or 3) and ``crop`` (the center-crop share of plain access, 1.0 or 0.875).

    ``store``: the size each decoded image is brought to first (:func:`.transforms.store_size`;
    ``None``: none), the source of RandomResizedCrop and of the fitted view -- the pixels the
    memory backend keeps. ``eval_crop`` (a training split's): the crop of its evaluation view
    (:func:`.loader.as_eval`); ``None`` when ``crop`` already is the evaluation crop.
    """

    files: FileList  # any sequence of paths is packed into one
    labels: torch.Tensor
    size: tuple
    channels: int
    crop: float = 1.0
    store: tuple | None = None
    eval_crop: float | None = None

    def __post_init__(self):
        self.files = FileList(self.files)
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64).reshape(-1)
        self.size = (int(self.size[0]), int(self.size[1]))
        if self.store is not None:
            self.store = (int(self.store[0]), int(self.store[1]))
        if len(self.files) != self.labels.shape[0]:
            raise ValueError(f"{len(self.files)} files but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return len(self.files)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (int(self.channels), *self.size)

    def fingerprint(self) -> str:
        """sha256 (hex) of the file list with sizes and mtimes, the labels, size, channels and crop."""
        extra = f":{self.store}:{self.eval_crop}" if self.store is not None or self.eval_crop is not None else ""
        h = hashlib.sha256(f"stream:{self.size}:{self.channels}:{self.crop}{extra}".encode())
        for f in self.files:
            st = os.stat(f)
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        h.update(self.labels.numpy().data)
        return h.hexdigest()


def subset_files(split: FileSplit, idx: torch.Tensor) -> FileSplit:
    return FileSplit(split.files.take(idx), split.labels.index_select(0, idx),
                     split.size, split.channels, split.crop, split.store, split.eval_crop)


def eval_files(split: FileSplit) -> FileSplit:
    """``split`` in its evaluation view (see :func:`.loader.as_eval`)."""
    if split.eval_crop is None:
        return split
    return FileSplit(split.files, split.labels, split.size, split.channels, split.eval_crop, split.store)


class UnreadableImage(CompressError):
    """A file whose header read but whose pixels do not decode, met while streaming.

    The DataLoader re-raises a worker's exception as ``type(message)`` with the
    worker's traceback in the message; keep only our one line.
    """

    def __init__(self, message: str):
        if message.startswith("Caught "):
            last = message.strip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


class StreamDataset(torch.utils.data.Dataset):
    """Decodes a batch of files per call. Keys are indices, or ``(epoch, index)`` pairs when
    it augments (``policy="imagenet"``, training)."""

    def __init__(self, split: FileSplit, policy: str | None = None, seed: int = 0):
        self.split = split
        self.augments = policy == "imagenet"
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.split)

    def _one(self, key) -> torch.Tensor:
        s = self.split
        i = key[1] if self.augments else key
        try:
            img = decode_file(s.files[i], s.channels)
        except ValueError as exc:
            raise UnreadableImage(f"cannot decode image file {s.files[i]!r} ({exc}) while streaming: its header "
                                  f"reads but its pixels do not; remove or replace it") from None
        if s.store is not None:
            img = fit_image(img, s.store)
        if self.augments:
            return imagenet_train(img, s.size, sample_seed(self.seed, key[0], i))
        return fit_image(img, s.size, s.crop)

    def __getitem__(self, key):
        return self.__getitems__([key])

    def __getitems__(self, keys):
        with quiet_torchvision(), one_intra_op_thread():
            images = torch.stack([self._one(k) for k in keys])
        idx = torch.as_tensor([k[1] if self.augments else k for k in keys], dtype=torch.int64)
        return images, self.split.labels.index_select(0, idx)


def worker_init(_worker_id: int) -> None:
    # One intra-op thread per worker: the workers are the parallelism.
    torch.set_num_threads(1)


def default_workers() -> int:
    """Loader worker processes when none are given: the usable cores minus one, 1..8."""
    from ..machine import usable_cores

    return max(1, min(8, usable_cores() - 1))
