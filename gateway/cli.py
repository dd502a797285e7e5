"""`qkdgw`: one command for every process of a site.

Each subcommand lives with its package and registers itself here through a
`register_cli(subparsers)` function; a subcommand's handler returns the exit code.
Errors a user can fix (bad config, unreadable files, a peer that is down) are printed
as one line without a traceback and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from qkd.common.errors import ConfigError, UserError

# Subcommand -> module with register_cli(subparsers). Only the module of the command
# being run is imported, so `qkdgw gateway` does not pay for the simulator's imports.
_COMMANDS = {
    "pki": "gateway.pki",
    "kme": "qkd.kme.service",
    "network": "qkd.kme.network_cli",
    "gateway": "gateway.runtime",
    "status": "gateway.runtime",
    "demo": "gateway.tools.demo",
    "rndl": "gateway.tools.rndl",
    "qkd": "qkd.sim.cli",
    "eve": "qkd.link.eve",
    "link-reset": "qkd.kme.link_reset",
    "psk": "gateway.runtime.psk_store",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or one that knows only `command` (cheaper to import)."""
    parser = argparse.ArgumentParser(
        prog="qkdgw",
        description="Hybrid ML-KEM + QKD site-to-site gateway.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    modules = [_COMMANDS[command]] if command in _COMMANDS else list(dict.fromkeys(
        _COMMANDS.values()))
    for name in modules:
        importlib.import_module(name).register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    try:
        code = args.handler(args)
    except (ConfigError, UserError) as exc:
        print(f"qkdgw {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into something like `head` that stopped reading: not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(code or 0)


if __name__ == "__main__":
    # Run the importable module's main, so UserError raised by subcommands (which import
    # gateway.cli) is the class main() catches, not a second copy from __main__.
    from gateway.cli import main as _main

    sys.exit(_main())
