"""asyncio adapter of the BB84 link (`qkd.link.core`) inside a KME process.

Two TCP connections between the KMEs, both u32-length-prefixed frames:

- the classical channel (Bob listens on `[link] listen`, Alice dials `[link] peer`);
- the emulated quantum channel (Bob listens on `[link] quantum_listen`, Alice dials
  `[link] quantum`, possibly through `qkdgw eve`), carrying Alice's pulse frames.

Every call into the core is short and runs on a worker thread under one lock; the
heavy steps of a round (emission, measurement, post-processing) are the core's work
items, run by `_work_loop` on a worker thread *without* the lock. The reader hands
every frame to the core at once, so a key reservation (RESERVE / RESERVE_ACK) is
answered within a short core call even while a round crunches numbers, and Alice does
not start a round while one of her reservations is waiting.

The link state (pads, offsets, hash key, last committed round, a pending commit or
deposit with its key material) is sealed under the storage key and written
atomically *before* any frame it signed leaves the process, so a restart never reuses
a one-time pad and a crash between COMMIT and COMMIT_ACK resolves on reconnect. If
that write fails, the frames it would have covered are dropped (never sent), the
connection is closed and the write is retried; the core's events wait for it.

Bob treats a new classical connection as a stranger until Alice's HELLO on it
verifies: until then he signs nothing and the live connection stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import signal
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from qkd.common.backoff import Backoff, next_delay
from qkd.common.confload import HostPort
from qkd.common.errors import QkdError
from qkd.common.files import write_atomic
from qkd.common.log import get_logger
from qkd.common.storage_key import Sealer, SealError
from qkd.link import core as lc
from qkd.link import quantum
from qkd.link import reset as link_reset
from qkd.link.constants import (
    ABORT_BACKOFF_MAX_S,
    BUSY_BACKOFF_MAX_S,
    DEPOSIT_RETRY_S,
    HELLO_FRAME_LIMIT,
    HELLO_TIMEOUT_S,
    LENGTH_PREFIX_FORMAT,
    LOOP_RETRY_MAX_S,
    LOOP_RETRY_S,
    MAX_UNVERIFIED_CONNECTIONS,
    RESERVE_TIMEOUT_S,
    STATE_ID,
)
from qkd.link.pool import KeyPool, PoolError, ReservedKey
from qkd.link.wegman_carter import AuthKeys
from qkd.sim.params import LinkParams

log = get_logger("qkd.link")
T = TypeVar("T")
_LEN = struct.Struct(LENGTH_PREFIX_FORMAT)
_STATE_ID = STATE_ID
# Test hook: "point:round" makes the KME SIGKILL itself at that point of that round
# (points: alice-commit-sent, alice-before-ack, bob-before-ack). Never set in service.
CRASH_ENV = "QKDGW_TEST_LINK_CRASH"
# What the emulated link protects, said wherever it starts or reports status.
QUANTUM_SECURITY = "none (emulated link: keys as secret as the link secret and AES)"
QUANTUM_SECURITY_NOTE = (
    "EMULATED BB84 LINK: the quantum channel is a TCP connection sealed with AES-256-GCM "
    "under keys from the link secret. Its keys are only as secret as the link secret and "
    "AES (no quantum security), like the ideal link's; anyone with the link secret file "
    "can read the pulses. A real QKD device replaces this channel by the fibre.")


def _crash_point() -> tuple[str, int] | None:
    spec = os.environ.get(CRASH_ENV, "")
    if not spec:
        return None
    point, _, rnd = spec.partition(":")
    return point, int(rnd or "1")


@dataclass
class ReservationStats:
    requested: int = 0  # sent to the peer
    confirmed: int = 0
    failed: int = 0  # refused or timed out
    applied: int = 0  # the peer's, recorded here
    refused: int = 0  # the peer's, refused here
    keys_confirmed: int = 0  # keys named in our confirmed RESERVEs
    keys_applied: int = 0  # keys named in the peer's RESERVEs recorded here
    latencies: list[float] = field(default_factory=list)  # seconds, newest last


class LinkUnavailable(QkdError):
    """The peer KME cannot confirm a reservation now; `reason` is safe to show."""


class LinkStateNotSaved(LinkUnavailable):
    """The sealed link state could not be written: nothing it covers was sent."""


@dataclass
class LinkHealth:
    state_save_failures: int = 0
    frames_dropped_unsaved: int = 0  # signed, never sent: their pads were not on disk
    connections_refused: int = 0  # Bob: no valid HELLO from a new connection
    loop_errors: int = 0  # unexpected errors a task loop survived
    reservations_released: int = 0  # recorded for the peer, then its answer lapsed
    quantum_frames_rejected: int = 0  # Bob: not a sealed pulse frame


@dataclass(frozen=True)
class Bb84Settings:
    role: str
    params: LinkParams = field(default_factory=LinkParams)
    bootstrap_key: bytes = b""
    peer: HostPort | None = None  # Alice: Bob's classical address
    quantum: HostPort | None = None  # Alice: Bob's quantum address (or eve's)
    listen: HostPort | None = None  # Bob
    quantum_listen: HostPort | None = None  # Bob
    round_pause_s: float = 0.2
    round_timeout_s: float = 60.0  # a silent round (or unanswered COMMIT) ends after this

    def __repr__(self) -> str:
        return f"Bb84Settings(role={self.role!r}, <bootstrap key redacted>)"


async def read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    (n,) = _LEN.unpack(await reader.readexactly(4))
    if n > limit:
        raise ValueError(f"frame of {n} bytes above the limit {limit}")
    return await reader.readexactly(n)


def write_frame(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(_LEN.pack(len(data)))
    writer.write(data)


class Bb84Link:
    def __init__(self, settings: Bb84Settings, store: KeyPool, sealer: Sealer,
                 state_path: Path, *, key_size_bits: int, lifetime_s: float,
                 max_key_count: int, local_saes: Sequence[str], peer_saes: Sequence[str],
                 key_history: int = 0) -> None:
        """`key_history`: blocks the key store has ever held (any state); with a
        missing state file and history, the KME refuses to bootstrap (see
        qkd.link.reset)."""
        self.s = settings
        self.store = store
        self._sealer = sealer
        self._state_path = state_path
        self._lifetime = lifetime_s
        self._max = max_key_count
        self._local = frozenset(local_saes)
        self._peers = frozenset(peer_saes)
        auth, saved = self._load_state(settings, key_history)
        self.core = lc.LinkCore(settings.role, auth, settings.params, key_size_bits,
                                np.random.default_rng(), link_secret=settings.bootstrap_key,
                                committed=int(saved["committed"]),
                                saved=saved, round_timeout_s=settings.round_timeout_s)
        self._lock = asyncio.Lock()
        self._writer: asyncio.StreamWriter | None = None
        self._qwriter: asyncio.StreamWriter | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._requests = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[lc.ReservationAnswered]] = {}
        self._work_ready = asyncio.Event()
        self._started = time.monotonic()
        self._first_round: float | None = None
        self._crash = _crash_point()
        self.reservations = ReservationStats()
        self.blocks_trimmed = 0  # dropped by the store at the pool limit
        self._abort_streak = 0  # rounds aborted in a row (Alice backs off)
        self.health = LinkHealth()
        self.ports: dict[str, int] = {}
        self._held_events: list[lc.Event] = []  # produced while the state was unsaved
        self._unverified: list[asyncio.StreamWriter] = []  # Bob: no valid HELLO yet
        self._peer_ready_count = 0

    # ----------------------------------------------------------- state at rest

    def _load_state(self, s: Bb84Settings, key_history: int
                    ) -> tuple[AuthKeys, dict[str, Any]]:
        try:
            sealed = self._state_path.read_bytes()
        except FileNotFoundError:
            path = str(self._state_path)
            if key_history and not link_reset.reset_allowed(self._state_path,
                                                            s.bootstrap_key):
                raise lc.LinkProtocolError(
                    f"link state file {path!r} is missing but the key store holds "
                    f"{key_history} blocks from an earlier bootstrap; this KME will not "
                    "bootstrap again silently (fix: restore the state file, or reset the "
                    "pair: stop both KMEs, `qkdgw link-reset --config FILE --new-secret` "
                    "on one, copy the new link secret, `qkdgw link-reset --config FILE` "
                    "on the other)") from None
            try:
                link_reset.record_bootstrap(self._state_path, s.bootstrap_key)
            except (OSError, ValueError) as exc:
                raise lc.LinkProtocolError(f"cannot record the bootstrap next to {path!r} "
                                           f"({exc})") from None
            return lc.unbootstrapped_auth(s.role), {"committed": 0}
        try:
            state = json.loads(self._sealer.open(_STATE_ID, sealed))
        except (SealError, ValueError):
            raise lc.LinkProtocolError(
                f"link state file {str(self._state_path)!r} cannot be opened with this "
                "storage key; restore it or re-bootstrap both KMEs") from None
        if state["auth"]["role"] != s.role:
            raise lc.LinkProtocolError(f"link state file {str(self._state_path)!r} is for "
                                       f"role {state['auth']['role']!r}")
        return AuthKeys.import_state(state["auth"]), state

    def _save_state(self, state: dict[str, Any]) -> None:
        data = self._sealer.seal(_STATE_ID, json.dumps(state).encode())
        write_atomic(self._state_path, data)

    # ---------------------------------------------------------- core plumbing

    async def _call(self, fn: Callable[..., T], *args: Any,
                    install: asyncio.StreamWriter | None = None) -> T:
        """Run a short core call under the lock, then persist and send what it made.
        `install`: make this the classical connection if `fn` returned true (before
        the frames it queued are sent)."""
        t_wait = time.monotonic()
        async with self._lock:
            t_in = time.monotonic()
            try:
                result = await asyncio.to_thread(fn, *args)
                if install is not None and result:
                    self._install_writer(install)
            finally:
                t_fn = time.monotonic()
                events = await self._flush_locked()
            t_out = time.monotonic()
        if t_out - t_wait > 0.2:
            # Shows what a reservation may have waited behind (see benchmarks/).
            log.debug("link_slow_call", fn=getattr(fn, "__name__", "?"),
                        wait=round(t_in - t_wait, 3), run=round(t_fn - t_in, 3),
                        flush=round(t_out - t_fn, 3))
        q = self._qwriter
        if q is not None and q.transport.get_write_buffer_size():
            # A pulse frame is tens of MB: wait for it to drain without the lock.
            with contextlib.suppress(ConnectionError):
                await q.drain()
        for ev in events:
            await self._on_event(ev)
        if self.core.has_work:
            self._work_ready.set()
        return result

    def _install_writer(self, writer: asyncio.StreamWriter) -> None:
        old = self._writer
        self._writer = writer
        if old is not None and old is not writer:
            old.close()

    def _drop_connection(self) -> None:
        w = self._writer
        if w is not None:
            self._writer = None
            w.close()

    async def _flush_locked(self) -> list[lc.Event]:
        core = self.core
        events = self._held_events
        self._held_events = []
        while (ev := core.next_event()) is not None:
            events.append(ev)
        if core.auth_dirty:
            state = {"auth": core.auth.export_state()} | core.export_state()
            # Written before the frames it signed leave (see module note). The flag is
            # cleared only once it is on disk: a failed write is retried.
            try:
                await asyncio.to_thread(self._save_state, state)
            except Exception as exc:  # OSError, SealError: never holds key bytes
                # A signed frame whose pad position is not on disk must never leave: a
                # restart from the older file would sign another message with its pad.
                dropped = len(core.frames_to_send()) + len(core.quantum_to_send())
                self._held_events = events
                self.health.state_save_failures += 1
                self.health.frames_dropped_unsaved += dropped
                log.error("link_state_save_failed", error=type(exc).__name__,
                          errno=getattr(exc, "errno", None), frames_dropped=dropped,
                          state_file=str(self._state_path))
                self._drop_connection()
                raise LinkStateNotSaved("the link state file cannot be written "
                                        f"({type(exc).__name__}); check "
                                        "[link] state_file and its disk") from None
            core.auth_dirty = False
        frames = core.frames_to_send()
        pulses = core.quantum_to_send()
        if self._crash == ("bob-before-ack", core.committed) and any(
                f[0] == lc.COMMIT_ACK for f in frames):
            self._die("bob-before-ack")
        await self._send(frames, pulses)
        if self._crash == ("alice-commit-sent", core.pending_commit_round) and any(
                f[0] == lc.COMMIT for f in frames):
            self._die("alice-commit-sent")
        return events

    def _die(self, point: str) -> None:
        log.warning("link_test_crash", point=point)
        os.kill(os.getpid(), signal.SIGKILL)

    async def _send(self, frames: list[bytes], pulses: list[bytes]) -> None:
        w = self._writer
        if w is not None and frames:
            for f in frames:
                write_frame(w, f)
            with contextlib.suppress(ConnectionError):
                await w.drain()
        q = self._qwriter
        if pulses and q is not None:
            for p in pulses:
                write_frame(q, p)

    async def _loop_error(self, where: str, exc: Exception, delay: float) -> float:
        """A task loop must not die: log the error (its type only), count, wait."""
        self.health.loop_errors += 1
        log.error("link_loop_error", loop=where, error=type(exc).__name__,
                  retry_in_s=round(delay, 2))
        await asyncio.sleep(delay)
        return next_delay(delay, LOOP_RETRY_MAX_S)

    async def _work_loop(self) -> None:
        """Run the core's heavy steps off the lock, one at a time, in order."""
        delay = LOOP_RETRY_S
        while True:
            await self._work_ready.wait()
            self._work_ready.clear()
            try:
                while True:
                    async with self._lock:
                        work = self.core.take_work()
                    if work is None:
                        break
                    await asyncio.to_thread(work.run)
                    await self._call(self.core.work_done, work, time.monotonic())
                delay = LOOP_RETRY_S
            except Exception as exc:
                delay = await self._loop_error("work", exc, delay)
                self._work_ready.set()  # look again: more work may be queued

    async def _on_event(self, ev: lc.Event) -> None:
        if isinstance(ev, lc.RoundStarted):
            if self._first_round is None:
                self._first_round = time.monotonic()
            log.debug("link_round_started", round=ev.round)
        elif isinstance(ev, lc.RoundAborted):
            log.warning("link_round_aborted", round=ev.round, reason=ev.reason,
                        auth_failure=ev.auth_failure, qber=ev.qber,
                        rounds_aborted=self.core.stats.rounds_aborted,
                        auth_failures=self.core.stats.auth_failures)
        elif isinstance(ev, lc.DepositRequested):
            await self._deposit_until_stored(ev)
        elif isinstance(ev, lc.RoundCommitted):
            log.info("link_round_committed", round=ev.round, key_bits=ev.key_bits,
                     blocks=len(ev.blocks), discarded=ev.discarded, qber=round(ev.qber, 5),
                     pulses=ev.pulses, auth_mode=self.core.auth.mode)
        elif isinstance(ev, lc.ReservationRequested):
            ok, reason = await self._apply_reservation(ev)
            sent = await self._call(self.core.answer_reservation, ev.request, ok, reason)
            if not sent and ok:
                # The peer never hears of it and answers 503: free the blocks again.
                await self.store.release([ReservedKey(kid, tuple(bids), size)
                                          for kid, bids, size in ev.keys])
                self.health.reservations_released += 1
                log.warning("link_reservation_answer_lapsed", request=ev.request,
                            pads_out=self.core.auth.levels()[0])
        elif isinstance(ev, lc.ReservationAnswered):
            fut = self._waiting.pop(ev.request, None)
            if fut is not None and not fut.done():
                fut.set_result(ev)
        elif isinstance(ev, lc.PeerReady):
            self._peer_ready_count += 1
            log.info("link_peer_ready", role=self.s.role, auth_mode=self.core.auth.mode,
                     committed=self.core.committed, peer_committed=ev.committed)

    async def _deposit_until_stored(self, ev: lc.DepositRequested) -> None:
        if self._crash == ("alice-before-deposit", ev.round):
            self._die("alice-before-deposit")
        # The round is committed on both sides: its blocks must reach the store, so a
        # failing store is retried (no new round starts meanwhile), never rolled back.
        while True:
            try:
                # Alice's limit is the pool level her rounds are sized by (free and
                # reserved blocks), so this trim never drops more than her COMMIT
                # named. Bob's level also counts keys Alice's SAEs took whose slaves
                # have not fetched them here yet, so it can sit above hers: trimming
                # by it would drop blocks Alice keeps. He caps free blocks only.
                trimmed = await self.store.deposit(ev.blocks, time.time(), self._lifetime,
                                                   limit=self._max,
                                                   count_reserved=self.s.role == "alice")
            except Exception as exc:  # the store's own errors; never holds key bytes
                log.error("link_deposit_failed", round=ev.round, error=type(exc).__name__,
                          retry_in_s=DEPOSIT_RETRY_S)
                await asyncio.sleep(DEPOSIT_RETRY_S)
                continue
            break
        if trimmed:
            self.blocks_trimmed += trimmed
            log.warning("link_blocks_discarded_pool_full", round=ev.round, blocks=trimmed,
                        max_key_count=self._max)
        await self._call(self.core.deposit_done, ev.round, True)

    async def _apply_reservation(self, ev: lc.ReservationRequested) -> tuple[bool, str]:
        # The peer's master SAE asks for keys for one of our SAEs: check both ends.
        if ev.master not in self._peers or ev.slave not in self._local:
            self.reservations.refused += 1
            return False, "master or slave SAE not registered on this link"
        keys = [ReservedKey(kid, tuple(bids), size) for kid, bids, size in ev.keys]
        try:
            await self.store.apply_reservation(ev.master, ev.slave, keys, time.time())
        except PoolError as exc:
            self.reservations.refused += 1
            return False, exc.reason
        self.reservations.applied += 1
        self.reservations.keys_applied += len(keys)
        log.info("keys_reserved_by_peer", master=ev.master, slave=ev.slave,
                 key_ids=[k.key_id for k in keys])
        return True, ""

    async def reserve_at_peer(self, master: str, slave: str,
                              keys: Sequence[ReservedKey]) -> None:
        """Tell the peer KME which blocks `keys` uses and wait for its ack."""
        if self._writer is None or not self.core.peer_ready:
            self.reservations.failed += 1
            raise LinkUnavailable("the peer KME is not connected")
        req = next(self._requests)
        fut: asyncio.Future[lc.ReservationAnswered] = asyncio.get_running_loop().create_future()
        # Registered first: the drive loop starts no round while this is waiting.
        self._waiting[req] = fut
        t0 = time.monotonic()
        self.reservations.requested += 1
        try:
            await self._call(self.core.request_reservation, req, master, slave,
                             [(k.key_id, list(k.block_ids), k.size_bits) for k in keys])
            ans = await asyncio.wait_for(fut, RESERVE_TIMEOUT_S)
        except TimeoutError:
            self.reservations.failed += 1
            await self._forget_request(req)
            raise LinkUnavailable("peer KME did not confirm the reservation in "
                                  f"{RESERVE_TIMEOUT_S:g} s") from None
        except lc.AuthError as exc:
            self.reservations.failed += 1
            raise LinkUnavailable(f"cannot reserve at the peer KME now: {exc}") from None
        except LinkUnavailable:
            self.reservations.failed += 1
            await self._forget_request(req)
            raise
        finally:
            self._waiting.pop(req, None)
        lat = self.reservations.latencies
        lat.append(time.monotonic() - t0)
        del lat[:-1000]
        if not ans.ok:
            self.reservations.failed += 1
            raise LinkUnavailable(f"peer KME refused the reservation: {ans.reason}")
        self.reservations.confirmed += 1
        self.reservations.keys_confirmed += len(keys)

    async def _forget_request(self, req: int) -> None:
        # Its answer no longer counts against the pads the peer may still spend.
        with contextlib.suppress(LinkUnavailable):
            await self._call(self.core.reservation_expired, req)

    # ------------------------------------------------------------- connections

    async def start(self) -> None:
        if self.s.role == "bob":
            assert self.s.listen is not None and self.s.quantum_listen is not None
            srv = await asyncio.start_server(self._on_classical, self.s.listen.host,
                                             self.s.listen.port)
            qsrv = await asyncio.start_server(self._on_quantum, self.s.quantum_listen.host,
                                              self.s.quantum_listen.port)
            self._servers += [srv, qsrv]
            self.ports = {"classical": srv.sockets[0].getsockname()[1],
                          "quantum": qsrv.sockets[0].getsockname()[1]}
        else:
            self._tasks.append(asyncio.create_task(self._dial_loop()))
            self._tasks.append(asyncio.create_task(self._drive_loop()))
        self._tasks.append(asyncio.create_task(self._timeout_loop()))
        self._tasks.append(asyncio.create_task(self._work_loop()))
        log.warning("link_quantum_security", quantum_security=QUANTUM_SECURITY,
                    message=QUANTUM_SECURITY_NOTE)
        log.info("link_started", role=self.s.role, auth_mode=self.core.auth.mode,
                 distance_km=self.s.params.distance_km, pulses=self.s.params.pulses,
                 committed=self.core.committed,
                 pending_commit=self.core.pending_commit_round, **self.ports)
        # A round committed before a crash whose blocks may not be stored yet.
        self._tasks.append(asyncio.create_task(self._resume()))

    async def _resume(self) -> None:
        delay = LOOP_RETRY_S
        while True:
            try:
                await self._call(self.core.resume)
                return
            except Exception as exc:
                delay = await self._loop_error("resume", exc, delay)

    async def close(self) -> None:
        for srv in self._servers:
            srv.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for w in (self._writer, self._qwriter):
            if w is not None:
                w.close()

    async def _serve_classical(self, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        """Read frames into the core while `writer` is the current connection (Alice:
        it becomes so now; Bob: it became so when its HELLO verified)."""
        try:
            if self.s.role == "alice":
                self._install_writer(writer)
                await self._call(self.core.connection_made)
            while True:
                data = await read_frame(reader, 1 << 28)
                if self._writer is not writer:
                    break  # replaced by a newer, verified connection
                if self._crash == ("alice-before-ack", self.core.pending_commit_round) \
                        and data[:1] == bytes([lc.COMMIT_ACK]):
                    self._die("alice-before-ack")
                await self._call(self.core.receive_frame, data, time.monotonic())
        except (asyncio.IncompleteReadError, ConnectionError):
            log.warning("link_classical_closed")
        except (lc.LinkProtocolError, ValueError) as exc:
            log.error("link_protocol_error", error=str(exc))
        except LinkStateNotSaved:
            pass  # logged where it happened; the connection is closed
        except Exception as exc:  # a bug: drop this connection, keep the KME
            self.health.loop_errors += 1
            log.error("link_classical_error", error=type(exc).__name__)
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()

    async def _on_classical(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        """Bob: a new connection. It replaces the live one, and Bob signs anything for
        it, only once its first frame is a HELLO that verifies."""
        if len(self._unverified) >= MAX_UNVERIFIED_CONNECTIONS:
            # Evict the oldest stranger rather than refuse the newest: idle connections
            # cannot lock Alice out, they only make her race them.
            self._unverified.pop(0).close()
        self._unverified.append(writer)
        accepted = False
        reason = "no valid HELLO"
        try:
            if self.core.auth_dirty or self._held_events:
                # A failed state write first: Bob's HELLO could not be covered.
                await self._call(_nothing)
            data = await asyncio.wait_for(read_frame(reader, HELLO_FRAME_LIMIT),
                                          HELLO_TIMEOUT_S)
            accepted = await self._call(self.core.accept_hello, data, time.monotonic(),
                                        install=writer)
        except TimeoutError:
            reason = "no HELLO in time"
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            reason = "closed or oversized before a HELLO"
        except lc.LinkProtocolError as exc:
            reason = str(exc)
            log.error("link_protocol_error", error=reason)
        except LinkStateNotSaved:
            reason = "link state not saved"
        finally:
            with contextlib.suppress(ValueError):
                self._unverified.remove(writer)
        if not accepted:
            self.health.connections_refused += 1
            log.warning("link_connection_refused", reason=reason,
                        refused=self.health.connections_refused)
            if self._writer is writer:  # accepted, then the state could not be saved
                self._writer = None
            writer.close()
            return
        await self._serve_classical(reader, writer)

    async def _on_quantum(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        limit = 64 + quantum.SEAL_OVERHEAD + 5 * self.s.params.pulses
        try:
            while True:
                data = await read_frame(reader, limit)
                await self._call(self.core.receive_pulses, data, time.monotonic())
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            log.info("link_quantum_closed", reason=type(exc).__name__)
        except lc.LinkProtocolError as exc:
            # Not a sealed frame: nobody without the link secret gets one in.
            self.health.quantum_frames_rejected += 1
            log.warning("link_quantum_frame_rejected", error=str(exc))
        finally:
            writer.close()

    async def _dial_loop(self) -> None:
        assert self.s.peer is not None and self.s.quantum is not None
        backoff = Backoff(0.2, LOOP_RETRY_MAX_S)
        while True:
            try:
                # A connection that never got as far as Bob's HELLO backs off too: each
                # attempt costs a pad per direction.
                if await self._dial_once():
                    backoff.succeeded()
                else:
                    backoff.failed()
            except OSError as exc:
                log.debug("link_dial_failed", error=str(exc))
                backoff.failed(cap=2.0)
            except LinkStateNotSaved:
                backoff.failed()  # logged where it failed
            except Exception as exc:  # a bug or a failed state write: retry, never die
                self.health.loop_errors += 1
                log.error("link_loop_error", loop="dial", error=type(exc).__name__,
                          retry_in_s=backoff.delay)
                backoff.failed()
            await asyncio.sleep(backoff.delay)

    async def _dial_once(self) -> bool:
        """One connection, until it ends. True if the peer's HELLO arrived on it."""
        assert self.s.peer is not None and self.s.quantum is not None
        if self.core.auth_dirty or self._held_events:
            # A failed state write first: never sign a HELLO that cannot be covered.
            await self._call(_nothing)
        ready_before = self._peer_ready_count
        reader, writer = await asyncio.open_connection(self.s.peer.host, self.s.peer.port)
        try:
            _qr, qwriter = await asyncio.open_connection(self.s.quantum.host,
                                                         self.s.quantum.port)
        except BaseException:
            writer.close()
            raise
        self._qwriter = qwriter
        log.info("link_connected", peer=str(self.s.peer), quantum=str(self.s.quantum))
        try:
            await self._serve_classical(reader, writer)
        finally:
            self._qwriter = None
            qwriter.close()
        return self._peer_ready_count > ready_before

    async def _drive_loop(self) -> None:
        """Alice: run rounds back to back while the pool (free and reserved blocks) is
        below max_key_count and no reservation of hers is waiting for the peer."""
        delay = LOOP_RETRY_S
        while True:
            try:
                await self._drive_once()
                delay = LOOP_RETRY_S
            except Exception as exc:
                delay = await self._loop_error("drive", exc, delay)

    async def _drive_once(self) -> None:
        await asyncio.sleep(0.05)
        core = self.core
        if (self._writer is None or not core.peer_ready or core.round_active
                or self._waiting):
            return
        if not core.round_pads_ok:
            return  # no round can finish; never spend pads (or CPU) on one
        try:
            # Reserved blocks count: a standing slice is pool the SAEs have not
            # drawn yet, so its draining makes room (and the level they see falls).
            level = await self.store.pool_level(time.time())
        except Exception:  # store busy or closing; try again shortly
            return
        if level >= self._max and not core.pads_low:
            return
        number = core.next_round_number()
        prepared = await asyncio.to_thread(core.prepare_round, number)
        while self._waiting:  # a reservation came in while the pulses were made
            await asyncio.sleep(0.01)
        if core.round_active or not core.peer_ready or \
                core.next_round_number() != number:
            return
        # Room is the store's real headroom: behind the refill gate (qkd/kme/refill.py)
        # `level` reads "full" while no refill is due, and a round started only for the
        # link's pads would otherwise throw its key away.
        real = getattr(self.store, "real_level", None)
        room = max(0, self._max - (level if real is None else min(real, level)))
        before = core.stats.rounds_aborted
        try:
            await self._call(functools.partial(core.start_round, room=room),
                             time.monotonic(), prepared)
        except (ValueError, LinkUnavailable):
            return  # the connection changed meanwhile, or the state was not saved
        while core.round_active and self._writer is not None:
            await asyncio.sleep(0.02)
        if core.stats.rounds_aborted <= before:
            self._abort_streak = 0
        else:
            self._abort_streak += 1
            pause = max(self.s.round_pause_s,
                        min(ABORT_BACKOFF_MAX_S,
                            self.s.round_pause_s * 2.0 ** (self._abort_streak - 1)))
            if core.peer_busy_aborts:
                # Bob cannot store his last deposit: each refused round costs a pad
                # per direction, so wait longer and longer.
                pause = max(pause, min(BUSY_BACKOFF_MAX_S, 2.0 ** core.peer_busy_aborts))
            await asyncio.sleep(pause)

    async def _timeout_loop(self) -> None:
        delay = LOOP_RETRY_S
        while True:
            await asyncio.sleep(1.0)
            try:
                if self.core.round_active:
                    drop = await self._call(self.core.check_timeout, time.monotonic())
                    if drop and self._writer is not None:
                        log.warning("link_commit_unacknowledged_reconnect",
                                    round=self.core.pending_commit_round)
                        self._drop_connection()
                elif self.core.auth_dirty or self._held_events:
                    await self._call(_nothing)  # retry a failed state write
                delay = LOOP_RETRY_S
            except LinkStateNotSaved:
                pass  # logged; retried next second
            except Exception as exc:
                delay = await self._loop_error("timeout", exc, delay)

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        st = self.core.stats
        p = self.s.params
        out_lvl, in_lvl = self.core.auth.levels()
        elapsed = time.monotonic() - (self._first_round or self._started)
        per_pulse = st.key_bits / st.pulses if st.pulses else 0.0
        r = self.reservations
        return {
            "link_type": "bb84", "role": self.s.role,
            "quantum_security": QUANTUM_SECURITY,
            "connected": self._writer is not None and self.core.peer_ready,
            "distance_km": p.distance_km, "pulses_per_round": p.pulses,
            "rounds_started": st.rounds_started, "rounds_committed": st.rounds_committed,
            "rounds_aborted": st.rounds_aborted, "auth_failures": st.auth_failures,
            "last_qber": None if st.last_qber is None else round(st.last_qber, 5),
            "last_abort_reason": st.last_abort_reason,
            "key_bits_total": st.key_bits,
            "secret_key_rate_bps": round(st.key_bits / elapsed, 1) if elapsed > 0 else 0.0,
            "key_per_pulse": per_pulse,
            "key_rate_at_source_bps": round(per_pulse * p.rep_rate_hz, 1),
            "auth_mode": self.core.auth.mode,
            "auth_pad_bytes_out": out_lvl, "auth_pad_bytes_in": in_lvl,
            "auth_pad_bytes_used": self.core.auth.used,
            "committed_round": self.core.committed,
            "blocks_discarded": st.blocks_discarded + self.blocks_trimmed,
            "reservations_requested": r.requested, "reservations_confirmed": r.confirmed,
            "reservations_failed": r.failed, "reservations_applied": r.applied,
            "reservations_refused": r.refused,
            "reservations_lapsed": st.reservations_lapsed,
            "reservation_keys_confirmed": r.keys_confirmed,
            "reservation_keys_applied": r.keys_applied,
            # Pads a RESERVE / RESERVE_ACK may still spend (the smaller direction):
            # below the floor reservations are refused, whatever the pool holds.
            "auth_pad_reservation_headroom_bytes": max(
                0, min(out_lvl, in_lvl) - self.core.auth.reserve - lc.ROUND_PAD_BYTES),
            "state_save_failures": self.health.state_save_failures,
            "connections_refused": self.health.connections_refused,
            "quantum_frames_rejected": self.health.quantum_frames_rejected,
            "loop_errors": self.health.loop_errors,
        }


def _nothing() -> None:
    """A core call that changes nothing: `_call` then retries the state write."""


__all__ = ["Bb84Link", "Bb84Settings", "LinkStateNotSaved", "LinkUnavailable", "read_frame",
           "write_frame"]
