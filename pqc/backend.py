"""Backend selection for the PQC primitives: `openssl` (the `cryptography` package) or `liboqs`.

`openssl` is always present: `cryptography` bundles an OpenSSL that ships ML-KEM and
ML-DSA. `liboqs` is optional and is used only through liboqs-python (`import oqs`).

Importing `oqs` when its loader cannot find the liboqs shared library makes it download
and build liboqs from the network (and `sys.exit` when that fails). So this module
decides whether liboqs is usable by looking at the filesystem and package metadata
only, and `import_oqs()` is the single place that imports it, after that check passed.
"""

from __future__ import annotations

import ctypes.util
import functools
import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

BACKENDS = ("auto", "openssl", "liboqs")

# liboqs-python 0.14 added KeyEncapsulation.generate_keypair_seed (needed for
# from_seed) and its loader honours $OQS_INSTALL_PATH, which probe() relies on.
MIN_LIBOQS_PYTHON = (0, 14)

_INSTALL_HINT = (
    "install the liboqs shared library (build it with -DBUILD_SHARED_LIBS=ON and install "
    "it to /usr/local, or set OQS_INSTALL_PATH to its install prefix) and "
    "`pip install 'liboqs-python>=0.14'`, or use backend 'openssl'"
)


class PqcError(ValueError):
    """Bad input to a PQC primitive or an unusable backend; the message says what to fix.

    Messages never contain key material.
    """


@dataclass(frozen=True)
class LiboqsProbe:
    """What the filesystem says about liboqs, without importing `oqs`."""

    usable: bool
    library: str | None  # a path, or a bare soname resolved through the loader cache
    install_prefix: Path | None  # what to put in OQS_INSTALL_PATH so `oqs` finds it
    reason: str  # why it is not usable (empty when usable)


def _library_dirs() -> list[Path]:
    dirs = [Path("/usr/local/lib"), Path("/usr/local/lib64"), Path("/usr/lib"), Path("/usr/lib64")]
    # Debian/Ubuntu multiarch directories, e.g. /usr/lib/x86_64-linux-gnu.
    dirs.extend(sorted(p for p in Path("/usr/lib").glob("*-linux-*") if p.is_dir()))
    try:
        home = Path.home()
    except (RuntimeError, KeyError):  # no $HOME and no passwd entry (some containers)
        return dirs
    # liboqs-python's own default install location.
    dirs.extend([home / "_oqs" / "lib", home / "_oqs" / "lib64"])
    return dirs


def _shared_library_in(directory: Path) -> Path | None:
    try:
        for name in ("liboqs.so", "liboqs.dylib"):
            if (directory / name).exists():
                return directory / name
        versioned = sorted(directory.glob("liboqs.so.*"))
    except OSError:
        return None
    return versioned[0] if versioned else None


def _liboqs_python_version() -> tuple[int, ...] | None:
    try:
        text = importlib.metadata.version("liboqs-python")
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


@functools.cache
def probe_liboqs() -> LiboqsProbe:
    """Find the liboqs shared library and check that `oqs` would load it without
    trying to build it. Never imports `oqs`.

    Cached: `find_library` runs `ldconfig`. Tests call `probe_liboqs.cache_clear()`.
    """
    found: str | None = None
    prefix: Path | None = None
    env_prefix = os.environ.get("OQS_INSTALL_PATH")
    if env_prefix:
        for sub in ("lib", "lib64"):
            lib = _shared_library_in(Path(env_prefix) / sub)
            if lib is not None:
                found, prefix = str(lib), Path(env_prefix)
                break
    if found is None:
        # This is the first place liboqs-python itself looks, so a hit here is safe.
        soname = ctypes.util.find_library("oqs")
        if soname:
            found = soname
    if found is None:
        for directory in _library_dirs():
            lib = _shared_library_in(directory)
            if lib is None:
                continue
            if directory.name not in ("lib", "lib64"):
                # liboqs-python only searches <prefix>/lib{,64} and the loader cache;
                # a library elsewhere that the cache does not know would make it build
                # its own copy, so refuse rather than trigger that.
                return LiboqsProbe(False, str(lib), None,
                                   f"found {lib}, but the dynamic loader cache does not list "
                                   "it (run `ldconfig`, or set OQS_INSTALL_PATH)")
            found, prefix = str(lib), directory.parent
            break
    if found is None:
        return LiboqsProbe(False, None, None, "the liboqs shared library is not installed")
    if importlib.util.find_spec("oqs") is None:
        return LiboqsProbe(False, found, prefix,
                           f"liboqs is at {found}, but the liboqs-python package is not "
                           "installed")
    version = _liboqs_python_version()
    if version is not None and version < MIN_LIBOQS_PYTHON:
        have = ".".join(map(str, version))
        return LiboqsProbe(False, found, prefix,
                           f"liboqs-python {have} is too old (need >= 0.14)")
    return LiboqsProbe(True, found, prefix, "")


def liboqs_available() -> bool:
    return probe_liboqs().usable


def available_backends() -> tuple[str, ...]:
    """Concrete backends usable on this machine, `openssl` first."""
    return ("openssl", "liboqs") if liboqs_available() else ("openssl",)


def resolve_backend(backend: str) -> str:
    """Map a requested backend (`auto|openssl|liboqs`) to a concrete one.

    `auto` is `openssl`: it is always present, FIPS 203/204 conformant, and keeps the
    gateway's behaviour independent of what else happens to be installed.
    """
    if backend not in BACKENDS:
        raise PqcError(f"unknown PQC backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "liboqs":
        probe = probe_liboqs()
        if not probe.usable:
            raise PqcError(f"PQC backend 'liboqs' is not available: {probe.reason} "
                           f"(fix: {_INSTALL_HINT})")
        return "liboqs"
    return "openssl"


_oqs_module: ModuleType | None = None


def import_oqs() -> ModuleType:
    """Import liboqs-python after the probe says it will find its library."""
    global _oqs_module
    if _oqs_module is not None:
        return _oqs_module
    if "oqs" in sys.modules:
        _oqs_module = sys.modules["oqs"]
        return _oqs_module
    probe = probe_liboqs()
    if not probe.usable:
        raise PqcError(f"PQC backend 'liboqs' is not available: {probe.reason} "
                       f"(fix: {_INSTALL_HINT})")
    if probe.install_prefix is not None and "OQS_INSTALL_PATH" not in os.environ:
        os.environ["OQS_INSTALL_PATH"] = str(probe.install_prefix)
    try:
        module = importlib.import_module("oqs")
    except (Exception, SystemExit) as exc:
        # liboqs-python reports a failed load with SystemExit; never let it end the process.
        raise PqcError(f"PQC backend 'liboqs': importing liboqs-python failed ({exc}) "
                       f"(fix: {_INSTALL_HINT})") from None
    _oqs_module = module
    return module
