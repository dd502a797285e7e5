"""`qkdgw`: one command for every process of a site.

Each subcommand lives with its package and registers itself here through a
`register_cli(subparsers)` function; a subcommand's handler returns the exit code.
Errors a user can fix (bad config, unreadable files, a peer that is down) are printed
as one line without a traceback and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from gateway.confload import ConfigError

# Modules that add subcommands; each has register_cli(subparsers).
_COMMAND_MODULES = (
    "gateway.pki",
    "qkd.kme",
    "gateway.runtime",
    "gateway.demo",
    "gateway.rndl",
    "qkd.sim.cli",
)


class UserError(Exception):
    """An error the user can act on; printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkdgw",
        description="Hybrid ML-KEM + QKD site-to-site gateway.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # Only tolerate the command module itself being absent (a trimmed install);
            # a missing dependency inside it is a real error.
            if exc.name is None or not (name == exc.name or name.startswith(exc.name + ".")):
                raise
            continue
        module.register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.handler(args)
    except (ConfigError, UserError) as exc:
        print(f"qkdgw {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
