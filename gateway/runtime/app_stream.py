"""One local application TCP connection bridged to one tunnel stream.

Flow control end to end: the socket is only read while its stream has send window, and
the window is only re-granted once the application socket has taken the bytes, so a slow
application slows down its own stream and nothing else."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

from gateway.runtime.transport import _nodelay, _reset_transport, read_buffer
from gateway.tunnel.streams import StreamCode

if TYPE_CHECKING:
    from gateway.runtime.session import TunnelSession



class AppStream(asyncio.BufferedProtocol):
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

    def get_buffer(self, sizehint: int) -> memoryview:
        return read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        # A copy of our own (immutable bytes): the stream layer keeps views of it
        # until the records are sealed, and the shared buffer is refilled next read.
        self.data_received(bytes(read_buffer()[:nbytes]))

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
                view = memoryview(data)  # data is immutable bytes: views are safe
                self.tunnel.conn.send_stream_data(self.stream_id, view[:window])
                self.tunnel.schedule_flush()
                self._pending_out += view[window:]
            else:
                self._pending_out += data
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

    def deliver_many(self, chunks: list[bytes | memoryview]) -> None:
        """`deliver` for several chunks in order, written with one writelines."""
        if len(chunks) == 1:
            self.deliver(chunks[0])
            return
        if self.transport is None:
            self._pending_in.extend(chunks)
            return
        self.transport.writelines(chunks)
        n = sum(map(len, chunks))
        if self._writing_paused:
            self._unconsumed += n
        elif self.stream_id is not None:
            self.tunnel.conn.stream_data_consumed(self.stream_id, n)
            self.tunnel.schedule_flush()

    def window_opened(self) -> None:
        if self.stream_id is None or self._done:
            return
        if self._pending_out:
            window = self.tunnel.conn.send_window(self.stream_id)
            if window:
                # A slice of a bytearray is a new bytearray nobody else holds: one copy,
                # and safe to hand over unsealed (send_stream_data keeps views of it).
                chunk = self._pending_out[:window]
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
