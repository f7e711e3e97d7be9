"""Loading the compiled extensions without ever making ``import echo_kernels`` fail."""

from __future__ import annotations

import importlib
from types import ModuleType


def load_extension(name: str) -> tuple[ModuleType | None, str | None]:
    """Import ``echo_kernels.<name>``; returns ``(module, None)`` or ``(None, why not)``."""
    try:
        return importlib.import_module(f"echo_kernels.{name}"), None
    except Exception as exc:  # noqa: BLE001  (ImportError, or anything a broken build raises on load)
        return None, (
            f"the compiled extension echo_kernels.{name} is not built or does not load ({exc}); "
            "run `pip install --no-build-isolation -e .` (or `make test`)"
        )
