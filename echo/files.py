"""Checkpoint files: atomic writes (readers, other processes and crashes only ever see the old
file or the complete new one, never a half-written one) and safe reads."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The process's umask, read once at import (os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_save(obj: Any, path: str | Path, *, durable: bool = True) -> None:
    """``torch.save(obj)`` to a temp file in ``path``'s folder, then ``os.replace`` onto ``path``.

    ``durable`` also fsyncs the file before the rename, so that a power loss cannot leave an empty
    file under the new name (checkpoints); a cache that can recompute an entry may skip it. The
    file gets the mode an ordinary ``open`` would give it (mkstemp creates 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# What a training checkpoint holds besides tensors and plain containers: the numpy RNG state
# (an ndarray of uint32). Allowed by name, so that loading never runs code from the file.
# Named both ways: NumPy 2 pickles numpy._core..., a checkpoint written under NumPy 1 numpy.core....
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
_CHECKPOINT_GLOBALS = [(_RECONSTRUCT, "numpy._core.multiarray._reconstruct"),
                       (_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
                       np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """A training checkpoint written by ``echo.train`` (a dict with ``model`` and ``config``), its
    tensors on ``device``. Loaded with ``weights_only=True``: a shared file cannot run code.
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for one that is not a
    checkpoint (another format, a truncated file, a pickle of other objects)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        with torch.serialization.safe_globals(_CHECKPOINT_GLOBALS):
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except OSError:
        raise
    except Exception as e:  # arbitrary bytes fail in many ways: truncated zip, bad opcodes, refused globals
        raise ValueError(f"{path} is not an Echo training checkpoint, or holds objects one never does "
                         f"(torch.load(weights_only=True): {type(e).__name__})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not an Echo training checkpoint")
    return ckpt
