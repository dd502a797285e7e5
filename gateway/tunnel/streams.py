"""Stream multiplexing with per-stream flow control (sans-I/O).

Many application connections share one tunnel. Frames travel inside protected
records, several per record where they are small::

    type (1) | stream_id (4) | length (4) | payload

OPEN carries the *service name* the opener wants; the receiving gateway alone maps it
to a host and port from its own config. Stream IDs are odd when the tunnel initiator
opens them and even for the responder, and each side's IDs only grow, so a stale or
forged ID cannot revive a finished stream.

Every stream has a receive window announced in the handshake. A sender never has more
unacknowledged bytes in flight than the window; the receiver grants more (WINDOW)
only after its application has taken the data, so a slow application slows its own
stream and no other. A peer that overruns a window breaks the protocol and the tunnel
is closed.

FIN is an authenticated end of one direction of a stream; RESET aborts the stream in
both directions with a code.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import Enum, IntEnum

from gateway.errors import GatewayError
from gateway.tunnel import events as ev
from gateway.tunnel.constants import (
    FRAME_DATA,
    FRAME_FIN,
    FRAME_OPEN,
    FRAME_RESET,
    FRAME_WINDOW,
    MAX_SERVICE_NAME,
)
from gateway.tunnel.wire import ErrorCode

FRAME_HEADER = struct.Struct(">BII")
FRAME_HEADER_LEN = FRAME_HEADER.size


class StreamCode(IntEnum):
    CANCELLED = 1
    UNKNOWN_SERVICE = 2
    CONNECT_FAILED = 3
    TUNNEL_CLOSED = 4
    LIMIT = 5
    APP_ERROR = 6


class MuxError(GatewayError):
    """The peer broke the stream protocol; fatal for the tunnel."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class StreamState(Enum):
    """One stream's half-closes, as QUIC's stream states; a closed stream is forgotten."""

    OPEN = "open"
    #: We sent FIN; the peer may still send.
    LOCAL_CLOSED = "local_closed"
    #: The peer sent FIN; we may still send.
    REMOTE_CLOSED = "remote_closed"


@dataclass
class _Stream:
    stream_id: int
    service: str
    send_window: int
    recv_window: int
    unacked_consumed: int = 0
    state: StreamState = StreamState.OPEN

    @property
    def local_fin(self) -> bool:
        return self.state is StreamState.LOCAL_CLOSED

    @property
    def remote_fin(self) -> bool:
        return self.state is StreamState.REMOTE_CLOSED


@dataclass
class MuxSettings:
    recv_window: int = 1 << 20
    max_streams: int = 1024


@dataclass
class StreamMux:
    """One side of the stream layer. Frames out via `frames_to_send`, events via `events`."""

    is_initiator: bool
    settings: MuxSettings = field(default_factory=MuxSettings)
    peer_recv_window: int = 1 << 20
    events: list[ev.Event] = field(default_factory=list)
    _streams: dict[int, _Stream] = field(default_factory=dict)
    # Frames as (header, body): a DATA body is only copied once, into the record.
    _out: list[tuple[bytes, bytes | bytearray | memoryview]] = field(default_factory=list)
    _next_local_id: int = 0
    _max_peer_id: int = 0

    def __post_init__(self) -> None:
        self._next_local_id = 1 if self.is_initiator else 2

    # -- local actions --------------------------------------------------------------

    def open_stream(self, service: str) -> int:
        raw = service.encode("utf-8")
        if not raw or len(raw) > MAX_SERVICE_NAME:
            raise ValueError("service name must be 1..64 bytes")
        if len(self._streams) >= self.settings.max_streams:
            raise ValueError("too many open streams")
        sid = self._next_local_id
        self._next_local_id += 2
        self._streams[sid] = _Stream(sid, service, self.peer_recv_window,
                                     self.settings.recv_window)
        self._out.append((FRAME_HEADER.pack(FRAME_OPEN, sid, len(raw)), raw))
        return sid

    def send_window(self, stream_id: int) -> int:
        s = self._streams.get(stream_id)
        return 0 if s is None or s.local_fin else s.send_window

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> None:
        s = self._streams.get(stream_id)
        if s is None or s.local_fin:
            raise ValueError(f"stream {stream_id} is not open for sending")
        if len(data) > s.send_window:
            raise ValueError("data exceeds the stream's send window")
        s.send_window -= len(data)
        self._out.append((FRAME_HEADER.pack(FRAME_DATA, stream_id, len(data)), data))

    def send_fin(self, stream_id: int) -> None:
        s = self._streams.get(stream_id)
        if s is None or s.local_fin:
            return
        self._out.append((FRAME_HEADER.pack(FRAME_FIN, stream_id, 0), b""))
        if s.remote_fin:
            del self._streams[stream_id]
        else:
            s.state = StreamState.LOCAL_CLOSED

    def reset_stream(self, stream_id: int, code: StreamCode, reason: str = "") -> None:
        if self._streams.pop(stream_id, None) is None:
            return
        raw = reason.encode("utf-8")[:200]
        payload = struct.pack(">H", int(code)) + raw
        self._out.append((FRAME_HEADER.pack(FRAME_RESET, stream_id, len(payload)), payload))

    def data_consumed(self, stream_id: int, n: int) -> None:
        """The application took n bytes of this stream: grant the peer more window.

        Grants are batched to a quarter of the window so small reads do not turn into
        a WINDOW frame each."""
        s = self._streams.get(stream_id)
        if s is None or s.remote_fin:
            return
        s.unacked_consumed += n
        if s.unacked_consumed >= self.settings.recv_window // 4:
            grant, s.unacked_consumed = s.unacked_consumed, 0
            s.recv_window += grant
            self._out.append((FRAME_HEADER.pack(FRAME_WINDOW, stream_id, 4),
                              struct.pack(">I", grant)))

    def abort_all(self, code: StreamCode, reason: str) -> None:
        """The tunnel is gone: every open stream ends with a reset, none silently."""
        for sid in list(self._streams):
            del self._streams[sid]
            self.events.append(ev.StreamReset(sid, int(code), reason))

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def stream_ids(self) -> list[int]:
        return list(self._streams)

    def frames_to_send(self) -> list[tuple[bytes, bytes | bytearray | memoryview]]:
        out, self._out = self._out, []
        return out

    # -- peer frames ------------------------------------------------------------------

    def receive_payload(self, payload: bytes | memoryview) -> None:
        """Handle the frames of one decrypted record."""
        pos, end = 0, len(payload)
        if end == 0:
            raise MuxError(ErrorCode.DECODE_ERROR, "empty stream record")
        mv = memoryview(payload)
        while pos < end:
            if end - pos < FRAME_HEADER_LEN:
                raise MuxError(ErrorCode.DECODE_ERROR, "truncated stream frame header")
            ftype, sid, length = FRAME_HEADER.unpack_from(payload, pos)
            pos += FRAME_HEADER_LEN
            if length > end - pos:
                raise MuxError(ErrorCode.DECODE_ERROR, "stream frame longer than its record")
            body = mv[pos : pos + length]
            pos += length
            self._frame(ftype, sid, body)

    def _is_peer_id(self, sid: int) -> bool:
        return sid != 0 and (sid % 2 == 0) == self.is_initiator

    def _frame(self, ftype: int, sid: int, body: memoryview) -> None:
        if ftype == FRAME_OPEN:
            self._on_open(sid, bytes(body))
            return
        if ftype not in (FRAME_DATA, FRAME_WINDOW, FRAME_FIN, FRAME_RESET):
            raise MuxError(ErrorCode.DECODE_ERROR, f"unknown stream frame type {ftype}")
        s = self._streams.get(sid)
        if s is None:
            # Frames for a stream that ended locally may still be in flight; frames for
            # an ID that was never opened are a protocol violation.
            known = sid < self._next_local_id if not self._is_peer_id(sid) else (
                sid <= self._max_peer_id)
            if sid == 0 or not known:
                raise MuxError(ErrorCode.PROTOCOL_ERROR, f"frame for unknown stream {sid}")
            return
        if ftype == FRAME_DATA:
            n = len(body)
            if s.remote_fin:
                raise MuxError(ErrorCode.PROTOCOL_ERROR, f"data after FIN on stream {sid}")
            if n > s.recv_window:
                raise MuxError(ErrorCode.FLOW_CONTROL, f"peer overran the window of stream {sid}")
            s.recv_window -= n
            if n:
                # A view into the decrypted record, which nothing writes to again.
                self.events.append(ev.StreamDataReceived(sid, body))
        elif ftype == FRAME_WINDOW:
            if len(body) != 4:
                raise MuxError(ErrorCode.DECODE_ERROR, "WINDOW frame must be 4 bytes")
            (grant,) = struct.unpack(">I", body)
            if grant == 0 or s.send_window + grant > 1 << 31:
                raise MuxError(ErrorCode.FLOW_CONTROL, f"bad window grant on stream {sid}")
            s.send_window += grant
            self.events.append(ev.StreamWindowOpened(sid))
        elif ftype == FRAME_FIN:
            if len(body) != 0:
                raise MuxError(ErrorCode.DECODE_ERROR, "FIN frame must be empty")
            if s.remote_fin:
                raise MuxError(ErrorCode.PROTOCOL_ERROR, f"second FIN on stream {sid}")
            self.events.append(ev.StreamEnded(sid))
            if s.local_fin:
                del self._streams[sid]
            else:
                s.state = StreamState.REMOTE_CLOSED
        else:
            if len(body) < 2:
                raise MuxError(ErrorCode.DECODE_ERROR, "RESET frame too short")
            (code,) = struct.unpack(">H", body[:2])
            reason = bytes(body[2:]).decode("utf-8", "replace")
            del self._streams[sid]
            self.events.append(ev.StreamReset(sid, code, reason))

    def _on_open(self, sid: int, raw: bytes) -> None:
        if not self._is_peer_id(sid) or sid <= self._max_peer_id:
            raise MuxError(ErrorCode.PROTOCOL_ERROR, f"peer opened invalid stream id {sid}")
        if not raw or len(raw) > MAX_SERVICE_NAME:
            raise MuxError(ErrorCode.DECODE_ERROR, "service name must be 1..64 bytes")
        try:
            service = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MuxError(ErrorCode.DECODE_ERROR, "service name is not UTF-8") from None
        if not service.isprintable():
            raise MuxError(ErrorCode.DECODE_ERROR, "service name has control characters")
        self._max_peer_id = sid
        if len(self._streams) >= self.settings.max_streams:
            self._streams[sid] = _Stream(sid, service, 0, 0)
            self.reset_stream(sid, StreamCode.LIMIT, "too many streams")
            return
        self._streams[sid] = _Stream(sid, service, self.peer_recv_window,
                                     self.settings.recv_window)
        self.events.append(ev.StreamOpened(sid, service))
