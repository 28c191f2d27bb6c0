"""Image classification data: formats on disk, two backends (memory, stream), transforms.

==================  ===========================================================
module              what it holds
==================  ===========================================================
``formats``         demo set, CIFAR pickles, ImageFolder scanning, file decoding, bad-file report
``memory``          :class:`ImageSplit`: a split decoded once into uint8 ``(N, C, H, W)``
``stream``          :class:`FileSplit`: a split as files, decoded by DataLoader workers
``transforms``      fit to size, cifar / imagenet / none augmentation, normalisation
``loader``          :func:`make_loader` over both backends, :class:`EpochSampler`, :func:`subset`, :func:`as_eval`
``load``            :func:`load_data`: size, channels and backend choice; :class:`DataBundle`
``view``            :class:`EvalView`, :func:`eval_view`: the one evaluation view (val, test, eval, export)
``sampling``        :func:`spread_indices`, :func:`load_sample`: decode only a class-spread sample of a split
==================  ===========================================================

Accepted ``DATA`` specs (:func:`load_data`): ``demo`` (the embedded class-balanced
CIFAR-10 slice, 5,000 train / 1,000 test; write ``./demo`` for a folder of that
name); a CIFAR-10 or CIFAR-100 python-version directory (or its parent); an
ImageFolder root with ``train/`` and ``val/`` or ``test/`` (``test/`` wins),
one sub-folder per class, files ending in .jpg, .jpeg, .png, .bmp or .webp.
Errors in the input raise :class:`compressor.errors.CompressError` with one
line naming the problem and the fix.
"""
from .formats import DEMO_PATH, IMAGE_EXTENSIONS, decode_file
from .load import MODES, DataBundle, choose_mode, load_data, synthetic_data
from .loader import EpochSampler, as_eval, channel_stats, make_loader, subset
from .memory import ImageSplit
from .stream import FileSplit
from .sampling import load_sample, spread_indices
from .transforms import (POLICIES, augment_batch, batch_augmentation, crop_flip, eval_crop, fit_image, normalize,
                         resolve_policy, store_size)
from .view import EvalView, eval_view

__all__ = [
    "ImageSplit", "FileSplit", "DataBundle", "load_data", "synthetic_data", "augment_batch", "crop_flip",
    "normalize", "EpochSampler", "make_loader", "subset", "DEMO_PATH", "IMAGE_EXTENSIONS", "MODES", "POLICIES",
    "choose_mode", "channel_stats", "decode_file", "eval_crop", "fit_image", "resolve_policy", "batch_augmentation",
    "as_eval", "store_size", "EvalView", "eval_view", "load_sample", "spread_indices",
]
