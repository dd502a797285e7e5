"""The key log: one line per handshake for `qkdgw rndl` (secrets only when configured)."""

from __future__ import annotations

import os
from pathlib import Path

from gateway.tunnel.handshake import (
    KeyLogEntry,
)
from qkd.common.log import get_logger

log = get_logger("qkdgw.gateway")





class KeyLogWriter:
    """SSLKEYLOGFILE-style log of each session's ML-KEM secret and QKD key.

    Anyone holding this file and a recording of the tunnel can decrypt it: it exists for
    the recorded-traffic check and for debugging, is off by default, and is loud when on."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "a", buffering=1)
        self.path = path

    def __call__(self, entry: KeyLogEntry) -> None:
        self._file.write(f"MLKEM_SS {entry.session_id} {entry.epoch} "
                         f"{entry.mlkem_shared_secret.hex()}\n")
        self._file.write(f"QKD_KEY {entry.session_id} {entry.epoch} {entry.qkd_key.hex()}\n")

    def close(self) -> None:
        self._file.close()


# ------------------------------------------------------------------ application side
