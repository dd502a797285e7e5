"""One tunnel TCP connection: moves bytes between the socket and `TunnelConnection`,
arms its timer, answers its QKD requests through the ETSI 014 client and maps its events."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from gateway.runtime.app_stream import AppStream
from gateway.runtime.psk_store import PskStoreError
from gateway.runtime.transport import _nodelay, _reset_transport, read_buffer
from gateway.tunnel import events as ev
from gateway.tunnel.admission import (
    CUT_COOKIE_RETRY,
    CUT_FIRST_RECORD,
    CUT_HANDSHAKE_BYTES,
    ConnectionCookieGate,
    PendingHandshake,
    Refused,
)
from gateway.tunnel.connection import TunnelConnection
from gateway.tunnel.handshake import (
    AUTH_PKI,
    MODE_MLKEM_ONLY,
    QKD_NO_KEY,
    QKD_OK,
    QKD_UNREACHABLE,
)
from gateway.tunnel.steptimes import during, step
from gateway.tunnel.streams import StreamCode
from gateway.tunnel.wire import ErrorCode
from qkd.common.log import get_logger
from qkd.etsi014.client import KmeError, KmeNoKey, KmeUnavailable

log = get_logger("qkdgw.gateway")


if TYPE_CHECKING:
    from gateway.runtime.gateway import Gateway



class TunnelSession(asyncio.BufferedProtocol):
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
        # Responder admission (gateway/tunnel/admission.py): the pending-handshake slot this
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

    def get_buffer(self, sizehint: int) -> memoryview:
        return read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        # Copied out: the record reader keeps views of a read while it assembles.
        self.data_received(bytes(read_buffer()[:nbytes]))

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
        # Consecutive data records of one stream (a read of the tunnel socket holds
        # several) go to the application in one writelines, one system call, instead
        # of one write each; any other event first flushes the data before it, so a
        # FIN or reset never overtakes the bytes in front of it.
        run_app: AppStream | None = None
        run: list[bytes | memoryview] = []
        while (event := self.conn.next_event()) is not None:
            if type(event) is ev.StreamDataReceived:
                app = self.streams.get(event.stream_id)
                if app is None:
                    continue
                if app is not run_app:
                    if run_app is not None:
                        run_app.deliver_many(run)
                        run = []
                    run_app = app
                run.append(event.data)
                continue
            if run_app is not None:
                run_app.deliver_many(run)
                run_app, run = None, []
            self._handle(event)
        if run_app is not None:
            run_app.deliver_many(run)
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

    def _prepare_soon(self, handshake_id: int) -> None:
        """Let the handshake do what does not wait for the KME (the responder's
        signature, ML-KEM) once the KME request is on the wire, so the two overlap.
        Two loop turns: the request task's first step, then the body writer task the
        HTTP client starts, run before this (call_soon is first in, first out)."""
        def second() -> None:
            with during("ETSI 014"):
                self.conn.prepare_handshake(handshake_id, self.loop.time())
            self.process()

        self.loop.call_soon(self.loop.call_soon, second)

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
            self._prepare_soon(event.handshake_id)
        elif isinstance(event, ev.QkdKeysToFetch):
            self._spawn(self._fetch_dec_keys(event))
            self._prepare_soon(event.handshake_id)
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
            with step("etsi_enc_keys"):
                keys = await g.kme.get_enc_keys(event.peer_sae_id, event.number,
                                                event.size_bits)
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
            with step("etsi_dec_keys"):
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
            with step("etsi_status"):
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
            stored = status["stored_key_count"]
            # SKIP reports no pool level: without one, never agree that QKD is out of
            # key (that would let the peer talk this side into ML-KEM only).
            enough = stored is None or int(stored) >= event.number * per_key
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
