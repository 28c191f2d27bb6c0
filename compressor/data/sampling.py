"""Data access by index: a seeded, class-spread sample of a split, decoding only the sampled images.

Export validation, INT8 calibration and its accuracy search, ``--eval-images``
and the provider table need a few hundred images, not a whole split (ImageNet's
test split is 50,000 files, its train split 1.28 M). :func:`spread_indices`
picks ``n`` positions spread round-robin over the classes (seeded), and
:func:`load_sample` decodes only the files at those positions, with the
evaluation view of :mod:`.view` (the same pixels as the full split of
:func:`.load.load_data` at those positions, in either data mode).
"""
from __future__ import annotations

import torch

from ..errors import CompressError


def spread_indices(labels, n: int, seed: int = 0) -> list[int]:
    """``min(n, len(labels))`` positions of ``labels``, spread over the classes, sorted ascending.

    Deterministic for ``(labels, n, seed)``: the positions of each class are
    shuffled by a generator seeded with ``seed``, the classes are visited in a
    seeded order, and one position is taken from each class in turn
    (round-robin) until ``n`` are taken; a class that runs out is skipped. So
    ``n = k * classes`` over a split with at least ``k`` images per class gives
    exactly ``k`` per class, whatever the order of ``labels`` (class-sorted
    folders included). ``labels``: a sequence or 1-D tensor of ints.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    total = int(labels.shape[0])
    n = int(n)
    if n < 0:
        raise CompressError(f"a sample size must be 0 or more, got {n}")
    if n >= total:
        return list(range(total))
    g = torch.Generator().manual_seed(int(seed))
    classes = torch.unique(labels)
    classes = classes[torch.randperm(len(classes), generator=g)].tolist()
    queues = []
    for c in classes:
        pos = (labels == c).nonzero().flatten()
        queues.append(pos[torch.randperm(len(pos), generator=g)].tolist())
    out: list[int] = []
    depth = 0
    while len(out) < n:
        for q in queues:
            if depth < len(q):
                out.append(q[depth])
                if len(out) == n:
                    break
        depth += 1
    return sorted(out)


def load_sample(spec: str, split: str = "test", n: int = 256, seed: int = 0, *, image_size=None,
                channels: int | None = None, augment=None, family: str | None = None,
                skip_bad_images: bool = False):
    """``n`` images of one split of ``spec``, chosen by :func:`spread_indices`, decoded alone.

    Returns a :class:`.load.DataBundle` whose ``split`` attribute (``test`` or
    ``train``; the other is ``None``) is an in-memory :class:`.memory.ImageSplit`
    of the sampled images in the **evaluation view** (:func:`.view.eval_view` of
    the policy and size: what the model sees at test time -- also right for
    INT8 calibration), plus:

    * ``bundle.indices``: the sampled positions in the split's file list (as
      scanned: class folders sorted, files sorted), ascending;
    * ``bundle.decoded``: how many image files were decoded (``n`` or fewer,
      never the whole split; 0 for demo/CIFAR data, which are read whole from
      their small pickles / the embedded file).

    ``image_size`` (int or ``(H, W)``), ``channels``, ``augment`` and ``family``
    mean what they mean for :func:`.load.load_data`; pass the model's size and
    channels (as ``compressor.evaluation.load_data_for_model`` does) -- without
    them they are read from the headers of the sampled files only. The pixels
    equal those of ``load_data(spec, ...)``'s split at the same positions (same
    size, channels and policy). A sampled file that does not decode is an error
    naming it, or with ``skip_bad_images`` is left out (the sample is then smaller).
    """
    from .load import sample_split

    return sample_split(spec, split, n, seed, image_size=image_size, channels=channels, augment=augment,
                        family=family, skip_bad_images=skip_bad_images)


__all__ = ["spread_indices", "load_sample"]
