"""Checkpoints written atomically and read without running code from the file."""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch

from ib.errors import CheckpointError, IBError


class WriteError(IBError, OSError):
    """A run file could not be written (disk full, folder not writable); the previous version of it is intact."""


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status, since 4.7);
    elsewhere set and restored at once, briefly to 0o077, which only ever makes a concurrent file more private."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Any) -> None:
    """Call `write(file)` on a temporary file beside `path`, fsync it, then rename it over `path`.

    A crash or a full disk leaves the previous `path` as it was; the temporary file is removed on failure. The file
    gets the mode a plain `open()` would give it, 0666 less the umask.

    Raises:
        WriteError: the operating system refused (no space, no permission, ...); the message says so in one line.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            # mkstemp makes the file 0600 and the rename keeps that: give it the mode open() would (0666 less the
            # umask), so that others sharing the run folder can read checkpoints and metrics; before the fsync,
            # so that the mode is as durable as the data.
            mode = 0o666 & ~_umask()
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            else:  # Windows before Python 3.13
                os.chmod(tmp, mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, IBError):
            kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
            raise WriteError(f"cannot write {path}: {e.strerror or e}; {kept}") from e
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def save_checkpoint(path: str | Path, state: Dict[str, Any]) -> None:
    """Write `state` (tensors, numbers, strings, lists, dicts) to `path` atomically.

    The state is serialised in memory first, so that a full disk surfaces as the operating system's error
    (`WriteError`) rather than as an error from inside torch's zip writer.
    """
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, lambda f: f.write(buf.getbuffer()))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Dict[str, Any]:
    """Read a checkpoint with `torch.load(weights_only=True)`: tensors and plain data only, no code.

    Raises:
        CheckpointError: the file is missing, truncated, corrupted, or holds something other than plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... on damaged files
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupted?): {reason}") from None
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{path} is not an ib checkpoint")
    return state
