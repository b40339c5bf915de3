"""Images in torchvision's ImageFolder layout (root/train/<class>/*, root/test/<class>/*), registered as
"image_folder": decoded once into uint8 tensors and cached beside the images."""
from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import time
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ib.data.base import DATASETS, Split, one_line
from ib.errors import DataError

logger = logging.getLogger(__name__)


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
            raise DataError(f"image_folder: {one_line(exc)}") from exc
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
        raise DataError(f"image_folder: {one_line(exc)}") from exc


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
        logger.debug("cache %s unusable (%s); decoding again", path, one_line(exc))
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
        logger.debug("not caching decoded images at %s: %s", path, one_line(exc))
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
    # One decode after another: torchvision's decoders release the GIL, but decoding one small image is too little
    # work for a thread pool to pay for its hand-offs.
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
        raise DataError(f"image_folder: cannot read {path}: {one_line(exc)}") from exc
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
    """Decode JPEG, PNG, WebP or GIF bytes to RGB [3, H, W] (faster than PIL); None for other formats."""
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
        raise DataError(f"image_folder: cannot decode {path}: {one_line(exc)}") from exc
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # [3, H, W]
