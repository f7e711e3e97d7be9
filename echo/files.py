"""Atomic file writes: readers, other processes and crashes only ever see the old file or the
complete new one, never a half-written one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

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
