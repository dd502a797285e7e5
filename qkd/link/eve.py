"""`qkdgw eve`: an eavesdropper on the emulated quantum channel between two KMEs.

It accepts Alice's quantum-channel connection, dials Bob's, and rewrites every pulse
frame in flight with `qkd.link.quantum.attack` (intercept-resend, photon-number
splitting or depolarising noise on a fraction of the pulses). The KMEs only see its
effect in their own statistics (QBER, decoy estimates). The classical channel is not
touched: it is authenticated, and tampering with it is a different test.

The emulated quantum channel is sealed (AES-256-GCM under keys from the link secret,
see `qkd.link.quantum`), so a network observer learns nothing from it. Eve plays the
physical eavesdropper a real fibre would allow only because she is handed the link
secret (`--link-secret`): she opens each frame, attacks it and seals it again.

With `--start-after S` she forwards the frames untouched for S seconds and attacks
from then on; SIGUSR1 starts the attack at once (`qkdgw demo --eve` uses it to strike
only once the tunnel has run on link key for a while).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

from qkd.common.confload import HostPort, parse_host_port
from qkd.common.errors import UserError
from qkd.common.files import write_port_file
from qkd.common.log import configure_logging, get_logger
from qkd.common.tcp_relay import A2B, Hook, TcpRelay, length_prefixed
from qkd.common.tcp_relay import frame as length_frame
from qkd.link.quantum import (
    ATTACKS,
    MAX_PULSES,
    SEAL_OVERHEAD,
    FrameError,
    PulseFrame,
    attack,
    seal,
    sealed_header,
    unseal,
)

log = get_logger("qkd.eve")
FRAME_LIMIT = 64 + SEAL_OVERHEAD + 5 * MAX_PULSES


class Trigger:
    """When the attack starts: after a delay, or at once on `arm()`."""

    def __init__(self, start_after: float) -> None:
        self.at = time.monotonic() + start_after

    def arm(self) -> None:
        if self.at > time.monotonic():
            self.at = time.monotonic()
            log.warning("eve_armed", attack="now")

    @property
    def armed(self) -> bool:
        return time.monotonic() >= self.at


def _tap(forward: HostPort, mode: str, fraction: float, rng: np.random.Generator,
         trigger: Trigger, link_secret: bytes) -> Hook:
    """Alice -> Bob hook: open each pulse frame, attack it, seal it again."""

    async def hook(data: bytes) -> list[bytes]:
        body = data[4:]
        try:
            rnd, nonce, counter = sealed_header(body)
            frame = PulseFrame.decode(unseal(link_secret, body))
        except FrameError:
            return [data]  # not ours to understand: pass it on
        if not trigger.armed:
            log.info("eve_passive_frame", round=frame.round, pulses=frame.pulses)
            return [data]
        tapped = await asyncio.to_thread(attack, frame, mode, fraction, rng)
        log.info("eve_frame", round=frame.round, pulses=frame.pulses,
                 sent=int(frame.slots.size), forwarded=int(tapped.slots.size),
                 attack=mode, fraction=fraction)
        # A new counter: never two plaintexts under one GCM nonce.
        return [length_frame(seal(link_secret, nonce, rnd, tapped.encode(), counter + 1))]

    return hook


async def run_eve(listen: HostPort, forward: HostPort, mode: str, fraction: float,
                  link_secret: bytes, port_file: Path | None = None,
                  seed: int | None = None, start_after: float = 0.0) -> None:
    rng = np.random.default_rng(seed)
    trigger = Trigger(start_after)
    tap = _tap(forward, mode, fraction, rng, trigger, link_secret)
    relay = TcpRelay((forward.host, forward.port), listen_host=listen.host,
                     listen_port=listen.port, read=length_prefixed(FRAME_LIMIT),
                     hooks=lambda conn: {A2B: tap},
                     on_upstream_error=lambda exc: log.warning(
                         "eve_forward_failed", forward=str(forward), error=str(exc)))
    port = await relay.start()
    log.info("eve_started", listen=f"{listen.host}:{port}", forward=str(forward),
             attack=mode, fraction=fraction, start_after_s=start_after)
    if port_file is not None:
        write_port_file(port_file, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, trigger.arm)
    try:
        await stop.wait()
    finally:
        await relay.close()
    if port_file is not None:
        with contextlib.suppress(OSError):
            port_file.unlink()


def _handle(args: argparse.Namespace) -> int:

    try:
        listen = parse_host_port(args.listen)
        forward = parse_host_port(args.forward)
    except ValueError as exc:
        raise UserError(f"--listen/--forward: {exc} (fix: write HOST:PORT)") from None
    if not 0.0 <= args.fraction <= 1.0:
        raise UserError("--fraction must be between 0 and 1")
    if not args.start_after >= 0.0:
        raise UserError("--start-after must be a number of seconds >= 0 (inf: only on "
                        "SIGUSR1)")
    from qkd.link.ideal import load_link_secret

    try:
        link_secret = load_link_secret(args.link_secret)
    except (OSError, ValueError) as exc:
        raise UserError(f"--link-secret {args.link_secret}: {exc} (fix: pass the "
                        "link-secret.key both KMEs' [link] secret_file name)") from None
    configure_logging(args.log_level, args.log_format, process="eve")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_eve(listen, forward, args.attack, args.fraction, link_secret,
                            args.port_file, args.seed, args.start_after))
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eve", help="eavesdrop on the KMEs' emulated quantum channel",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="where Alice's KME connects ([link] quantum in her config)")
    p.add_argument("--forward", required=True, metavar="HOST:PORT",
                   help="Bob's KME quantum_listen address")
    p.add_argument("--attack", required=True, choices=ATTACKS)
    p.add_argument("--link-secret", required=True, type=Path, metavar="FILE",
                   help="the KMEs' link secret ([link] secret_file): the quantum channel "
                        "is sealed under it, so eve needs it to play the eavesdropper")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="fraction of the pulses attacked (default 1)")
    p.add_argument("--start-after", type=float, default=0.0, metavar="S",
                   help="forward the pulses untouched for S seconds first (inf: until "
                        "SIGUSR1); default 0")
    p.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--port-file", type=Path, default=None, metavar="PATH",
                   help="write the bound port to PATH once listening")
    p.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-format", default="console", choices=("console", "json"))
    p.set_defaults(handler=_handle)
