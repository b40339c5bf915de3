"""scikit-learn's bundled 8x8 digits, registered as "digits"."""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch

from ib.data.base import DATASETS, DIGIT_CLASSES, Split, check_fixed_size


@DATASETS.register("digits")
def _load_digits(root: str, download: bool, image_size: Optional[int]) -> Tuple[Split, Split, List[str]]:
    """scikit-learn's bundled 8x8 digits: 1,797 images, a fixed stratified 80/20 train/test split.

    `root` and `download` are ignored: the data ship with scikit-learn.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    check_fixed_size("digits", image_size, 8)
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # [1797, 1, 8, 8] in [0, 1]
    y = torch.from_numpy(bunch.target.astype(np.int64))  # [1797]
    # A fixed split, independent of the run's seed, so every run is tested on the same images.
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=0.2, stratify=bunch.target, random_state=0
    )
    train_idx = torch.from_numpy(np.sort(train_idx))
    test_idx = torch.from_numpy(np.sort(test_idx))
    return Split(x[train_idx], y[train_idx]), Split(x[test_idx], y[test_idx]), list(DIGIT_CLASSES)
