"""What every data-set loader shares: the in-memory `Split`, the `DATASETS` registry, and the checks and messages
common to the file formats.

A loader is registered in `DATASETS` as `fn(root, download, image_size) -> (train, test, class_names)`; the loader
modules (`digits`, `idx`, `cifar`, `image_folder`) import this module, and `ib.data` imports them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

from ib.errors import ConfigError, DataError
from ib.registry import Registry

logger = logging.getLogger(__name__)

DATASETS = Registry("data set")

DIGIT_CLASSES = [str(i) for i in range(10)]


@dataclass
class Split:
    """One part of a data set, held in memory.

    Attributes:
        x: Inputs, [N, C, H, W]: uint8 in 0..255 for image data, float32 in [0, 1] for `digits`.
        y: Class indices, [N] int64.
    """

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def sample(self, n: int, seed: int) -> "Split":
        """`n` samples drawn by a seeded permutation, so that a subset of a split stored in class order (an
        image folder's) still holds every class in proportion; the whole split, in its own order, when `n` covers
        it."""
        if n >= len(self):
            return self
        rows = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return Split(self.x[rows], self.y[rows])


@dataclass
class DataSplits:
    """A data set split three ways, with what a model needs to know about it.

    Attributes:
        train: Training samples (the loader's training split less the validation hold-out).
        val: Held-out part of the loader's training split; 0 rows when `val_fraction` is 0.
        test: The data set's official test split.
        num_classes: Number of classes; labels are 0..num_classes-1.
        in_shape: (C, H, W) of one input.
        mean: Per-channel mean of `train.x` in [0, 1] scale, for normalisation inside the model.
        std: Per-channel (population) standard deviation of `train.x` in [0, 1] scale.
        class_names: Human-readable name of each class index.
    """

    train: Split
    val: Split
    test: Split
    num_classes: int
    in_shape: Tuple[int, int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    class_names: List[str]


def check_fixed_size(name: str, image_size: Optional[int], native: int) -> None:
    """Refuse an `image_size` other than None or `native` for a data set `name` whose images are native x native."""
    if image_size is not None and image_size != native:
        raise ConfigError(
            f"data.image_size={image_size} is not supported for {name}, whose images are {native}x{native}; "
            "resizing applies only to image_folder (leave data.image_size null)"
        )


def one_line(exc: BaseException) -> str:
    """`exc`'s message on one line (its type's name when it has none), to quote inside a DataError."""
    return " ".join(str(exc).split()) or type(exc).__name__


def download_with_torchvision(name: str, class_name: str, root: str, place: str, **kwargs: Any) -> None:
    """Let torchvision's data set class `class_name` download (and check) its files into `root`; `place` says
    where the files go by hand (e.g. "the four IDX files in data/MNIST/raw"), for the message when it fails."""
    from urllib.error import URLError

    import torchvision.datasets

    logger.info("%s: downloading into %s", name, root)
    try:
        getattr(torchvision.datasets, class_name)(root, download=True, **kwargs)
    except (URLError, OSError, RuntimeError) as exc:
        raise DataError(
            f"{name}: download into {root} failed ({one_line(exc)}); without network access, put {place} yourself"
        ) from exc
