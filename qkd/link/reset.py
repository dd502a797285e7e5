"""The BB84 link's reset records: which link secrets a KME bootstrapped with, and the
reset marker that lets the next start bootstrap once. The operator's command that writes
them is `qkdgw link-reset` (`qkd/kme/link_reset.py`, which has the whole procedure).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

from qkd.common.files import write_atomic

_FP_LABEL = b"qkdgw link secret fingerprint v1"


def fingerprint(secret: bytes) -> str:
    """Names a link secret without revealing it."""
    return hmac.new(secret, _FP_LABEL, hashlib.sha256).hexdigest()[:32]


def ledger_path(state_file: Path) -> Path:
    return state_file.with_name(state_file.name + ".secrets")


def marker_path(state_file: Path) -> Path:
    return state_file.with_name(state_file.name + ".reset")


def used_secrets(state_file: Path) -> list[str]:
    try:
        data = json.loads(ledger_path(state_file).read_text(encoding="ascii"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        raise ValueError(f"{str(ledger_path(state_file))!r} is unreadable") from None
    return [str(x) for x in data] if isinstance(data, list) else []


def record_bootstrap(state_file: Path, secret: bytes) -> None:
    """Called before a bootstrap starts: the secret joins the ledger, the marker that
    allowed it (if any) is spent."""
    fps = used_secrets(state_file)
    fp = fingerprint(secret)
    if fp not in fps:
        write_atomic(ledger_path(state_file), json.dumps([*fps, fp]) + "\n")
    marker_path(state_file).unlink(missing_ok=True)


def reset_allowed(state_file: Path, secret: bytes) -> bool:
    try:
        return marker_path(state_file).read_text(encoding="ascii").strip() == \
            fingerprint(secret)
    except OSError:
        return False


def reset_link(state_file: Path, secret_file: Path, secret: bytes, *,
               new_secret: bool) -> bytes:
    """Reset this KME's side; returns the link secret the next bootstrap uses. Raises
    ValueError (field and fix in the message) when the secret was used before."""
    if new_secret:
        secret = os.urandom(32)
        write_atomic(secret_file, secret.hex() + "\n")
    if fingerprint(secret) in used_secrets(state_file):
        raise ValueError(
            "[link] secret_file: this KME has already bootstrapped with this link secret "
            "(fix: run with --new-secret on one KME and copy the new secret file to the "
            "other, then reset the other without --new-secret)")
    state_file.unlink(missing_ok=True)
    # A state write a crash interrupted leaves a temp file holding (sealed) old state.
    for stale in state_file.parent.glob(f".{state_file.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    write_atomic(marker_path(state_file), fingerprint(secret) + "\n")
    return secret
