"""CIFAR-10 from its python batches, registered as "cifar10", read by an unpickler that builds arrays only."""
from __future__ import annotations

import codecs
import os
import pickle
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ib.data.base import DATASETS, Split, check_fixed_size, download_with_torchvision, one_line
from ib.errors import DataError

_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR_FILES = _CIFAR_TRAIN + ["test_batch", "batches.meta"]


def _numpy_globals() -> Dict[Tuple[str, str], Any]:
    """The only globals a pickle of plain numpy arrays refers to, under their numpy 1 and numpy 2 module names."""
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: Dict[Tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles written by Python 3
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol-5 pickles
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds dicts, lists, strings and numpy arrays and refuses every other Python object.

    A pickle can call any importable function while it loads (`os.system`, ...); CIFAR-10's batches need none.
    """

    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file, encoding="latin1")  # the batches were pickled by Python 2
        self._path = path
        self._allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to load {self._path}: it contains Python objects ({module}.{name}), not just arrays"
            ) from None


def _unpickle_arrays(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, path).load()
    except DataError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"{path}: cannot read: {one_line(exc)}") from exc


def _entry(batch: Any, key: str, path: str) -> Any:
    """`batch[key]`, accepting str keys (Python 2 pickles read as latin1) and bytes keys."""
    if isinstance(batch, dict):
        for k in (key, key.encode()):
            if k in batch:
                return batch[k]
    raise DataError(f"{path}: not a CIFAR-10 batch (no '{key}' entry)")


def _read_cifar_batches(paths: Sequence[str]) -> Split:
    xs, ys = [], []
    for path in paths:
        batch = _unpickle_arrays(path)
        data = np.asarray(_entry(batch, "data", path))
        labels = np.asarray(_entry(batch, "labels", path))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{path}: expected uint8 data [N, 3072], got {data.dtype} {list(data.shape)}")
        if labels.shape != (data.shape[0],):
            raise DataError(f"{path}: {data.shape[0]} images but labels of shape {list(labels.shape)}")
        # Each row is the R plane, then G, then B, each 32x32 row-major: exactly [3, 32, 32] in C order.
        xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))  # [n, 3, 32, 32] uint8
        ys.append(torch.from_numpy(labels.astype(np.int64)))  # [n]
    return Split(torch.cat(xs), torch.cat(ys))


@DATASETS.register("cifar10")
def _load_cifar10(root: str, download: bool, image_size: Optional[int]) -> Tuple[Split, Split, List[str]]:
    """CIFAR-10's python batches in `root/cifar-10-batches-py/`: 50,000 train and 10,000 test images, 32x32 RGB.

    The batches are unpickled with `_ArrayUnpickler`, which refuses anything but arrays. Checksums are not verified
    (torchvision verifies them when it downloads).
    """
    check_fixed_size("cifar10", image_size, 32)
    folder = os.path.join(root, _CIFAR_FOLDER)

    def missing() -> List[str]:
        return [f for f in _CIFAR_FILES if not os.path.isfile(os.path.join(folder, f))]

    if missing() and download:
        download_with_torchvision("cifar10", "CIFAR10", root, f"{', '.join(_CIFAR_FILES)} in {folder} (extract "
                                   f"cifar-10-python.tar.gz into {root})", train=False)
    absent = missing()
    if absent:
        tried = " (download was attempted)" if download else ""
        raise DataError(
            f"cifar10: {', '.join(absent)} not found in {folder}{tried}; set data.download=true to fetch it, "
            f"or extract cifar-10-python.tar.gz into {root}"
        )
    train = _read_cifar_batches([os.path.join(folder, f) for f in _CIFAR_TRAIN])
    test = _read_cifar_batches([os.path.join(folder, "test_batch")])
    meta_path = os.path.join(folder, "batches.meta")
    label_names = _entry(_unpickle_arrays(meta_path), "label_names", meta_path)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in label_names]
    return train, test, names
