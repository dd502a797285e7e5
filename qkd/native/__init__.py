"""Where qkd finds its compiled kernels (C sources beside this file, built by `pip install`).

Every kernel has a pure-numpy reference next to its caller, and tests compare the two bit
for bit. `load(name)` returns the module `_qkdgw_<name>`, or None when it was not built or
when QKDGW_NATIVE=0 asks for the references; a missing build is logged once, loudly,
because the references are many times slower.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

import structlog

_log = structlog.get_logger("qkd.native")
_loaded: dict[str, ModuleType | None] = {}


def enabled() -> bool:
    """False when QKDGW_NATIVE=0: every caller then uses its numpy reference."""
    return os.environ.get("QKDGW_NATIVE", "1") != "0"


def load(name: str) -> ModuleType | None:
    """The compiled kernel module `_qkdgw_<name>`, or None (use the reference)."""
    if not enabled():
        return None
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(f"_qkdgw_{name}")
        except ImportError as exc:
            _loaded[name] = None
            _log.warning("native_kernel_missing", kernel=name, error=str(exc),
                         effect="the numpy reference runs instead, many times slower",
                         fix="reinstall with a C compiler present (pip install .)")
    return _loaded[name]


def kernel_names() -> list[str]:
    """Every kernel this installation has sources for (the .c files beside this module)."""
    return sorted(p.stem for p in Path(__file__).parent.glob("*.c"))


def missing_kernels() -> list[str]:
    """Kernels with sources but no loadable build (always empty under QKDGW_NATIVE=0)."""
    return [n for n in kernel_names() if enabled() and load(n) is None]
