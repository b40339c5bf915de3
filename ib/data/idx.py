"""MNIST and Fashion-MNIST from IDX files, registered as "mnist" and "fashion_mnist", and the IDX reader."""
from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import zlib
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ib.data.base import DATASETS, DIGIT_CLASSES, Split, check_fixed_size, download_with_torchvision, one_line
from ib.errors import DataError

logger = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

# IDX type codes (third byte of the magic number) -> numpy dtype; multi-byte types are big-endian.
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def read_idx(path: str) -> Tensor:
    """Read an IDX file (the MNIST format), plain or gzip-compressed.

    The magic number is two zero bytes, a type code (0x08 for uint8) and the number of dimensions; the dimensions
    follow as big-endian int32, then the data. MNIST labels are 0x00000801 (uint8, 1-D) and images 0x00000803
    (uint8, 3-D).

    Args:
        path: The file; compression is recognised from its content, not its name.

    Returns:
        A tensor of the file's shape and type, in native byte order.

    Raises:
        DataError: The file cannot be read, is not IDX, or its size does not match its header (e.g. truncated).
    """
    raw = _read_maybe_gzip(path)
    if len(raw) < 4:
        raise DataError(f"{path}: not an IDX file ({len(raw)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{path}: not an IDX file (magic number 0x{struct.unpack('>I', raw[:4])[0]:08x})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, header alone needs {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"{path}: truncated or corrupt IDX file ({len(raw)} bytes, expected {expected} for shape {list(dims)})"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    # astype copies: the tensor gets writable memory in native byte order.
    return torch.from_numpy(array.astype(dtype.newbyteorder("=")))


def _read_maybe_gzip(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read: {one_line(exc)}") from exc
    return raw


def _find_idx_files(folders: Sequence[str]) -> Optional[List[str]]:
    """The four IDX files from the first folder holding all of them (plain preferred over .gz), else None."""
    for folder in folders:
        found = []
        for base in _IDX_FILES:
            candidates = [os.path.join(folder, base + ext) for ext in ("", ".gz")]
            match = next((p for p in candidates if os.path.isfile(p)), None)
            if match is None:
                break
            found.append(match)
        else:
            return found
    return None


def _load_idx_dataset(
    name: str, folder_name: str, root: str, download: bool, class_names: List[str]
) -> Tuple[Split, Split, List[str]]:
    """Find (or download) the four IDX files of MNIST-like data and read them into uint8 [N, 1, 28, 28] splits."""
    # 1. torchvision's layout first, then a flat folder (Debian's /usr/share/datasets/fashion-mnist).
    folders = [os.path.join(root, folder_name, "raw"), root]
    paths = _find_idx_files(folders)
    if paths is None and download:
        download_with_torchvision(name, folder_name, root, f"the four IDX files ({', '.join(_IDX_FILES)}, .gz or "
                                   f"plain) in {' or '.join(folders)}", train=False)
        paths = _find_idx_files(folders)
    if paths is None:
        hint = (
            "; on Debian `apt-get install dataset-fashion-mnist` puts Fashion-MNIST in "
            "/usr/share/datasets/fashion-mnist"
            if name == "fashion_mnist"
            else ""
        )
        tried = " (download was attempted)" if download else ""
        raise DataError(
            f"{name}: its IDX files ({', '.join(_IDX_FILES)}) were not found in {' or '.join(folders)}{tried}; "
            "set data.download=true to fetch it, or put the four IDX files (.gz or plain) in one of those folders"
            + hint
        )

    # 2. Read and check what each file holds.
    train_x, train_y, test_x, test_y = (read_idx(p) for p in paths)
    logger.debug("%s: read %s", name, ", ".join(paths))
    train = _idx_split(train_x, train_y, paths[0], paths[1])
    test = _idx_split(test_x, test_y, paths[2], paths[3])
    return train, test, list(class_names)


def _idx_split(images: Tensor, labels: Tensor, images_path: str, labels_path: str) -> Split:
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise DataError(f"{images_path}: expected uint8 images [N, H, W], got {images.dtype} {list(images.shape)}")
    if labels.dtype != torch.uint8 or labels.dim() != 1:
        raise DataError(f"{labels_path}: expected uint8 labels [N], got {labels.dtype} {list(labels.shape)}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path} holds {images.shape[0]} images but {labels_path} {labels.shape[0]} labels")
    return Split(images.unsqueeze(1), labels.long())  # [N, 1, H, W] uint8, [N] int64


@DATASETS.register("mnist")
def _load_mnist(root: str, download: bool, image_size: Optional[int]) -> Tuple[Split, Split, List[str]]:
    """MNIST from IDX files in `root/MNIST/raw/` or `root/`: 60,000 train and 10,000 test images, 28x28."""
    check_fixed_size("mnist", image_size, 28)
    return _load_idx_dataset("mnist", "MNIST", root, download, DIGIT_CLASSES)


@DATASETS.register("fashion_mnist")
def _load_fashion_mnist(root: str, download: bool, image_size: Optional[int]) -> Tuple[Split, Split, List[str]]:
    """Fashion-MNIST from IDX files in `root/FashionMNIST/raw/` or `root/`: same format and sizes as MNIST."""
    check_fixed_size("fashion_mnist", image_size, 28)
    return _load_idx_dataset("fashion_mnist", "FashionMNIST", root, download, FASHION_MNIST_CLASSES)
