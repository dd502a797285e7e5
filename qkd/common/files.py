"""One atomic file writer: a reader sees the old content or the new one, never a mix,
and the file has its final mode from the moment it exists (a key file is never
readable by others, not even between open and chmod)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` survive a power cut (best effort: not
    every filesystem lets a directory be fsynced)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_new(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create `path` (it must not exist) with `data`, `mode` and fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits the caller asked for
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    """Replace `path` with `data` atomically and durably, with `mode`."""
    raw = data.encode() if isinstance(data, str) else data
    # A random name in the same directory: same filesystem for the rename, and two
    # writers (or a stale temp file from a crash) never collide.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write_new(tmp, raw, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_port_file(path: Path, port: int) -> None:
    """Write the bound port atomically, so a launcher polling the file never reads half."""
    write_atomic(path, f"{port}\n", 0o644)


def write_link_ports(port_file: Path, ports: dict[str, int], suffix: str = ".link") -> None:
    """Bound ports as JSON next to the port file: Bob's link ports (`<port-file>.link`),
    the admin port (`<port-file>.admin`)."""
    path = port_file.with_name(port_file.name + suffix)
    write_atomic(path, json.dumps(ports) + "\n", 0o644)
