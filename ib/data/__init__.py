"""In-memory data sets and a tensor batch loader.

Every data set is decoded once into tensors (`Split`), so the training loop indexes tensors on the device and does no
per-sample Python or PIL work. Images are kept as uint8 (0..255) to save memory and converted to float32 in [0, 1] one
batch at a time by `BatchLoader`; normalisation by `DataSplits.mean`/`std` happens inside the model.

Data sets are registered in `DATASETS`; each loader is `fn(root, download, image_size) -> (train, test, class_names)`
and `load_data` holds out part of the training split for validation. The loaders live in `digits`, `idx` (MNIST,
Fashion-MNIST), `cifar` and `image_folder`, over `base` (`Split`, `DataSplits`, `DATASETS`); `loader` holds
`BatchLoader` and the augmentations.
"""
from __future__ import annotations

import logging
import time
from typing import Optional, Tuple

import torch
from torch import Tensor

from ib.data import cifar, digits, idx, image_folder  # noqa: F401  (importing a loader module registers its data set)
from ib.data.base import DATASETS, DIGIT_CLASSES, DataSplits, Split
from ib.data.idx import FASHION_MNIST_CLASSES, read_idx
from ib.data.loader import AUGMENTATIONS, Augment, BatchLoader, random_crop_flip
from ib.errors import ConfigError, DataError

__all__ = [
    "AUGMENTATIONS",
    "Augment",
    "BatchLoader",
    "DATASETS",
    "DIGIT_CLASSES",
    "DataSplits",
    "FASHION_MNIST_CLASSES",
    "Split",
    "load_data",
    "random_crop_flip",
    "read_idx",
]

logger = logging.getLogger(__name__)


def load_data(
    name: str,
    *,
    root: str,
    download: bool,
    val_fraction: float,
    seed: int,
    image_size: Optional[int] = None,
    label_noise: float = 0.0,
) -> DataSplits:
    """Load a registered data set into memory and hold out a validation part of its training split.

    The validation rows are a uniformly random subset of the loader's training split, of size
    `floor(val_fraction * N)`, drawn from `torch.Generator().manual_seed(seed)`: the same seed gives the same split.
    Both parts keep the loader's order. With `val_fraction == 0` the validation split is empty (0 rows).

    Args:
        name: A name registered in `DATASETS` ("digits", "mnist", "fashion_mnist", "cifar10", "image_folder").
        root: Folder holding the data set's files (ignored by "digits").
        download: Whether a missing data set may be downloaded (MNIST, Fashion-MNIST and CIFAR-10 only).
        val_fraction: Fraction of the training split held out for validation, in [0, 1).
        seed: Seed of the validation hold-out.
        image_size: Side to which "image_folder" resizes its images; the other data sets have a fixed size and
            accept only None or that size.
        label_noise: Share of the training rows (after the hold-out) whose label is replaced by one drawn uniformly
            from all classes (so it may stay right), as in the random-label experiments of Zhang et al. 2017 and
            Baratin et al. 2021; validation and test labels are never changed. Seeded by `seed`.

    Returns:
        The three splits with class count, input shape, normalisation statistics and class names.

    Raises:
        ConfigError: Unknown `name`, or `val_fraction` or `image_size` out of range.
        DataError: The data set's files are missing or unreadable.
    """
    loader = DATASETS.get(name)
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    if not 0.0 <= label_noise <= 1.0:
        raise ConfigError(f"data.label_noise must be in [0, 1], got {label_noise}")
    if image_size is not None and image_size < 1:
        raise ConfigError(f"data.image_size must be a positive integer or null, got {image_size}")

    start = time.perf_counter()
    full_train, test, class_names = loader(root, download, image_size)
    if len(full_train) == 0:
        raise DataError(f"{name}: the training split in {root} is empty")
    _check_labels(name, full_train, len(class_names))
    _check_labels(name, test, len(class_names))

    train, val = _hold_out(full_train, val_fraction, seed)
    if label_noise > 0:
        train = _randomise_labels(train, label_noise, len(class_names), seed)
    mean, std = _channel_stats(train.x)
    c, h, w = train.x.shape[1:]
    logger.info(
        "loaded %s in %.1fs: %d train, %d val, %d test, shape %s",
        name, time.perf_counter() - start, len(train), len(val), len(test), (c, h, w),
    )
    return DataSplits(
        train=train,
        val=val,
        test=test,
        num_classes=len(class_names),
        in_shape=(c, h, w),
        mean=mean,
        std=std,
        class_names=list(class_names),
    )


def _check_labels(name: str, split: Split, num_classes: int) -> None:
    if len(split) and (int(split.y.min()) < 0 or int(split.y.max()) >= num_classes):
        raise DataError(
            f"{name}: labels span {int(split.y.min())}..{int(split.y.max())} but there are {num_classes} classes"
        )


def _hold_out(split: Split, val_fraction: float, seed: int) -> Tuple[Split, Split]:
    """Split off a random `floor(val_fraction * N)` rows as validation; both parts keep their original order."""
    n = len(split)
    n_val = int(val_fraction * n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # [N]
    val_idx = perm[:n_val].sort().values  # [n_val]
    train_idx = perm[n_val:].sort().values  # [N - n_val]
    return Split(split.x[train_idx], split.y[train_idx]), Split(split.x[val_idx], split.y[val_idx])


def _randomise_labels(split: Split, share: float, num_classes: int, seed: int) -> Split:
    """`split` with the labels of floor(share * N) rows, drawn by a seeded permutation, replaced by uniformly
    random classes (the inputs are shared, the labels copied)."""
    g = torch.Generator().manual_seed(seed + 1)  # not the hold-out's stream
    rows = torch.randperm(len(split), generator=g)[:int(share * len(split))]  # [M]
    y = split.y.clone()
    y[rows] = torch.randint(num_classes, (len(rows),), generator=g)
    logger.info("label noise: %d of %d training labels drawn at random (%d changed)", len(rows), len(y),
                int((y != split.y).sum()))
    return Split(split.x, y)


def _channel_stats(x: Tensor, max_elements: int = 1 << 22) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and population std of `x` [N, C, H, W] in [0, 1] scale, in float64 chunks of rows."""
    scale = 255.0 if x.dtype == torch.uint8 else 1.0
    n, c = x.shape[:2]
    per_row = max(1, x[0].numel())
    rows = max(1, max_elements // per_row)
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, n, rows):
        # Reducing the contiguous last axis first is faster than reducing dims (0, 2, 3) at once.
        part = x[start:start + rows].flatten(2).to(torch.float64)  # [rows, C, H*W]
        total += part.sum(dim=2).sum(dim=0)
        total_sq += part.square().sum(dim=2).sum(dim=0)
    count = n * x.shape[2] * x.shape[3]
    mean = total / (count * scale)  # [C]
    std = (total_sq / (count * scale**2) - mean.square()).clamp_min(0.0).sqrt()  # [C]
    return tuple(mean.tolist()), tuple(std.tolist())
