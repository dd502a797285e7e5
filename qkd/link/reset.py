"""`qkdgw link-reset`: the operator's explicit reset of a KME pair's BB84 link.

A KME bootstraps its link (computationally authenticated, from the link secret and
fresh nonces of both KMEs) only on a first start. When its link state file is missing
but its key store already holds key history, it refuses to start: that is a lost or
deleted state file, and bootstrapping silently over it would hide the loss (and, with
the old code, reuse one-time pads). The operator resets the pair instead, on both KMEs,
with a new link secret:

    stop both KMEs
    qkdgw link-reset --config kme-a.toml --new-secret     # writes a new link secret
    copy that secret file to site B ([link] secret_file there)
    qkdgw link-reset --config kme-b.toml
    start both KMEs: they bootstrap again under the new secret

The reset removes the link state file, keeps the key store (its delivery history still
guarantees once-only delivery) and writes a *reset marker* naming the new secret's
fingerprint, which lets the next start bootstrap once. Every secret a KME ever
bootstrapped with is recorded (fingerprints only) in `<state_file>.secrets`; a reset to
one of them is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

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


def _handle(args: argparse.Namespace) -> int:
    from qkd.common.errors import UserError
    from qkd.kme.config import KmeConfig
    from qkd.link.ideal import load_link_secret

    config = KmeConfig.load(args.config)
    link = config.link
    if link.type != "bb84" or link.state_file is None:
        raise UserError(f"{config.source}: [link] type: link-reset applies to the BB84 "
                        "link only (fix: point --config at a KME with [link] type = "
                        "\"bb84\")")
    try:
        secret = reset_link(link.state_file, link.secret_file, link.secret,
                            new_secret=args.new_secret)
    except ValueError as exc:
        raise UserError(f"{config.source}: {exc}") from None
    except OSError as exc:
        raise UserError(f"{config.source}: [link] state_file: cannot reset "
                        f"({exc.strerror}) (fix: check the files' permissions)") from None
    if not args.new_secret:
        load_link_secret(link.secret_file)  # unchanged; read again only to fail early
    print(f"link reset: {link.state_file} removed; the next start bootstraps once with "
          f"the link secret {fingerprint(secret)} (fingerprint)"
          + (f", newly written to {link.secret_file}: copy it to the peer KME and run "
             "`qkdgw link-reset` there" if args.new_secret else ""))
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "link-reset", help="reset a KME's BB84 link so the pair bootstraps again",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, metavar="FILE",
                   help="the (stopped) KME's config")
    p.add_argument("--new-secret", action="store_true",
                   help="write a new random link secret to [link] secret_file first")
    p.set_defaults(handler=_handle)
