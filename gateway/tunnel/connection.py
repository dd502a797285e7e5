"""One tunnel connection between two gateways, sans-I/O.

Ties the handshake, the record layer and the stream multiplexer together, in the
manner of aioquic's QuicConnection: feed it what the socket read (`receive_data`) and
the time, then collect bytes to write (`data_to_send`), events (`next_event`) and the
next deadline (`get_timer` / `handle_timer`). Nothing here touches a socket, a clock
or the KME.

Lifecycle: the initiator's `start()` begins the PKI handshake; application streams
exist only after `TunnelReady`. The initiator re-handshakes on a timer inside the live
tunnel (fresh ML-KEM and fresh QKD key, previous chain key as salt) without disturbing
streams; the responder closes a tunnel whose keys outlive the agreed age. Either side
updates its send key when the record or byte count says so. `close()` sends an
authenticated close; losing the transport without one is reported as truncation and
every open stream is reset, never quietly ended.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import struct
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from gateway.tunnel import events as ev
from gateway.tunnel.handshake import (
    AUTH_CHAIN,
    AUTH_PKI,
    AUTH_PSK,
    HANDSHAKE_DONE,
    MSG_ALERT,
    MSG_CLIENT_HELLO,
    QKD_NO_KEY,
    ClientHello,
    Handshake,
    HandshakeError,
    HandshakeParams,
    HandshakeResult,
    KeyLogEntry,
    PskKey,
    decode_alert,
    encode_alert,
    encode_hello_retry,
    message_type,
)
from gateway.tunnel.record import (
    INNER_CLOSE,
    INNER_HANDSHAKE,
    INNER_STREAM,
    LATE_PLAINTEXT,
    MAX_PAYLOAD,
    RecordError,
    RecordLayer,
    RecordLimits,
    RecordReader,
)
from gateway.tunnel.streams import (
    FRAME_HEADER_LEN,
    MuxError,
    MuxSettings,
    StreamCode,
    StreamMux,
)
from gateway.tunnel.wire import DecodeError, ErrorCode

MAX_STREAM_CHUNK = MAX_PAYLOAD - FRAME_HEADER_LEN


class ConnectionState(enum.Enum):
    """Where a tunnel connection is; the only state the connection keeps besides its parts."""

    HANDSHAKING = "handshaking"  # no session yet: the first handshake is under way
    ESTABLISHED = "established"  # a session carries streams (rekeys happen inside it)
    CLOSED = "closed"  # terminated; every call is ignored from here on


class CookieGate(Protocol):
    """Admission control for a responder (gateway/tunnel/admission.py): when it asks for a
    cookie, a ClientHello without a valid one gets a stateless HelloRetryRequest and
    costs no KME request, no encapsulation and no signature."""

    def cookie_required(self, now: float) -> bool: ...
    def make_cookie(self, hello_digest: bytes, now: float) -> bytes: ...
    def cookie_valid(self, cookie: bytes, hello_digest: bytes, now: float) -> bool: ...


@dataclass(frozen=True)
class ConnectionSettings:
    handshake_timeout: float = 15.0
    rekey_interval: float = 600.0
    # The responder closes a tunnel whose session keys are older than this, so an
    # initiator that stops re-keying cannot keep old keys alive.
    max_session_age_factor: float = 3.0
    record_limits: RecordLimits = field(default_factory=RecordLimits)
    mux: MuxSettings = field(default_factory=MuxSettings)

    @property
    def max_session_age(self) -> float:
        return self.rekey_interval * self.max_session_age_factor + self.handshake_timeout


@dataclass
class ConnectionStats:
    handshakes: int = 0
    rekeys: int = 0
    key_updates: int = 0
    qkd_keys_consumed: int = 0
    records_sent: int = 0
    records_received: int = 0
    degraded_handshakes: int = 0
    cookie_retries: int = 0


class TunnelConnection:
    def __init__(
        self,
        *,
        initiator: bool,
        params: HandshakeParams,
        settings: ConnectionSettings | None = None,
        now: float = 0.0,
        rng: Callable[[int], bytes] = os.urandom,
        keylog: Callable[[KeyLogEntry], None] | None = None,
        wallclock: Callable[[], datetime] | None = None,
        cookie_gate: CookieGate | None = None,
    ) -> None:
        self.initiator = initiator
        self.params = params
        self.settings = settings or ConnectionSettings()
        self.stats = ConnectionStats()
        self._rng = rng
        self._keylog = keylog
        self._wallclock = wallclock or (lambda: datetime.now(UTC))
        self._records = RecordLayer(self.settings.record_limits)
        self._reader = RecordReader()
        self._events: deque[ev.Event] = deque()
        self._mux: StreamMux | None = None
        self._out: list[bytes | bytearray] = []
        self._handshake: Handshake | None = None
        self._handshake_seq = 0
        self._handshake_deadline: float | None = None
        self._rekey_at: float | None = None
        self._session_expires: float | None = None
        self._result: HandshakeResult | None = None
        self._epoch = -1
        self._state = ConnectionState.HANDSHAKING
        self._installed_handshake = 0
        self._schedule_after_handshake = False
        self._cookie_gate = cookie_gate
        self._cookie_sent = False
        self._offered_psk: PskKey | None = None
        if not initiator:
            self._handshake = self._new_handshake(0, AUTH_PKI, None)
            self._handshake_deadline = now + self.settings.handshake_timeout

    def __repr__(self) -> str:
        role = "initiator" if self.initiator else "responder"
        return (f"TunnelConnection({role}, peer={self.params.peer_identity!r}, "
                f"epoch={self._epoch}, state={self._state.value})")

    # -- properties -------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def ready(self) -> bool:
        return self._state is ConnectionState.ESTABLISHED

    @property
    def closed(self) -> bool:
        return self._state is ConnectionState.CLOSED

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def session(self) -> HandshakeResult | None:
        return self._result

    @property
    def next_rekey_at(self) -> float | None:
        return self._rekey_at

    @property
    def open_streams(self) -> int:
        return 0 if self._mux is None else self._mux.open_streams

    # -- driving ------------------------------------------------------------------------

    def start(self, now: float) -> None:
        if not self.initiator or self._handshake is not None or self._epoch >= 0:
            raise RuntimeError("start() is for a fresh initiator connection")
        book = self.params.psk_book
        self._offered_psk = book.offer() if book is not None else None
        auth = AUTH_PSK if self._offered_psk is not None else AUTH_PKI
        self._handshake = self._new_handshake(0, auth, None, self._offered_psk)
        self._handshake_deadline = now + self.settings.handshake_timeout
        self._run(self._handshake.start)

    @property
    def offered_psk_epoch(self) -> int:
        """Initiator: the PSK epoch this connection authenticates with (0: PKI)."""
        return self._offered_psk.epoch if self._offered_psk is not None else 0

    def _new_handshake(self, epoch: int, auth: str, salt: bytes | None,
                       psk: PskKey | None = None) -> Handshake:
        self._handshake_seq += 1
        return Handshake(initiator=self.initiator, params=self.params, epoch=epoch, auth=auth,
                         salt=salt, handshake_id=self._handshake_seq, rng=self._rng,
                         keylog=self._keylog, psk=psk)

    def receive_data(self, data: bytes, now: float) -> None:
        if self.closed:
            return
        try:
            self._reader.feed(data)
            while not self.closed:
                record = self._reader.next_record()
                if record is None:
                    break
                rtype, flags, header, body = record
                inner, payload = self._records.open(rtype, flags, header, body)
                self.stats.records_received += 1
                self._on_record(inner, payload, now)
        except (RecordError, HandshakeError, MuxError) as exc:
            self._fatal(exc.code, exc.reason)
        except DecodeError as exc:
            self._fatal(ErrorCode.DECODE_ERROR, str(exc))
        except Exception as exc:
            # Whatever a layer did not turn into its own error still ends this
            # connection with an alert, never a traceback up the event loop; the
            # UnexpectedError event makes it loud (logged with its type and place,
            # counted), since it is a bug here or a parser letting input through.
            self._unexpected("receive", exc)
        self._after_activity(now)

    def _unexpected(self, where: str, exc: Exception) -> None:
        frames = traceback.extract_tb(exc.__traceback__)
        location = (f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno} "
                    f"in {frames[-1].name}" if frames else "?")
        self._events.append(ev.UnexpectedError(where, type(exc).__name__,
                                               " ".join(str(exc).split())[:200], location))
        self._fatal(ErrorCode.INTERNAL_ERROR,
                    f"unexpected {type(exc).__name__} while processing the peer's input")

    def connection_lost(self, now: float) -> None:
        """The transport ended (EOF or error). Without an authenticated close first,
        that is a truncation: streams are reset, not ended."""
        if self.closed:
            return
        if self._reader.buffered:
            reason = "transport closed in the middle of a record"
        else:
            reason = "transport closed without an authenticated close"
        self._terminate(ErrorCode.TRUNCATED, reason, clean=False, by_peer=True)

    def get_timer(self) -> float | None:
        if self.closed:
            return None
        times = [t for t in (self._handshake_deadline, self._rekey_at, self._session_expires)
                 if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        if self.closed:
            return
        if self._handshake_deadline is not None and now >= self._handshake_deadline:
            self._fatal(ErrorCode.TIMEOUT, "handshake did not complete in time")
            return
        if self._session_expires is not None and now >= self._session_expires:
            self._fatal(ErrorCode.TIMEOUT, "session keys outlived their maximum age")
            return
        if self._rekey_at is not None and now >= self._rekey_at:
            self._start_rekey(now)

    def next_event(self) -> ev.Event | None:
        return self._events.popleft() if self._events else None

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._out)

    def data_to_send(self) -> list[bytes | bytearray]:
        try:
            self._flush_frames()
        except RecordError as exc:
            self._fatal(exc.code, exc.reason)
        out, self._out = self._out, []
        return out

    # -- QKD answers --------------------------------------------------------------------

    def supply_qkd_keys(self, handshake_id: int, keys: Sequence[tuple[str, bytes]],
                        now: float) -> None:
        hs = self._handshake
        if self.closed or hs is None or hs.handshake_id != handshake_id:
            return
        self._run(lambda: hs.supply_qkd_keys(keys, self._wallclock()))
        self._after_activity(now)

    def prepare_handshake(self, handshake_id: int, now: float) -> None:
        """Optional, once this side's KME request (QkdKeysRequested / QkdKeysToFetch)
        is on its way: the handshake does the work that does not wait for the answer
        (`Handshake.prepare`), so the KME's latency and this CPU time overlap. Nothing
        is sent before the keys arrive."""
        hs = self._handshake
        if self.closed or hs is None or hs.handshake_id != handshake_id:
            return
        self._run(lambda: hs.prepare(self._wallclock()))
        self._after_activity(now)

    def qkd_keys_unavailable(self, handshake_id: int, reason: str, now: float,
                             status: str = QKD_NO_KEY) -> None:
        """This side's own KME has no key ("no-key") or cannot be reached
        ("unreachable"); only the initiator may then go on without QKD."""
        hs = self._handshake
        if self.closed or hs is None or hs.handshake_id != handshake_id:
            return
        self._run(lambda: hs.qkd_keys_unavailable(reason, status))
        self._after_activity(now)

    def qkd_keys_rejected(self, handshake_id: int, reason: str, now: float) -> None:
        """The KME refused (unknown, replayed or delivered key ID; a request it will not
        serve), or the gateway's key-ID memory saw the ID before: a hard failure."""
        hs = self._handshake
        if self.closed or hs is None or hs.handshake_id != handshake_id:
            return
        self._run(lambda: hs.qkd_keys_rejected(reason))
        self._after_activity(now)

    def local_qkd_status(self, handshake_id: int, status: str, now: float) -> None:
        """Answer to QkdStatusToCheck: "ok" (this side's KME has keys for the peer),
        "no-key" or "unreachable"."""
        hs = self._handshake
        if self.closed or hs is None or hs.handshake_id != handshake_id:
            return
        self._run(lambda: hs.local_qkd_status(status))
        self._after_activity(now)

    # -- streams ------------------------------------------------------------------------

    def _require_mux(self) -> StreamMux:
        if self._mux is None or not self.ready:
            raise RuntimeError("the tunnel is not ready for application data")
        return self._mux

    def open_stream(self, service: str) -> int:
        return self._require_mux().open_stream(service)

    def send_window(self, stream_id: int) -> int:
        return 0 if self._mux is None or self.closed else self._mux.send_window(stream_id)

    def send_stream_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> None:
        """Queue `data` for the stream. It is read when the records are sealed (at the
        next `data_to_send`), so the caller must not change it until then; chunks are
        views, not copies: sealing copies each byte once, into the record."""
        mux = self._require_mux()
        if len(data) <= MAX_STREAM_CHUNK:
            mux.send_data(stream_id, data)
            return
        mv = memoryview(data)
        for off in range(0, len(mv), MAX_STREAM_CHUNK):
            mux.send_data(stream_id, mv[off : off + MAX_STREAM_CHUNK])

    def end_stream(self, stream_id: int) -> None:
        if self._mux is not None and not self.closed:
            self._mux.send_fin(stream_id)

    def reset_stream(self, stream_id: int, code: StreamCode, reason: str = "") -> None:
        if self._mux is not None and not self.closed:
            self._mux.reset_stream(stream_id, code, reason)

    def stream_data_consumed(self, stream_id: int, n: int) -> None:
        if self._mux is not None and not self.closed:
            self._mux.data_consumed(stream_id, n)

    def close(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Authenticated close: the peer can tell it from a cut connection."""
        if self.closed:
            return
        if self._records.send_ready:
            self._flush_frames()
            payload = struct.pack(">H", int(code)) + reason.encode("utf-8")[:200]
            self._out.append(self._records.seal(INNER_CLOSE, payload))
        else:
            self._out.append(self._records.seal_plaintext_handshake(
                encode_alert(int(code), reason)))
        self._terminate(code, reason or "closed locally", clean=code == ErrorCode.NO_ERROR,
                        by_peer=False)

    # -- internals ------------------------------------------------------------------------

    def _run(self, action: Callable[[], None]) -> None:
        try:
            action()
            self._drain_handshake()
        except (HandshakeError, RecordError) as exc:
            self._fatal(exc.code, exc.reason)
        except Exception as exc:
            self._unexpected("handshake", exc)

    def _on_record(self, inner: int, payload: bytes | memoryview, now: float) -> None:
        if inner == INNER_HANDSHAKE:
            self._on_handshake_message(bytes(payload), now)
        elif inner == LATE_PLAINTEXT:
            # The initiator has keys, the responder refused its last flight: the plaintext
            # Alert is the only thing that may come this way.
            if message_type(bytes(payload)) != MSG_ALERT:
                raise RecordError(ErrorCode.PROTOCOL_ERROR,
                                  "plaintext record received after keys were established")
            self._on_alert(bytes(payload), late=True)
        elif inner == INNER_STREAM:
            if self._mux is None or self._state is ConnectionState.HANDSHAKING:
                raise RecordError(ErrorCode.PROTOCOL_ERROR, "stream data before the handshake")
            self._mux.receive_payload(payload)
            self._events.extend(self._mux.events)
            self._mux.events.clear()
        else:
            if len(payload) < 2:
                raise RecordError(ErrorCode.DECODE_ERROR, "close record too short")
            (code,) = struct.unpack(">H", payload[:2])
            reason = bytes(payload[2:]).decode("utf-8", "replace")
            self._terminate(code, reason or "closed by peer",
                            clean=code == ErrorCode.NO_ERROR, by_peer=True)

    def _on_handshake_message(self, msg: bytes, now: float) -> None:
        mtype = message_type(msg)
        if mtype == MSG_ALERT:
            if self._records.recv_ready:
                raise RecordError(ErrorCode.PROTOCOL_ERROR, "alert inside the tunnel")
            self._on_alert(msg)
            return
        if (mtype == MSG_CLIENT_HELLO and not self.initiator
                and self._state is ConnectionState.HANDSHAKING
                and self._cookie_gate is not None and not self._admit(msg, now)):
            return
        hs = self._handshake
        if hs is None:
            if not self.initiator and self.ready and mtype == MSG_CLIENT_HELLO:
                assert self._result is not None
                hs = self._handshake = self._new_handshake(
                    self._epoch + 1, AUTH_CHAIN, self._result.keys.chain_key)
                self._handshake_deadline = now + self.settings.handshake_timeout
            else:
                raise HandshakeError(ErrorCode.PROTOCOL_ERROR, "unexpected handshake message")
        hs.receive(msg, self._wallclock())
        self._drain_handshake()

    def _on_alert(self, msg: bytes, late: bool = False) -> None:
        code, reason = decode_alert(msg)
        # Late, the responder has already proved the PSK with its Finished: a refusal of
        # it then is forged and must not count towards the PSK fallback.
        if code == ErrorCode.UNKNOWN_PSK and self._offered_psk is not None and not late:
            self._events.append(ev.PskRejected(self._offered_psk.epoch))
        self._terminate(code, f"peer aborted the handshake: {reason}", clean=False,
                        by_peer=True)

    def _admit(self, msg: bytes, now: float) -> bool:
        """Cookie check before any expensive work; False: a HelloRetryRequest went out
        and nothing of this hello is kept."""
        gate = self._cookie_gate
        assert gate is not None
        if not gate.cookie_required(now):
            return True
        hello = ClientHello.decode(msg)
        digest = hello.digest_without_cookie()
        if hello.cookie and gate.cookie_valid(hello.cookie, digest, now):
            return True
        if self._cookie_sent:
            raise HandshakeError(ErrorCode.ACCESS_DENIED,
                                 "ClientHello without a valid cookie after a HelloRetryRequest")
        self._cookie_sent = True
        self.stats.cookie_retries += 1
        self._out.append(self._records.seal_plaintext_handshake(
            encode_hello_retry(gate.make_cookie(digest, now))))
        return False

    def _drain_handshake(self) -> None:
        hs = self._handshake
        if hs is None:
            return
        self._events.extend(hs.events)
        hs.events.clear()
        result_new = hs.result is not None and self._installed_handshake != hs.handshake_id
        for msg in hs.outgoing:
            self._out.append(self._seal_handshake(msg))
        hs.outgoing.clear()
        if result_new:
            self._install(hs)
        if hs.complete:
            self._complete(hs)

    def _seal_handshake(self, msg: bytes) -> bytes | bytearray:
        if self._records.send_ready:
            return self._records.seal(INNER_HANDSHAKE, msg)
        return self._records.seal_plaintext_handshake(msg)

    def _install(self, hs: Handshake) -> None:
        """Switch to the new session keys at the exact point both sides agree on."""
        assert hs.result is not None
        self._installed_handshake = hs.handshake_id
        keys = hs.result.keys
        if self.initiator:
            self._records.install_send(keys.i2r_traffic)
            self._records.install_recv(keys.r2i_traffic)
        else:
            self._records.install_recv(keys.i2r_traffic)
            self._records.install_send(keys.r2i_traffic)
            self._out.append(self._records.seal(INNER_HANDSHAKE, HANDSHAKE_DONE))
        # The record layer owns the traffic secrets from here on (and ratchets them on
        # key updates); the session keeps only the chain key for the next re-handshake.
        # Kept here, the generation-0 secrets would open every generation's records.
        hs.result = self._forget_traffic_secrets(hs.result)

    @staticmethod
    def _forget_traffic_secrets(result: HandshakeResult) -> HandshakeResult:
        return dataclasses.replace(result, keys=dataclasses.replace(
            result.keys, i2r_traffic=b"", r2i_traffic=b"", next_psk=b""))

    def _complete(self, hs: Handshake) -> None:
        result = hs.result
        assert result is not None
        rekey = self._result is not None
        self._result = result
        self._epoch = result.epoch
        self._handshake = None
        self._handshake_deadline = None
        self.stats.handshakes += 1
        self.stats.qkd_keys_consumed += len(result.qkd_key_ids)
        if rekey:
            self.stats.rekeys += 1
        if result.mode != "hybrid":
            self.stats.degraded_handshakes += 1
        self._events.append(ev.HandshakeCompleted(
            epoch=result.epoch, peer_identity=result.peer_identity, auth=result.auth,
            mode=result.mode, kem=result.kem, qkd_key_ids=result.qkd_key_ids, rekey=rekey,
            psk_epoch=result.psk_epoch, its_mac=result.its_mac,
            qkd_status=result.qkd_status, peer_qkd_status=result.peer_qkd_status))
        if self._state is ConnectionState.HANDSHAKING:
            self._state = ConnectionState.ESTABLISHED
            self._mux = StreamMux(self.initiator, self.settings.mux, result.peer_stream_window)
            self._events.append(ev.TunnelReady())
        self._schedule_after_handshake = True

    def _after_activity(self, now: float) -> None:
        if self._schedule_after_handshake:
            self._schedule_after_handshake = False
            if self.initiator:
                self._rekey_at = now + self.settings.rekey_interval
            else:
                self._session_expires = now + self.settings.max_session_age

    def _start_rekey(self, now: float) -> None:
        assert self._result is not None
        self._rekey_at = None
        self._handshake = self._new_handshake(self._epoch + 1, AUTH_CHAIN,
                                              self._result.keys.chain_key)
        self._handshake_deadline = now + self.settings.handshake_timeout
        self._run(self._handshake.start)
        self._after_activity(now)

    def _flush_frames(self) -> None:
        if self._mux is None or self.closed:
            return
        frames = self._mux.frames_to_send()
        if not frames:
            return
        parts: list[bytes] = []
        size = 0
        for header, body in frames:
            n = len(header) + len(body)
            if size + n > MAX_PAYLOAD and parts:
                self._seal_stream(parts)
                parts, size = [], 0
            parts.append(header)
            if body:
                parts.append(body)
            size += n
        if parts:
            self._seal_stream(parts)

    def _seal_stream(self, parts: list[bytes]) -> None:
        self._out.append(self._records.seal_parts(INNER_STREAM, parts))
        self.stats.records_sent += 1
        # A re-handshake in flight will replace the keys anyway; updating now could
        # collide with the peer's expectation of the handshake's key phase flip.
        if self._records.send_update_due() and self._handshake is None:
            self._records.update_send_key()
            self.stats.key_updates += 1
            self._events.append(ev.KeyUpdated("send", self._records.send_generation))

    def _fatal(self, code: ErrorCode, reason: str) -> None:
        if self.closed:
            return
        hs = self._handshake
        if hs is not None:
            # A failing handshake's requests are void, but what it had to report about
            # this side (its own certificate refused) still goes to the log.
            self._events.extend(e for e in hs.events if isinstance(e, ev.OwnCertificateRefused))
            hs.events.clear()
        try:
            if self._records.send_ready:
                payload = struct.pack(">H", int(code)) + reason.encode("utf-8")[:200]
                self._out.append(self._records.seal(INNER_CLOSE, payload))
            else:
                self._out.append(self._records.seal_plaintext_handshake(
                    encode_alert(int(code), reason)))
        except RecordError:
            pass  # the send key is spent: the peer learns of the close from the TCP FIN
        self._terminate(code, reason, clean=False, by_peer=False)

    def _terminate(self, code: int, reason: str, *, clean: bool, by_peer: bool) -> None:
        self._state = ConnectionState.CLOSED
        self._handshake = None
        self._records.erase()
        if self._mux is not None:
            self._mux.abort_all(StreamCode.TUNNEL_CLOSED, reason)
            self._events.extend(self._mux.events)
            self._mux.events.clear()
        self._events.append(ev.ConnectionTerminated(int(code), reason, clean, by_peer))
