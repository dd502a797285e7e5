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
from pathlib import Path
from typing import Any

from qkd.common.errors import UserError
from qkd.kme.config import KmeConfig
from qkd.link.ideal import load_link_secret
from qkd.link.reset import fingerprint, reset_link


def _handle(args: argparse.Namespace) -> int:
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
