"""The gateway process: asyncio glue around the sans-I/O tunnel.

Moves bytes between sockets and `TunnelConnection`, answers its QKD requests through
the ETSI 014 client, runs its timers on the event loop clock, and bridges each tunnel
stream to a local TCP connection. No protocol decision is made here.

Flow control end to end: an application socket is only read while its stream has send
window; a stream's window is only re-granted once the receiving application socket has
taken the bytes (asyncio's pause_writing/resume_writing), so a slow application slows
down its own stream and nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import os
import signal
import socket
import struct
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from aiohttp import web

from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.pki import (
    PkiError,
)
from gateway.runtime.credentials import CredentialFiles, CredentialSource, OwnCertificateExpired
from gateway.runtime.ops import GatewayOps, budget_lines
from gateway.runtime.psk_store import PskStore, PskStoreError
from gateway.tunnel import events as ev
from gateway.tunnel.admission import (
    CUT_COOKIE_RETRY,
    CUT_FIRST_RECORD,
    CUT_HANDSHAKE_BYTES,
    Admission,
    ConnectionCookieGate,
    ConnectionRefused,
    CookieGate,
    CookieIssued,
    CookieRejected,
    LogThrottle,
    PendingHandshake,
    Refused,
)
from gateway.tunnel.connection import ConnectionSettings, TunnelConnection
from gateway.tunnel.handshake import (
    AUTH_PKI,
    MODE_HYBRID,
    MODE_MLKEM_ONLY,
    QKD_NO_KEY,
    QKD_OK,
    QKD_UNREACHABLE,
    Credentials,
    HandshakeParams,
    HandshakePolicy,
    KeyLogEntry,
)
from gateway.tunnel.record import RecordLimits
from gateway.tunnel.streams import MuxSettings, StreamCode
from gateway.tunnel.wire import ErrorCode
from qkd.common.confload import ConfigError
from qkd.common.errors import UserError
from qkd.common.log import configure_logging, get_logger
from qkd.etsi014.client import EtsiClient, KmeError, KmeNoKey, KmeUnavailable

log = get_logger("qkdgw.gateway")

_LINGER_RST = struct.pack("ii", 1, 0)


def _reset_transport(transport: asyncio.BaseTransport | None) -> None:
    """Abort with a TCP RST so the application sees an error, not a clean end."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()  # type: ignore[attr-defined]


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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


class AppStream(asyncio.Protocol):
    """One local TCP connection bridged to one tunnel stream."""

    def __init__(self, tunnel: TunnelSession | None, stream_id: int | None) -> None:
        # The tunnel is None while a local connection waits for the tunnel to come up;
        # stream_id is None until the stream is opened. Neither is touched before then.
        self.tunnel: TunnelSession = tunnel  # type: ignore[assignment]
        self.stream_id = stream_id
        self.transport: asyncio.Transport | None = None
        self._pending_out = bytearray()  # app bytes waiting for send window
        self._pending_in: list[bytes | memoryview] = []  # peer bytes waiting for the app
        self._unconsumed = 0
        self._writing_paused = False
        self._reading_paused = False
        self._app_eof = False
        self._fin_sent = False
        self._peer_fin = False
        self._done = False

    # asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; cast, don't check.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        _nodelay(transport)
        if self._pending_in:
            for chunk in self._pending_in:
                self.deliver(chunk)
            self._pending_in.clear()
        if self._peer_fin:
            self.peer_finished()

    def data_received(self, data: bytes) -> None:
        if self.stream_id is None or self._done:
            self._pending_out += data
            self._pause_reading()
            return
        if self._pending_out:
            self._pending_out += data
        else:
            window = self.tunnel.conn.send_window(self.stream_id)
            if len(data) <= window:
                self.tunnel.conn.send_stream_data(self.stream_id, data)
                self.tunnel.schedule_flush()
                return
            if window:
                self.tunnel.conn.send_stream_data(self.stream_id, data[:window])
                self.tunnel.schedule_flush()
            self._pending_out += data[window:]
        self._pause_reading()

    def eof_received(self) -> bool:
        self._app_eof = True
        self._maybe_send_fin()
        return True  # keep the write side open: the peer may still be sending

    def connection_lost(self, exc: Exception | None) -> None:
        if self._done:
            return
        self._done = True
        if self.stream_id is not None and (exc is not None
                                           or not (self._fin_sent and self._peer_fin)):
            self.tunnel.conn.reset_stream(self.stream_id, StreamCode.CANCELLED,
                                          "application closed the connection")
            self.tunnel.schedule_flush()
        if self.tunnel is not None:
            self.tunnel.forget_stream(self)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._unconsumed and self.stream_id is not None:
            n, self._unconsumed = self._unconsumed, 0
            self.tunnel.conn.stream_data_consumed(self.stream_id, n)
            self.tunnel.schedule_flush()

    # tunnel side ---------------------------------------------------------------------

    def attach(self, stream_id: int) -> None:
        self.stream_id = stream_id
        if self._pending_out or self._app_eof:
            self.window_opened()
        else:
            self._resume_reading()

    def deliver(self, data: bytes | memoryview) -> None:
        if self.transport is None:
            self._pending_in.append(data)
            return
        self.transport.write(data)
        if self._writing_paused:
            self._unconsumed += len(data)
        elif self.stream_id is not None:
            self.tunnel.conn.stream_data_consumed(self.stream_id, len(data))
            # deliver() also runs from connection_made, outside the tunnel's event
            # processing: without a flush the window grant could sit unsent while the
            # peer waits for it.
            self.tunnel.schedule_flush()

    def window_opened(self) -> None:
        if self.stream_id is None or self._done:
            return
        if self._pending_out:
            window = self.tunnel.conn.send_window(self.stream_id)
            if window:
                chunk = bytes(self._pending_out[:window])
                del self._pending_out[:window]
                self.tunnel.conn.send_stream_data(self.stream_id, chunk)
                self.tunnel.schedule_flush()
        if not self._pending_out:
            self._resume_reading()
            self._maybe_send_fin()

    def peer_finished(self) -> None:
        self._peer_fin = True
        if self.transport is None:
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        if self._fin_sent:
            self.transport.close()

    def reset(self) -> None:
        self._done = True
        _reset_transport(self.transport)
        if self.transport is None:
            self._pending_in.clear()

    def _maybe_send_fin(self) -> None:
        if (self._app_eof and not self._fin_sent and not self._pending_out
                and self.stream_id is not None and not self._done):
            self._fin_sent = True
            self.tunnel.conn.end_stream(self.stream_id)
            self.tunnel.schedule_flush()
            if self._peer_fin and self.transport is not None:
                self.transport.close()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self._done:
            self._reading_paused = False
            self.transport.resume_reading()


# -------------------------------------------------------------------- tunnel side


class TunnelSession(asyncio.Protocol):
    """One TCP connection to the peer gateway, driving one TunnelConnection."""

    def __init__(self, gateway: Gateway, initiator: bool) -> None:
        self.gateway = gateway
        self.initiator = initiator
        self.loop = asyncio.get_running_loop()
        self.conn: TunnelConnection
        if initiator or gateway.admission is None:
            self.conn = gateway.new_connection(initiator, self.loop.time())
        # else: admission builds it (with the connection's cookie gate), and only for a
        # connection it admits: a refused one under a flood costs no protocol state.
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, AppStream] = {}
        self.peer_address = ""
        self.ready = asyncio.Event()
        # Initiator: set once the ClientHello is ready (QKD keys fetched) or the attempt
        # failed; the TCP connection is opened only then (see Gateway._dial_loop).
        self.hello_ready = asyncio.Event()
        self._started = False
        self.closed = asyncio.Event()
        self.last_handshake: datetime | None = None
        self.bootstrap_auth = ""  # how this tunnel was first authenticated: pki or psk
        self._psk_failed = False
        self.psk_epoch = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        # labels() takes a lock per call: resolve the per-record counters once.
        self._bytes_in = gateway.metrics.tunnel_bytes.labels("in")
        self._bytes_out = gateway.metrics.tunnel_bytes.labels("out")
        # Responder admission (gateway/admission.py): the pending-handshake slot this
        # connection holds, the deadline for its first complete record, and the bytes
        # it sent before its handshake was confirmed.
        self._ticket: PendingHandshake | None = None
        self._refused = False
        self._gate: ConnectionCookieGate | None = None
        self._cookies_seen = 0
        self._records_expected = 0
        self._record_timer: asyncio.TimerHandle | None = None
        self._handshake_bytes = 0
        self._source = ""

    # asyncio callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; cast, don't check.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        _nodelay(transport)
        peer = transport.get_extra_info("peername")
        self.peer_address = f"{peer[0]}:{peer[1]}" if peer else "?"
        if (not self.initiator and self.gateway.admission is not None
                and not self._admit(transport, peer[0] if peer else "")):
            return
        if not self.initiator:
            self.gateway.sessions.add(self)
        log.info("tunnel.connected", peer=self.peer_address,
                 role="initiator" if self.initiator else "responder")
        if self.initiator and not self._started:
            self.prestart()
        self.process()

    def prestart(self) -> None:
        """Initiator: begin the handshake before dialling, so the QKD keys are fetched
        first and the peer's first-record deadline does not include our KME's latency."""
        self._started = True
        self.conn.start(self.loop.time())
        self.process()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._bytes_in.inc(len(data))
        ticket = self._ticket
        if ticket is not None and ticket.pending:
            self._handshake_bytes += len(data)
            if self._handshake_bytes > self.gateway.config.admission.max_handshake_bytes:
                self._cut(CUT_HANDSHAKE_BYTES, "too many bytes before the handshake completed")
                return
        self.conn.receive_data(data, self.loop.time())
        self.process()
        if ticket is not None:
            gate = self._gate
            if gate is not None and gate.issued != self._cookies_seen and not self.conn.closed:
                # A HelloRetryRequest went out: the client gets the same short deadline
                # to come back with the cookie as it had for its first record.
                self._cookies_seen = gate.issued
                self._expect_record(self.conn.stats.records_received + 1, CUT_COOKIE_RETRY)
            elif (self._record_timer is not None
                  and self.conn.stats.records_received >= self._records_expected):
                self._record_timer.cancel()
                self._record_timer = None
            self.gateway.drain_admission()

    def eof_received(self) -> bool:
        if self._refused:
            return False
        self.conn.connection_lost(self.loop.time())
        self.process()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._record_timer is not None:
            self._record_timer.cancel()
            self._record_timer = None
        if self._ticket is not None:
            self._ticket.release()
            self.gateway.drain_admission()
        if self._refused:
            # Never admitted: no session to end, nothing to log beyond the refusal.
            self.closed.set()
            return
        self.conn.connection_lost(self.loop.time())
        self.process()
        if self._timer is not None:
            self._timer.cancel()
        for task in self._tasks:
            task.cancel()
        self.closed.set()
        self.gateway.tunnel_lost(self)

    # admission (responder) ---------------------------------------------------------------

    def _admit(self, transport: asyncio.Transport, source: str) -> bool:
        """Refuse (RST, counted) or admit a new tunnel connection before any handshake work."""
        g = self.gateway
        assert g.admission is not None
        now = self.loop.time()
        self._source = source
        decision = g.admission.admit(source, now)
        if isinstance(decision, Refused):
            self._refused = True
            g.drain_admission()
            _reset_transport(transport)
            return False
        self._ticket = decision
        self._gate = decision.cookie_gate()
        self.conn = g.new_connection(False, now, cookie_gate=self._gate)
        # A client that never completes a record (a trickled or oversized one) is cut
        # long before handshake_timeout frees its slot.
        self._expect_record(1, CUT_FIRST_RECORD)
        g.drain_admission()
        return True

    def _expect_record(self, count: int, reason: str) -> None:
        """Cut the connection unless `count` records have arrived within the deadline."""
        if self._record_timer is not None:
            self._record_timer.cancel()
        self._records_expected = count
        self._record_timer = self.loop.call_later(
            self.gateway.config.admission.first_record_timeout, self._record_overdue, reason)

    def _record_overdue(self, reason: str) -> None:
        self._record_timer = None
        if not self.conn.closed and self.conn.stats.records_received < self._records_expected:
            self._cut(reason, "no complete record in time")

    def _cut(self, reason: str, detail: str) -> None:
        g = self.gateway
        if g.admission is not None:
            g.admission.note_refused(self._source, reason)
            g.drain_admission()
        self.conn.close(ErrorCode.TIMEOUT if reason != CUT_HANDSHAKE_BYTES
                        else ErrorCode.PROTOCOL_ERROR, detail)
        self.process()
        _reset_transport(self.transport)

    # driving ---------------------------------------------------------------------------

    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_scheduled = False
        self.process()

    def process(self) -> None:
        while (event := self.conn.next_event()) is not None:
            self._handle(event)
        if self.transport is None:
            # Not connected yet: the ClientHello stays queued in the connection.
            if self.conn.closed or self.conn.has_data_to_send:
                self.hello_ready.set()
            if self.conn.closed:
                self.discard()
            else:
                self._arm_timer()
            return
        out = self.conn.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self._bytes_out.inc(sum(map(len, out)))
            self.transport.writelines(out)
        if self.conn.closed:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()
            return
        self._arm_timer()

    def discard(self) -> None:
        """Drop an initiator attempt that ended before any connection was made."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self.closed.set()

    def _arm_timer(self) -> None:
        at = self.conn.get_timer()
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.conn.handle_timer(self.loop.time())
        self.process()

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # events ------------------------------------------------------------------------------

    def _handle(self, event: ev.Event) -> None:
        g = self.gateway
        if self._psk_failed and isinstance(event, ev.HandshakeCompleted | ev.TunnelReady):
            return  # this session was dropped before its HandshakeDone could leave
        if isinstance(event, ev.StreamDataReceived):
            app = self.streams.get(event.stream_id)
            if app is not None:
                app.deliver(event.data)
        elif isinstance(event, ev.StreamWindowOpened):
            app = self.streams.get(event.stream_id)
            if app is not None:
                app.window_opened()
        elif isinstance(event, ev.StreamEnded):
            app = self.streams.get(event.stream_id)
            if app is not None:
                app.peer_finished()
        elif isinstance(event, ev.StreamReset):
            app = self.streams.pop(event.stream_id, None)
            g.metrics.streams_reset.labels(str(event.code)).inc()
            if app is not None:
                log.info("stream.reset", stream=event.stream_id, code=event.code,
                         reason=event.reason)
                app.reset()
        elif isinstance(event, ev.StreamOpened):
            self._open_service(event.stream_id, event.service)
        elif isinstance(event, ev.QkdKeysRequested):
            self._spawn(self._fetch_enc_keys(event))
        elif isinstance(event, ev.QkdKeysToFetch):
            self._spawn(self._fetch_dec_keys(event))
        elif isinstance(event, ev.QkdStatusToCheck):
            self._spawn(self._check_qkd_status(event))
        elif isinstance(event, ev.OwnCertificateRefused):
            g.metrics.own_certificate_refused.labels(event.kind).inc()
            log.error("tunnel.OWN_CERTIFICATE_REFUSED", kind=event.kind, detail=event.detail,
                      peer=self.peer_address,
                      role="initiator" if self.initiator else "responder")
        elif isinstance(event, ev.UnexpectedError):
            g.metrics.unexpected_errors.labels(event.where, event.exc_type).inc()
            log.error("tunnel.UNEXPECTED_ERROR", where=event.where, exc_type=event.exc_type,
                      message=event.message, location=event.location,
                      peer=self.peer_address,
                      detail="closed with INTERNAL_ERROR; this is a bug or a parser that "
                             "let bad input through: please report it")
        elif isinstance(event, ev.HandshakeCompleted):
            self._on_handshake(event)
        elif isinstance(event, ev.NextPskDerived | ev.PskConfirmed | ev.PskRejected):
            self._on_psk(event)
        elif isinstance(event, ev.TunnelReady):
            if self._ticket is not None:
                self._ticket.confirmed()
                g.drain_admission()
            self.ready.set()
            g.tunnel_ready(self)
        elif isinstance(event, ev.KeyUpdated):
            g.metrics.key_updates.inc()
            log.debug("tunnel.key_update", direction=event.direction,
                      generation=event.generation)
        elif isinstance(event, ev.ConnectionTerminated):
            self._on_terminated(event)

    def _on_psk(self, event: ev.Event) -> None:
        """Persist PSK state before the bytes that tell the peer we hold it (`process`
        handles events before `data_to_send`); if the write fails, nothing more is sent."""
        g = self.gateway
        if g.psk is None:
            return
        try:
            g.psk.apply(event)
        except PskStoreError as exc:
            self._psk_failed = True
            log.error("psk.store_failed", error=str(exc),
                      detail="dropping the connection unsent so the peer does not move to "
                             "a PSK this site could not keep")
            g.metrics.psk_store_failures.inc()
            _reset_transport(self.transport)
            self.conn.close(ErrorCode.INTERNAL_ERROR, "PSK state could not be stored")
            return
        if isinstance(event, ev.PskRejected):
            g.metrics.psk_rejected.inc()
        st = g.psk.status()
        g.metrics.psk_epoch.set(st.current_epoch)

    def _on_handshake(self, event: ev.HandshakeCompleted) -> None:
        g = self.gateway
        self.last_handshake = datetime.now(UTC)
        if not event.rekey:
            self.bootstrap_auth = event.auth
            self.psk_epoch = event.psk_epoch
            if event.auth == AUTH_PKI and g.psk is not None and g.psk.status().bootstraps > 1:
                log.warning("tunnel.PKI_REBOOTSTRAP", peer=event.peer_identity,
                            detail="the PSK chain was restarted from PKI authentication")
        g.metrics.handshakes.labels(event.auth, event.mode).inc()
        g.metrics.qkd_keys.inc(len(event.qkd_key_ids))
        g.metrics.epoch.set(event.epoch)
        if event.rekey:
            g.metrics.rekeys.inc()
        fields = dict(peer=event.peer_identity, epoch=event.epoch, auth=event.auth,
                      mode=event.mode, kem=event.kem, qkd_key_ids=list(event.qkd_key_ids),
                      rekey=event.rekey, psk_epoch=event.psk_epoch or None,
                      its_mac=event.its_mac)
        if event.mode == MODE_MLKEM_ONLY:
            g.metrics.degraded.set(1)
            g.metrics.degraded_handshakes.labels(event.qkd_status,
                                                 event.peer_qkd_status).inc()
            log.warning("tunnel.DEGRADED_MODE", **fields, local_kme=event.qkd_status,
                        peer_kme=event.peer_qkd_status,
                        detail="session keys come from ML-KEM alone: neither site's KME "
                               "had a key (or could be reached) and both sides allow "
                               "degraded mode")
        else:
            g.metrics.degraded.set(0)
            log.info("tunnel.handshake_complete", **fields)

    def _on_terminated(self, event: ev.ConnectionTerminated) -> None:
        g = self.gateway
        g.metrics.tunnel_closes.labels(str(event.code), str(event.clean).lower()).inc()
        if not self.conn.ready and not event.clean:
            g.metrics.handshake_failures.labels(str(event.code)).inc()
        level = log.info if event.clean else log.warning
        level("tunnel.closed", peer=self.peer_address, code=event.code,
              code_name=_code_name(event.code), reason=event.reason, clean=event.clean,
              by_peer=event.by_peer)
        for app in list(self.streams.values()):
            app.reset()
        self.streams.clear()

    # QKD ---------------------------------------------------------------------------------

    def _kme_failed(self, handshake_id: int, exc: KmeError) -> None:
        """Map a KME failure onto the core's two answers: only "no key" and "cannot be
        reached" are unavailability (which an initiator may, by policy, run without);
        anything the KME refused is a hard failure."""
        status = _kme_status(exc)
        if status is None:
            self.conn.qkd_keys_rejected(handshake_id, str(exc), self.loop.time())
        else:
            self.conn.qkd_keys_unavailable(handshake_id, str(exc), self.loop.time(), status)

    async def _fetch_enc_keys(self, event: ev.QkdKeysRequested) -> None:
        g = self.gateway
        try:
            keys = await g.kme.get_enc_keys(event.peer_sae_id, event.number, event.size_bits)
        except KmeError as exc:
            g.metrics.kme_errors.labels(_kme_kind(exc)).inc()
            log.error("kme.enc_keys_failed", error=str(exc), kind=_kme_kind(exc))
            self._kme_failed(event.handshake_id, exc)
        else:
            self.conn.supply_qkd_keys(event.handshake_id, [(k.key_id, k.key) for k in keys],
                                      self.loop.time())
        self.process()

    async def _fetch_dec_keys(self, event: ev.QkdKeysToFetch) -> None:
        g = self.gateway
        replayed = [k for k in event.key_ids if k in g.used_key_ids]
        if replayed:
            # A replayed first flight: someone spent these IDs on another connection.
            # Never a reason to run without QKD (issue 9.3): the handshake fails.
            log.warning("tunnel.qkd_key_id_replayed", key_ids=replayed)
            g.metrics.kme_errors.labels("replayed_key_id").inc()
            self.conn.qkd_keys_rejected(event.handshake_id, "QKD key ID used before",
                                        self.loop.time())
            self.process()
            return
        g.used_key_ids.update(event.key_ids)
        try:
            keys = await g.kme.get_dec_keys(event.master_sae_id, list(event.key_ids))
        except KmeError as exc:
            g.metrics.kme_errors.labels(_kme_kind(exc)).inc()
            log.error("kme.dec_keys_failed", error=str(exc), kind=_kme_kind(exc))
            self._kme_failed(event.handshake_id, exc)
        else:
            self.conn.supply_qkd_keys(event.handshake_id, [(k.key_id, k.key) for k in keys],
                                      self.loop.time())
        self.process()

    async def _check_qkd_status(self, event: ev.QkdStatusToCheck) -> None:
        """The responder's own look at its KME before agreeing to ML-KEM-only."""
        g = self.gateway
        try:
            status = await g.kme.status(event.peer_sae_id)
        except KmeError as exc:
            g.metrics.kme_errors.labels(_kme_kind(exc)).inc()
            log.warning("kme.status_failed", error=str(exc), kind=_kme_kind(exc))
            answer = _kme_status(exc)
            if answer is None:
                self.conn.qkd_keys_rejected(event.handshake_id, str(exc), self.loop.time())
                self.process()
                return
        else:
            per_key = max(1, -(-event.size_bits // max(1, int(status["key_size"]))))
            enough = int(status["stored_key_count"]) >= event.number * per_key
            answer = QKD_OK if enough else QKD_NO_KEY
        self.conn.local_qkd_status(event.handshake_id, answer, self.loop.time())
        self.process()

    # streams -----------------------------------------------------------------------------

    def _open_service(self, stream_id: int, service: str) -> None:
        g = self.gateway
        target = g.services.get(service)
        if target is None:
            log.warning("stream.unknown_service", stream=stream_id, service=service)
            self.conn.reset_stream(stream_id, StreamCode.UNKNOWN_SERVICE,
                                   f"no service named {service!r} here")
            self.schedule_flush()
            return
        g.metrics.streams_opened.labels("in").inc()
        app = AppStream(self, stream_id)
        self.streams[stream_id] = app
        self._spawn(self._connect_service(app, service, target))

    async def _connect_service(self, app: AppStream, service: str, target: Any) -> None:
        try:
            await self.loop.create_connection(lambda: app, target.host, target.port)
        except OSError as exc:
            log.warning("stream.connect_failed", service=service, target=str(target),
                        error=exc.strerror or str(exc))
            if self.streams.pop(app.stream_id or 0, None) is not None and app.stream_id:
                self.conn.reset_stream(app.stream_id, StreamCode.CONNECT_FAILED,
                                       f"service {service!r} is unreachable")
                self.schedule_flush()

    def attach_local(self, app: AppStream, service: str) -> bool:
        if not self.conn.ready:
            return False
        try:
            sid = self.conn.open_stream(service)
        except ValueError as exc:
            log.warning("stream.open_refused", service=service, reason=str(exc))
            return False
        self.gateway.metrics.streams_opened.labels("out").inc()
        app.tunnel = self
        self.streams[sid] = app
        app.attach(sid)
        self.schedule_flush()
        return True

    def forget_stream(self, app: AppStream) -> None:
        if app.stream_id is not None and self.streams.get(app.stream_id) is app:
            del self.streams[app.stream_id]

    def close(self) -> None:
        self.conn.close()
        self.process()


class LocalListener(asyncio.Protocol):
    """Accepts an application connection and attaches it to the tunnel when ready."""

    def __init__(self, gateway: Gateway, service: str) -> None:
        self.gateway = gateway
        self.service = service
        self.app: AppStream | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        g = self.gateway
        tunnel = g.tunnel
        app = AppStream(tunnel, None)
        app.connection_made(transport)
        self.app = app
        if tunnel is not None and tunnel.attach_local(app, self.service):
            return
        transport.pause_reading()
        app._reading_paused = True
        g.spawn(self._wait_for_tunnel(app))

    async def _wait_for_tunnel(self, app: AppStream) -> None:
        g = self.gateway
        deadline = asyncio.get_running_loop().time() + g.config.connect_wait
        while not app._done:
            tunnel = g.tunnel
            if tunnel is not None and tunnel.attach_local(app, self.service):
                return
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            await g.wait_tunnel(min(remaining, 1.0))
        log.warning("stream.no_tunnel", service=self.service,
                    detail="the tunnel is not up; the application connection is reset")
        app.reset()

    def data_received(self, data: bytes) -> None:
        if self.app is not None:
            self.app.data_received(data)

    def eof_received(self) -> bool:
        return self.app.eof_received() if self.app is not None else False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.app is not None:
            self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()


# ----------------------------------------------------------------------- the gateway


def _kme_status(exc: KmeError) -> str | None:
    """The degraded reason a KME failure stands for, or None if it is a refusal."""
    if isinstance(exc, KmeNoKey):
        return QKD_NO_KEY
    if isinstance(exc, KmeUnavailable):
        return QKD_UNREACHABLE
    return None


def _kme_kind(exc: KmeError) -> str:
    if isinstance(exc, KmeNoKey):
        return "no_key"
    if isinstance(exc, KmeUnavailable):
        return "unavailable"
    return type(exc).__name__


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"code_{code}"


def load_credentials(config: GatewayConfig) -> Credentials:
    """The gateway's signing key and chain, checked against its own config: key matches
    certificate, certificate chains to the CA, is valid and names this site, and the
    CRL (if set) verifies. Any problem is a ConfigError naming the [pki] field."""
    return credential_source(config).current()


def credential_source(config: GatewayConfig, registry: Any = None) -> CredentialSource:
    """This gateway's credentials from [pki], re-read when the files change
    (gateway/credentials.py); a set that is invalid at start is a ConfigError."""
    files = CredentialFiles(key=config.key_file, cert=config.cert_file, ca=config.ca_file,
                            crl=config.crl_file)
    try:
        return CredentialSource(files, config.site_id,
                                crl_grace=timedelta(seconds=config.crl_grace),
                                registry=registry)
    except PkiError as exc:
        text = str(exc)
        name = next((n for n, p in (("crl", files.crl), ("key", files.key),
                                    ("cert", files.cert), ("ca", files.ca))
                     if p is not None and text.startswith(str(p))), "cert")
        raise ConfigError(f"{config.source}: [pki] {name}: {text}") from None


class RecentKeyIds:
    """The last `limit` QKD key IDs named to this gateway: a cheap replay check in front
    of the KME's durable once-only delivery. Bounded, since flood hellos name random IDs."""

    def __init__(self, limit: int = 65536) -> None:
        self.limit = limit
        self._ids: dict[str, None] = {}

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def update(self, key_ids: Sequence[str]) -> None:
        for key_id in key_ids:
            self._ids[key_id] = None
        while len(self._ids) > self.limit:
            del self._ids[next(iter(self._ids))]


class Gateway:
    def __init__(self, config: GatewayConfig, *, credentials: Credentials | None = None) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        # Injected credentials (tests) stay fixed; from config they follow the files.
        self.credential_source = None if credentials is not None else credential_source(
            config, self.metrics.registry)
        self.credentials = credentials or cast(CredentialSource,
                                               self.credential_source).current()
        self.services = {s.name: s.target for s in config.services}
        policy = HandshakePolicy(
            kems=config.kems,
            allowed_modes=(MODE_HYBRID, MODE_MLKEM_ONLY) if config.allow_degraded
            else (MODE_HYBRID,),
            qkd_key_size_bits=config.qkd_key_bits,
            pqc_backend=config.pqc_backend,
            its_mac=config.its_mac,
        )
        self.psk: PskStore | None = None
        if config.psk_enabled:
            try:
                self.psk = PskStore(config.state_dir / "psk.sqlite", config.peer_site_id,
                                    pki_rebootstrap=config.pki_rebootstrap)
            except PskStoreError as exc:
                raise ConfigError(f"{config.source}: [gateway] state_dir: {exc} (fix: make "
                                  f"{config.state_dir} a writable local directory that no "
                                  "other running gateway uses)") from None
        self.params = HandshakeParams(
            local_identity=config.site_id, peer_identity=config.peer_site_id,
            local_sae_id=config.sae_id, peer_sae_id=config.peer_sae_id,
            credentials=self.credentials, policy=policy, stream_window=config.stream_window,
            psk_book=self.psk)
        self.settings = ConnectionSettings(
            handshake_timeout=config.handshake_timeout,
            rekey_interval=config.rekey_interval,
            record_limits=RecordLimits(update_after_records=config.key_update_records,
                                       update_after_bytes=config.key_update_bytes),
            mux=MuxSettings(recv_window=config.stream_window, max_streams=config.max_streams),
        )
        self.kme = EtsiClient(config.kme_url, ca_file=config.kme_ca, cert_file=config.kme_cert,
                              key_file=config.kme_key, timeout=config.kme_timeout,
                              kme_id=config.kme_name, min_tls=config.kme_min_tls)
        self.keylog: KeyLogWriter | None = None
        self.used_key_ids = RecentKeyIds()
        self.tunnel: TunnelSession | None = None
        self.sessions: set[TunnelSession] = set()
        self.started = time.time()
        self.tunnel_connects = 0
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tunnel_changed = asyncio.Event()
        self._stopping = False
        self._admin_runner: web.AppRunner | None = None
        self.admin_port: int | None = None
        self.tunnel_port: int | None = None
        self.listener_ports: dict[str, int] = {}
        # Only the listening side admits connections; see gateway/admission.py.
        self.admission: Admission | None = (
            Admission(config.admission) if config.tunnel_listen is not None else None)
        self._admission_log = LogThrottle(1.0)
        self.totals = {"handshakes": 0, "rekeys": 0, "key_updates": 0,
                       "qkd_keys_consumed": 0, "degraded_handshakes": 0}
        self.ops = GatewayOps(self)  # key budget, status page, probes (gateway/runtime/ops.py)

    def new_connection(self, initiator: bool, now: float,
                       cookie_gate: CookieGate | None = None) -> TunnelConnection:
        if self.credential_source is not None:
            # A renewed certificate or re-signed CRL counts from the next connection on.
            self.credentials = self.credential_source.current()
            if self.params.credentials is not self.credentials:
                self.params = dataclasses.replace(self.params, credentials=self.credentials)
        return TunnelConnection(initiator=initiator, params=self.params,
                                settings=self.settings, now=now, keylog=self.keylog,
                                cookie_gate=cookie_gate)

    def drain_admission(self) -> None:
        """Admission events to metrics and (throttled) log lines."""
        a = self.admission
        if a is None:
            return
        m = self.metrics
        now = time.monotonic()
        while a.events:
            e = a.events.popleft()
            if isinstance(e, ConnectionRefused):
                m.tunnel_refused.labels(e.reason).inc()
                held = self._admission_log.allow("refused:" + e.reason, now)
                if held is not None:
                    log.warning("tunnel.refused", source=e.source, reason=e.reason,
                                pending=a.pending, suppressed_since_last=held)
            elif isinstance(e, CookieIssued):
                m.cookie_retries.inc()
                held = self._admission_log.allow("cookie", now)
                if held is not None:
                    log.info("tunnel.cookie_sent", source=e.source, under_load=e.under_load,
                             pending=a.pending, suppressed_since_last=held)
            elif isinstance(e, CookieRejected):
                m.cookies_rejected.labels(e.reason).inc()
                held = self._admission_log.allow("cookie_rejected:" + e.reason, now)
                if held is not None:
                    log.warning("tunnel.cookie_rejected", source=e.source, reason=e.reason,
                                suppressed_since_last=held)
        m.pending_handshakes.set(a.pending)

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        if cfg.keylog_file is not None:
            self.keylog = KeyLogWriter(cfg.keylog_file)
            log.warning("KEYLOG_ENABLED", path=str(cfg.keylog_file),
                        detail="every session's ML-KEM secret and QKD key is written to this "
                               "file: anyone with it and a recording can decrypt the tunnel. "
                               "Never enable this in production.")
        for listener in cfg.listeners:
            server = await loop.create_server(
                functools.partial(LocalListener, self, listener.service),
                listener.listen.host, listener.listen.port)
            self._servers.append(server)
            port = server.sockets[0].getsockname()[1]
            self.listener_ports[listener.service] = port
            log.info("gateway.listening", service=listener.service,
                     address=f"{listener.listen.host}:{port}")
        if cfg.tunnel_listen is not None:
            server = await loop.create_server(lambda: self._accept_tunnel(),
                                              cfg.tunnel_listen.host, cfg.tunnel_listen.port)
            self._servers.append(server)
            self.tunnel_port = server.sockets[0].getsockname()[1]
            log.info("gateway.tunnel_listening",
                     address=f"{cfg.tunnel_listen.host}:{self.tunnel_port}")
        if cfg.admin_listen is not None:
            await self._start_admin()
        if cfg.tunnel_connect is not None:
            self.spawn(self._dial_loop())
        log.info("gateway.started", site=cfg.site_id, peer=cfg.peer_site_id,
                 role="initiator" if cfg.initiator else "responder", kem=cfg.kem,
                 policy="hybrid+degraded" if cfg.allow_degraded else "hybrid-required",
                 rekey_interval_s=cfg.rekey_interval, kme=cfg.kme_url)
        if cfg.allow_degraded:
            log.warning("gateway.DEGRADED_MODE_ALLOWED",
                        detail="sessions may run on ML-KEM alone while the QKD link is down; "
                               "the peer must allow it too")

    def _accept_tunnel(self) -> TunnelSession:
        # Added to `sessions` once admitted (connection_made).
        return TunnelSession(self, initiator=False)

    def _check_bootstrap(self) -> None:
        """Raise OwnCertificateExpired instead of dialling into a PKI bootstrap that
        would present an expired certificate. A PSK reconnect needs no certificate."""
        if self.credential_source is None:
            return
        if self.psk is not None and self.psk.peek() is not None:
            return
        problem = self.credential_source.bootstrap_problem()
        if problem is not None:
            raise OwnCertificateExpired(problem)

    async def _dial_loop(self) -> None:
        cfg = self.config
        assert cfg.tunnel_connect is not None
        loop = asyncio.get_running_loop()
        delay = cfg.reconnect_min
        while not self._stopping:
            session: TunnelSession | None = None
            attempt: TunnelSession | None = None
            try:
                self._check_bootstrap()
                attempt = TunnelSession(self, initiator=True)
                attempt.prestart()
                await attempt.hello_ready.wait()
                if attempt.conn.closed:
                    # No QKD key (or no PSK the policy accepts): logged by the session.
                    await attempt.closed.wait()
                else:
                    _, session = await loop.create_connection(
                        functools.partial(lambda a: a, attempt),
                        cfg.tunnel_connect.host, cfg.tunnel_connect.port)
            except OSError as exc:
                if attempt is not None:
                    attempt.discard()
                log.warning("tunnel.connect_failed", address=str(cfg.tunnel_connect),
                            error=exc.strerror or str(exc), retry_in_s=round(delay, 2))
            except OwnCertificateExpired as exc:
                self.metrics.handshake_failures.labels("own_certificate_expired").inc()
                self.metrics.own_certificate_refused.labels(
                    "revoked" if "revoked" in str(exc) else "expired").inc()
                log.error("tunnel.BOOTSTRAP_REFUSED", reason=str(exc),
                          retry_in_s=round(delay, 2))
            if session is not None:
                self.tunnel_connects += 1
                self.sessions.add(session)
                # The session ends by itself: a failed handshake closes it (the handshake
                # has its own deadline), a working tunnel runs until it drops.
                await session.closed.wait()
                if session.ready.is_set():
                    delay = cfg.reconnect_min
            if self._stopping:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, cfg.reconnect_max)

    def tunnel_ready(self, session: TunnelSession) -> None:
        old = self.tunnel
        self.tunnel = session
        self.metrics.tunnel_up.set(1)
        self._tunnel_changed.set()
        self._tunnel_changed = asyncio.Event()
        if old is not None and old is not session:
            # A peer that reconnects replaces the old tunnel; one tunnel per peer.
            old.close()

    def tunnel_lost(self, session: TunnelSession) -> None:
        self.sessions.discard(session)
        stats = session.conn.stats
        self.totals["handshakes"] += stats.handshakes
        self.totals["rekeys"] += stats.rekeys
        self.totals["key_updates"] += stats.key_updates
        self.totals["qkd_keys_consumed"] += stats.qkd_keys_consumed
        self.totals["degraded_handshakes"] += stats.degraded_handshakes
        if self.tunnel is session:
            self.tunnel = None
            self.metrics.tunnel_up.set(0)

    async def wait_tunnel(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._tunnel_changed.wait(), timeout)

    def status(self) -> dict[str, Any]:
        t = self.tunnel
        totals = dict(self.totals)
        for s in self.sessions:
            totals["handshakes"] += s.conn.stats.handshakes
            totals["rekeys"] += s.conn.stats.rekeys
            totals["key_updates"] += s.conn.stats.key_updates
            totals["qkd_keys_consumed"] += s.conn.stats.qkd_keys_consumed
            totals["degraded_handshakes"] += s.conn.stats.degraded_handshakes
        peer: dict[str, Any] = {"site_id": self.config.peer_site_id, "tunnel": "down"}
        if t is not None and t.conn.ready and t.conn.session is not None:
            sess = t.conn.session
            next_rekey = t.conn.next_rekey_at
            peer.update(
                tunnel="up", address=t.peer_address, epoch=sess.epoch,
                auth_mode=t.bootstrap_auth,
                bootstrap_psk_epoch=t.psk_epoch or None,
                session_auth=sess.auth, its_mac=sess.its_mac,
                mode=sess.mode, degraded=sess.mode != MODE_HYBRID, kem=sess.kem,
                local_kme=sess.qkd_status, peer_kme=sess.peer_qkd_status,
                qkd_keys_consumed=t.conn.stats.qkd_keys_consumed,
                last_handshake=t.last_handshake.isoformat() if t.last_handshake else None,
                next_rekey_in_s=None if next_rekey is None
                else round(max(0.0, next_rekey - t.loop.time()), 1),
                open_streams=t.conn.open_streams,
            )
            if os.environ.get("QKDGW_DEBUG_STREAMS"):
                peer["streams"] = {
                    sid: dict(window=t.conn.send_window(sid), pending=len(a._pending_out),
                              unconsumed=a._unconsumed, rpaused=a._reading_paused,
                              wpaused=a._writing_paused, eof=a._app_eof, fin=a._fin_sent,
                              peer_fin=a._peer_fin, done=a._done,
                              buf=a.transport.get_write_buffer_size() if a.transport else None)
                    for sid, a in t.streams.items()}
        if self.psk is not None:
            peer["psk"] = self.psk.status().as_dict()
            peer["psk"]["pki_rebootstrap_allowed"] = self.config.pki_rebootstrap
        else:
            peer["psk"] = None
        return {
            "site_id": self.config.site_id,
            "role": "initiator" if self.config.initiator else "responder",
            "uptime_s": round(time.time() - self.started, 1),
            "peer": peer,
            **totals,
            "tunnel_connects": self.tunnel_connects,
            "budget": self.ops.status(),
            "kme_tls": self.kme.tls_info(),
        }

    async def _start_admin(self) -> None:
        cfg = self.config
        assert cfg.admin_listen is not None
        app = web.Application()

        async def status(_request: web.Request) -> web.Response:
            return web.json_response(self.status())

        async def metrics(_request: web.Request) -> web.Response:
            return web.Response(body=self.metrics.render(),
                                content_type="text/plain", charset="utf-8")

        app.router.add_get("/status", status)
        app.router.add_get("/metrics", metrics)
        self.ops.add_routes(app)
        self._admin_runner = web.AppRunner(app, access_log=None)
        await self._admin_runner.setup()
        site = web.TCPSite(self._admin_runner, cfg.admin_listen.host, cfg.admin_listen.port)
        await site.start()
        server = site._server
        assert server is not None
        self.admin_port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        log.info("gateway.admin_listening", address=f"{cfg.admin_listen.host}:{self.admin_port}")
        self.ops.start()

    async def close(self) -> None:
        self._stopping = True
        for s in self._servers:
            s.close()
        for session in list(self.sessions):
            session.close()
        for task in list(self._tasks):
            task.cancel()
        for s in self._servers:
            with contextlib.suppress(Exception):
                await s.wait_closed()
        await self.ops.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        await self.kme.close()
        if self.keylog is not None:
            self.keylog.close()
        if self.psk is not None:
            self.psk.close()
        log.info("gateway.stopped", site=self.config.site_id)


# ------------------------------------------------------------------------------ CLI


def _keep_heap() -> None:
    """Stop glibc from returning heap to the kernel after every burst of records.

    Each 64 KiB record is a fresh buffer; with glibc's default trim threshold the heap
    shrinks and regrows constantly, and the page faults cost about a quarter of the
    sending gateway's CPU (measured with perf, benchmarks/README.md)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    mallopt(m_mmap_threshold, 1 << 20)
    mallopt(m_trim_threshold, 64 << 20)
    mallopt(m_top_pad, 16 << 20)


def _install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(config: GatewayConfig, ready_file: Path | None = None) -> None:
    gateway = Gateway(config)
    await gateway.start()
    if ready_file is not None:
        ports = {"admin": gateway.admin_port, "tunnel": gateway.tunnel_port,
                 "listeners": gateway.listener_ports, "pid": os.getpid()}
        tmp = ready_file.with_suffix(".tmp")
        import json

        tmp.write_text(json.dumps(ports))
        tmp.replace(ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await gateway.close()


def _cmd_gateway(args: argparse.Namespace) -> int:
    config = GatewayConfig.load(args.config)
    configure_logging(config.log_level, config.log_format, process=f"gateway:{config.site_id}")
    _keep_heap()
    _install_uvloop()
    asyncio.run(serve(config, Path(args.ready_file) if args.ready_file else None))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import json
    import urllib.error
    import urllib.request


    url = args.url.rstrip("/") + "/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            status = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise UserError(f"cannot read {url}: {exc} (fix: check the gateway's [admin] listen "
                        f"address and that it is running)") from None
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    peer = status.get("peer", {})
    print(f"site {status['site_id']} ({status['role']}), up {status['uptime_s']} s")
    print(f"  peer {peer.get('site_id')}: tunnel {peer.get('tunnel')}")
    for key in ("auth_mode", "bootstrap_psk_epoch", "its_mac", "epoch", "mode", "degraded",
                "local_kme", "peer_kme", "kem", "last_handshake", "next_rekey_in_s",
                "qkd_keys_consumed", "open_streams"):
        if key in peer:
            print(f"    {key:16} {peer[key]}")
    psk = peer.get("psk")
    if psk is None:
        print("    psk              off (every tunnel bootstraps by PKI)")
    else:
        state = "OUT OF STEP with the peer" if psk.get("out_of_step") else "in step"
        print(f"    psk              epoch {psk.get('current_epoch')} ({state}; pending "
              f"{psk.get('pending_epoch')}, previous {psk.get('previous_epoch')}, "
              f"PKI bootstraps {psk.get('bootstraps')}, re-bootstrap "
              f"{'allowed' if psk.get('pki_rebootstrap_allowed') else 'refused'})")
    for key in ("handshakes", "rekeys", "key_updates", "qkd_keys_consumed",
                "degraded_handshakes"):
        print(f"  {key:20} {status.get(key)}")
    for line in budget_lines(status):
        print(line)
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("gateway", help="run a site gateway (the tunnel endpoint)")
    p.add_argument("--config", required=True, help="gateway config file (see configs/site-a.toml)")
    p.add_argument("--ready-file", help=argparse.SUPPRESS)
    p.set_defaults(handler=_cmd_gateway)
    s = sub.add_parser("status", help="show a running gateway's tunnel status")
    s.add_argument("--url", default="http://127.0.0.1:9101",
                   help="the gateway's [admin] address (default http://127.0.0.1:9101)")
    s.add_argument("--json", action="store_true", help="print the raw JSON")
    s.set_defaults(handler=_cmd_status)


__all__ = ["Gateway", "TunnelSession", "load_credentials", "register_cli"]
