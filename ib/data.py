"""In-memory data sets and a tensor batch loader.

Every data set is decoded once into tensors (`Split`), so the training loop indexes tensors on the device and does no
per-sample Python or PIL work. Images are kept as uint8 (0..255) to save memory and converted to float32 in [0, 1] one
batch at a time by `BatchLoader`; normalisation by `DataSplits.mean`/`std` happens inside the model.

Data sets are registered in `DATASETS`; each loader is `fn(root, download, image_size) -> (train, test, class_names)`
and `load_data` holds out part of the training split for validation.
"""
from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import logging
import math
import os
import pickle
import struct
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ib.errors import CheckpointError, ConfigError, DataError
from ib.registry import Registry

logger = logging.getLogger(__name__)

DATASETS = Registry("data set")

Augment = Callable[[Tensor, torch.Generator], Tensor]

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
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


def load_data(
    name: str,
    *,
    root: str,
    download: bool,
    val_fraction: float,
    seed: int,
    image_size: Optional[int] = None,
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

    Returns:
        The three splits with class count, input shape, normalisation statistics and class names.

    Raises:
        ConfigError: Unknown `name`, or `val_fraction` or `image_size` out of range.
        DataError: The data set's files are missing or unreadable.
    """
    loader = DATASETS.get(name)
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    if image_size is not None and image_size < 1:
        raise ConfigError(f"data.image_size must be a positive integer or null, got {image_size}")

    start = time.perf_counter()
    full_train, test, class_names = loader(root, download, image_size)
    if len(full_train) == 0:
        raise DataError(f"{name}: the training split in {root} is empty")
    _check_labels(name, full_train, len(class_names))
    _check_labels(name, test, len(class_names))

    train, val = _hold_out(full_train, val_fraction, seed)
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


def _channel_stats(x: Tensor, max_elements: int = 1 << 22) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and population std of `x` [N, C, H, W] in [0, 1] scale, in float64 chunks of rows."""
    scale = 255.0 if x.dtype == torch.uint8 else 1.0
    n, c = x.shape[:2]
    per_row = max(1, x[0].numel())
    rows = max(1, max_elements // per_row)
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, n, rows):
        # Reducing the contiguous last axis first is ~3x faster than reducing dims (0, 2, 3) at once.
        part = x[start:start + rows].flatten(2).to(torch.float64)  # [rows, C, H*W]
        total += part.sum(dim=2).sum(dim=0)
        total_sq += part.square().sum(dim=2).sum(dim=0)
    count = n * x.shape[2] * x.shape[3]
    mean = total / (count * scale)  # [C]
    std = (total_sq / (count * scale**2) - mean.square()).clamp_min(0.0).sqrt()  # [C]
    return tuple(mean.tolist()), tuple(std.tolist())


def _check_fixed_size(name: str, image_size: Optional[int], native: int) -> None:
    if image_size is not None and image_size != native:
        raise ConfigError(
            f"data.image_size={image_size} is not supported for {name}, whose images are {native}x{native}; "
            "resizing applies only to image_folder (leave data.image_size null)"
        )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------------
# digits (scikit-learn)


@DATASETS.register("digits")
def _load_digits(root: str, download: bool, image_size: Optional[int]) -> Tuple[Split, Split, List[str]]:
    """scikit-learn's bundled 8x8 digits: 1,797 images, a fixed stratified 80/20 train/test split.

    `root` and `download` are ignored: the data ship with scikit-learn.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _check_fixed_size("digits", image_size, 8)
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


# ---------------------------------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST (IDX files)

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
        raise DataError(f"{path}: cannot read: {_one_line(exc)}") from exc
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
        _download_with_torchvision(name, folder_name, root, f"the four IDX files ({', '.join(_IDX_FILES)}, .gz or "
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


def _download_with_torchvision(name: str, class_name: str, root: str, place: str, **kwargs: Any) -> None:
    """Let torchvision's data set class `class_name` download (and check) its files into `root`; `place` says
    where the files go by hand (e.g. "the four IDX files in data/MNIST/raw"), for the message when it fails."""
    import torchvision.datasets
    from urllib.error import URLError

    logger.info("%s: downloading into %s", name, root)
    try:
        getattr(torchvision.datasets, class_name)(root, download=True, **kwargs)
    except (URLError, OSError, RuntimeError) as exc:
        raise DataError(
            f"{name}: download into {root} failed ({_one_line(exc)}); without network access, put {place} yourself"
        ) from exc


@DATASETS.register("mnist")
def _load_mnist(root: str, download: bool, image_size: Optional[int]) -> Tuple[Split, Split, List[str]]:
    """MNIST from IDX files in `root/MNIST/raw/` or `root/`: 60,000 train and 10,000 test images, 28x28."""
    _check_fixed_size("mnist", image_size, 28)
    return _load_idx_dataset("mnist", "MNIST", root, download, DIGIT_CLASSES)


@DATASETS.register("fashion_mnist")
def _load_fashion_mnist(root: str, download: bool, image_size: Optional[int]) -> Tuple[Split, Split, List[str]]:
    """Fashion-MNIST from IDX files in `root/FashionMNIST/raw/` or `root/`: same format and sizes as MNIST."""
    _check_fixed_size("fashion_mnist", image_size, 28)
    return _load_idx_dataset("fashion_mnist", "FashionMNIST", root, download, FASHION_MNIST_CLASSES)


# ---------------------------------------------------------------------------------------------------------------------
# CIFAR-10 (python batches)

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
        raise DataError(f"{path}: cannot read: {_one_line(exc)}") from exc


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
    _check_fixed_size("cifar10", image_size, 32)
    folder = os.path.join(root, _CIFAR_FOLDER)

    def missing() -> List[str]:
        return [f for f in _CIFAR_FILES if not os.path.isfile(os.path.join(folder, f))]

    if missing() and download:
        _download_with_torchvision("cifar10", "CIFAR10", root, f"{', '.join(_CIFAR_FILES)} in {folder} (extract "
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


# ---------------------------------------------------------------------------------------------------------------------
# image_folder (root/train/<class>/*, root/test/<class>/*)


@DATASETS.register("image_folder")
def _load_image_folder(root: str, download: bool, image_size: Optional[int]) -> Tuple[Split, Split, List[str]]:
    """Images in torchvision's ImageFolder layout, `root/train/<class>/*` and `root/test/<class>/*`, as RGB uint8.

    Every image is decoded once; with `image_size` it is resized to image_size x image_size (aspect ratio not kept),
    otherwise all images must share one size. The decoded tensors are cached in `root/.ib_cache_<part>_<size>.pt`
    and reused while every image file still has the path, size, modification time and class it had when the cache
    was written (`_fingerprint`): adding, removing, replacing or editing a file anywhere under the part's folder
    decodes it again, whatever the folders' own times (`tar x` and `cp -a` restore old ones). `download` is
    ignored: there is nothing to fetch.
    """
    from torchvision.datasets.folder import find_classes

    classes: Dict[str, List[str]] = {}
    for part in ("train", "test"):
        folder = os.path.join(root, part)
        if not os.path.isdir(folder):
            raise DataError(
                f"image_folder: {folder} not found; expected {root}/train/<class>/* and {root}/test/<class>/*"
            )
        try:
            classes[part] = find_classes(folder)[0]
        except FileNotFoundError as exc:
            raise DataError(f"image_folder: {_one_line(exc)}") from exc
    if classes["train"] != classes["test"]:
        raise DataError(
            f"image_folder: {root}/train and {root}/test have different class folders: "
            f"{classes['train']} vs {classes['test']}"
        )
    train = _image_folder_part(root, "train", classes["train"], image_size)
    test = _image_folder_part(root, "test", classes["test"], image_size)
    return train, test, classes["train"]


def _image_folder_part(root: str, part: str, classes: List[str], image_size: Optional[int]) -> Split:
    folder = os.path.join(root, part)
    cache_path = os.path.join(root, f".ib_cache_{part}_{image_size if image_size else 'native'}.pt")
    samples = _folder_samples(folder)
    fingerprint = _fingerprint(folder, samples)
    cached = _read_cache(cache_path, folder, classes, fingerprint)
    if cached is not None:
        return cached
    split = _decode_folder(folder, samples, image_size)
    _write_cache(cache_path, split, classes, fingerprint)
    return split


def _folder_samples(folder: str) -> List[Tuple[str, int]]:
    """ImageFolder's [(path, class index)] of `folder`, sorted by class then file name."""
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(folder).samples
    except FileNotFoundError as exc:
        raise DataError(f"image_folder: {_one_line(exc)}") from exc


def _fingerprint(folder: str, samples: List[Tuple[str, int]]) -> str:
    """A digest of every sample's path below `folder`, size, modification time and class: what a cache of the
    decoded images must match (one stat per file, on every load)."""
    digest = hashlib.sha256()
    for path, label in samples:
        st = os.stat(path)
        digest.update(f"{os.path.relpath(path, folder)}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
    return digest.hexdigest()


def _read_cache(path: str, folder: str, classes: List[str], fingerprint: str) -> Optional[Split]:
    """The cached split at `path`, or None when it is absent, written for other files (`fingerprint`), unreadable
    or inconsistent."""
    try:
        cache = torch.load(path, weights_only=True)
        if cache.get("fingerprint") != fingerprint:
            logger.debug("cache %s was written for other files than %s holds now; decoding again", path, folder)
            return None
        x, y = cache["x"], cache["y"]
        ok = (
            cache.get("classes") == classes
            and x.dtype == torch.uint8 and x.dim() == 4
            and y.dtype == torch.int64 and y.shape == (x.shape[0],)
        )
    except FileNotFoundError:
        return None
    except Exception as exc:  # a corrupt or foreign cache is rebuilt, whatever torch.load raises
        logger.debug("cache %s unusable (%s); decoding again", path, _one_line(exc))
        return None
    if not ok:
        logger.debug("cache %s does not match %s; decoding again", path, folder)
        return None
    logger.info("read %d images from cache %s", x.shape[0], path)
    return Split(x, y)


def _write_cache(path: str, split: Split, classes: List[str], fingerprint: str) -> None:
    """Save `split` to `path` atomically (temporary file, then rename); skip quietly where that fails."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".ib_cache_", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save({"x": split.x, "y": split.y, "classes": list(classes), "fingerprint": fingerprint}, f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; others reading a shared data folder may use it too
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        logger.debug("not caching decoded images at %s: %s", path, _one_line(exc))
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _decode_folder(folder: str, samples: List[Tuple[str, int]], image_size: Optional[int]) -> Split:
    """Decode `samples` ([(path, class index)] under `folder`/<class>/) into uint8 [N, 3, H, W] with int64 labels
    [N]."""
    start = time.perf_counter()
    # One decode after another: torchvision's decoders release the GIL, but a 32x32 JPEG takes ~40 us, too little
    # for a thread pool to pay for its hand-offs (measured slower with 2 threads than with 1).
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec, warning on every call; PIL takes over
        # once they are gone (see _decode_with_torchvision).
        warnings.filterwarnings("ignore", message="The image decoding", category=DeprecationWarning)
        images = [_decode_image(path, image_size) for path, _ in samples]  # each [3, H, W] uint8
    sizes = {tuple(img.shape[-2:]) for img in images}
    if len(sizes) > 1:
        raise DataError(
            f"image_folder: images in {folder} have {len(sizes)} different sizes (e.g. {sorted(sizes)[:3]}); "
            "set data.image_size to resize them all to one square size"
        )
    x = torch.stack(images)  # [N, 3, H, W]
    y = torch.tensor([label for _, label in samples], dtype=torch.int64)  # [N]
    logger.info("decoded %d images from %s in %.1fs", len(samples), folder, time.perf_counter() - start)
    return Split(x, y)


def _decode_image(path: str, image_size: Optional[int]) -> Tensor:
    """One image file as RGB uint8 [3, H, W], resized to [3, image_size, image_size] if `image_size` is set."""
    from torchvision.transforms.v2 import functional as TF

    try:
        with open(path, "rb") as f:
            raw = bytearray(f.read())
    except OSError as exc:
        raise DataError(f"image_folder: cannot read {path}: {_one_line(exc)}") from exc
    if not raw:
        raise DataError(f"image_folder: {path} is an empty file")
    img = _decode_with_torchvision(raw)
    if img is None:
        img = _decode_with_pil(raw, path)
    if img.dim() == 4:  # an animated GIF: [frames, 3, H, W]
        img = img[0]
    if img.dtype != torch.uint8:  # 16-bit PNG
        img = TF.to_dtype(img, torch.uint8, scale=True)
    if image_size is not None and tuple(img.shape[-2:]) != (image_size, image_size):
        img = TF.resize(img, [image_size, image_size], antialias=True)
    return img


def _decode_with_torchvision(raw: bytearray) -> Optional[Tensor]:
    """Decode JPEG, PNG, WebP or GIF bytes to RGB [3, H, W] (2-3x faster than PIL); None for other formats."""
    try:
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:  # a torchvision whose decoders have moved to TorchCodec
        return None
    try:
        return decode_image(torch.frombuffer(raw, dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:  # BMP, TIFF, ... or a corrupt file, which PIL then reports
        return None


def _decode_with_pil(raw: bytearray, path: str) -> Tensor:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as im:
            array = np.array(im.convert("RGB"))  # [H, W, 3] uint8
    except (OSError, ValueError) as exc:  # UnidentifiedImageError is an OSError
        raise DataError(f"image_folder: cannot decode {path}: {_one_line(exc)}") from exc
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # [3, H, W]


# ---------------------------------------------------------------------------------------------------------------------
# Batches and augmentation


class BatchLoader:
    """Iterates over a `Split` held on a device, in batches of float32 inputs in [0, 1].

    The split's tensors move to `device` once, staying uint8 where they are; each batch is gathered and converted
    there. Shuffling draws a new permutation each epoch (each `iter`) from the loader's own CPU generator, which it
    also passes to `augment`, so `state_dict()` captures everything random about the next epoch.

    Args:
        split: The samples.
        batch_size: Samples per batch.
        shuffle: Whether each epoch visits the samples in a new random order.
        drop_last: Whether to drop a final batch smaller than `batch_size` (training: MINE needs >= 2 per batch).
        device: Where the split is held and batches are made.
        augment: Optional `fn(x [B, C, H, W] float, generator) -> x` applied to each batch.
        seed: Seed of the loader's generator.
        rank, world_size: Data parallelism: every process draws the same order of global batches of `batch_size`
            and keeps rows [rank * b, (rank + 1) * b) of each, b = batch_size / world_size. Augmentation runs on
            the whole global batch, so the generator advances alike in every process and `state_dict()` is the
            same everywhere: a run stopped with N processes resumes with any other number.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        device: torch.device | str = "cpu",
        augment: Optional[Augment] = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        if batch_size % world_size:
            raise ConfigError(f"data.batch_size={batch_size} is the global batch and must divide by the number of "
                              f"processes ({world_size})")
        if world_size > 1 and not drop_last:
            raise ValueError("a loader shared by several processes needs drop_last (whole global batches)")
        part = batch_size // world_size
        self._rows = slice(rank * part, (rank + 1) * part)  # this process's rows of each global batch
        self.device = torch.device(device)
        self.x = split.x.to(self.device)  # [N, C, H, W], dtype kept (uint8 for images)
        self.y = split.y.to(self.device)  # [N]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)
        self._order: Optional[Tensor] = None  # [N] order of the epoch in progress (None between epochs)
        self._position = 0  # batches of that epoch already yielded
        if drop_last and 0 < len(split) < batch_size:
            warnings.warn(
                f"BatchLoader: {len(split)} samples and batch size {batch_size} with drop_last: no batches",
                stacklevel=2,
            )

    def __len__(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batches_left(self) -> int:
        """Batches the next `iter` yields: all of an epoch, or the rest of one that was stopped part-way."""
        return len(self) - self._position

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        if self._order is None:  # a new epoch: draw its order
            n = self.x.shape[0]
            self._order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)  # [N]
            self._position = 0
        order = self._order.to(self.device)
        while self._position < len(self):
            i = self._position
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]  # the global batch [B]
            if self.augment is None:
                idx = idx[self._rows]  # this process's rows [B / world_size]
            x = self.x[idx]
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()  # [B, C, H, W] in [0, 1]
            y = self.y[idx]
            if self.augment is not None:
                x, y = self.augment(x, self.generator)[self._rows], y[self._rows]
            self._position += 1
            yield x, y
        self._order, self._position = None, 0

    def state_dict(self) -> Dict[str, Tensor | int]:
        """Everything random about the rest of this epoch and the next ones: the generator, and, when an epoch was
        stopped part-way, its order and how many batches it has yielded."""
        order = self._order if self._order is not None else torch.empty(0, dtype=torch.long)
        return {"generator": self.generator.get_state(), "order": order, "position": self._position}

    def load_state_dict(self, state: Dict[str, Tensor | int]) -> None:
        if "generator" not in state:
            raise ValueError(f"BatchLoader state needs a 'generator' entry, got {sorted(state)}")
        order = state.get("order")
        order = order.cpu() if isinstance(order, Tensor) and order.numel() else None
        position = int(state.get("position", 0)) if order is not None else 0
        if order is not None and order.numel() != self.x.shape[0]:
            raise CheckpointError(f"the saved loader position is for a training set of {order.numel()} samples, "
                                  f"this one has {self.x.shape[0]}: the data set changed since the checkpoint was "
                                  f"saved; resume needs the same data")
        self.generator.set_state(state["generator"])
        self._order, self._position = order, position


def random_crop_flip(x: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """CIFAR-style augmentation of a batch: a random crop of the zero-padded image, then a random horizontal flip.

    Random numbers come from `generator` on the CPU, in this order: row offsets [B], column offsets [B], flips [B].

    Args:
        x: Images, [B, C, H, W].
        generator: CPU generator for the offsets and flips.
        padding: Zero padding on each side; offsets are uniform in 0..2*padding.

    Returns:
        Augmented images, [B, C, H, W], on x's device.
    """
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip expects [B, C, H, W], got {list(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    b, c, h, w = x.shape
    # 1. Draw a window offset per sample and whether to flip it.
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)  # [B]
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)  # [B]
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)  # [B]
    # 2. Row and column indices of each window in the padded image; a flip reverses the columns.
    rows = dy[:, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = dx[:, None] + torch.arange(w, device=x.device)  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # [B, W]
    # 3. Gather all windows at once.
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))  # [B, C, H+2p, W+2p]
    batch = torch.arange(b, device=x.device)[:, None, None, None]  # [B, 1, 1, 1]
    channel = torch.arange(c, device=x.device)[None, :, None, None]  # [1, C, 1, 1]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]  # [B, C, H, W]


AUGMENTATIONS: Dict[str, Optional[Augment]] = {"none": None, "crop_flip": random_crop_flip}


def get_augment(name: str) -> Optional[Augment]:
    """The augmentation called `name` in `AUGMENTATIONS` (None for "none").

    Raises:
        ConfigError: Unknown name; the message lists the valid ones.
    """
    if name not in AUGMENTATIONS:
        raise ConfigError(f"unknown augmentation '{name}'; valid: {', '.join(sorted(AUGMENTATIONS))}")
    return AUGMENTATIONS[name]
