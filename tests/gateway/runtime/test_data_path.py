"""The runtime's data path without sockets: batched delivery keeps the stream order,
and reads through the shared buffer are copied out before the next read."""

from __future__ import annotations

from collections import deque
from typing import Any

from gateway.runtime.app_stream import AppStream
from gateway.runtime.session import TunnelSession
from gateway.runtime.transport import READ_SIZE, read_buffer
from gateway.tunnel import events as ev


class FakeTransport:
    def __init__(self, name: str, log: list[tuple[str, str, bytes]]) -> None:
        self.name, self.log = name, log

    def get_extra_info(self, key: str) -> Any:
        return None

    def write(self, data: bytes | memoryview) -> None:
        self.log.append((self.name, "write", bytes(data)))

    def writelines(self, chunks: list[bytes | memoryview]) -> None:
        self.log.append((self.name, "writelines", b"|".join(bytes(c) for c in chunks)))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.log.append((self.name, "eof", b""))

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self.log.append((self.name, "pause", b""))

    def resume_reading(self) -> None:
        pass


class FakeConn:
    def __init__(self, events: list[ev.Event]) -> None:
        self.events = deque(events)
        self.consumed: list[tuple[int, int]] = []
        self.sent: list[tuple[int, bytes]] = []
        self.closed = False

    def next_event(self) -> ev.Event | None:
        return self.events.popleft() if self.events else None

    def data_to_send(self) -> list[bytes]:
        return []

    def get_timer(self) -> float | None:
        return None

    def stream_data_consumed(self, sid: int, n: int) -> None:
        self.consumed.append((sid, n))

    def send_window(self, sid: int) -> int:
        return 1 << 30

    def send_stream_data(self, sid: int, data: Any) -> None:
        self.sent.append((sid, data))


def _session(events: list[ev.Event], log: list[tuple[str, str, bytes]]) -> TunnelSession:
    s = TunnelSession.__new__(TunnelSession)
    s.conn = FakeConn(events)  # type: ignore[assignment]
    s.transport = FakeTransport("tunnel", log)  # type: ignore[assignment]
    s.streams = {}
    s._timer_at = None
    s._flush_scheduled = True  # schedule_flush is a no-op here
    s._psk_failed = False
    s.gateway = None  # type: ignore[assignment]
    return s


def test_consecutive_data_is_one_write_and_never_overtaken() -> None:
    log: list[tuple[str, str, bytes]] = []
    events: list[ev.Event] = [
        ev.StreamDataReceived(1, b"a"), ev.StreamDataReceived(1, memoryview(b"bb")),
        ev.StreamDataReceived(3, b"c"), ev.StreamDataReceived(1, b"d"),
        ev.StreamDataReceived(1, b"e"), ev.StreamEnded(1), ev.StreamDataReceived(3, b"f"),
        ev.StreamDataReceived(9, b"no such stream"), ev.StreamDataReceived(3, b"g")]
    session = _session(events, log)
    for sid in (1, 3):
        app = AppStream(session, sid)
        app.connection_made(FakeTransport(f"app{sid}", log))  # type: ignore[arg-type]
        session.streams[sid] = app
    session.process()
    assert log == [("app1", "writelines", b"a|bb"), ("app3", "write", b"c"),
                   ("app1", "writelines", b"d|e"), ("app1", "eof", b""),
                   ("app3", "writelines", b"f|g")]
    conn = session.conn
    assert isinstance(conn, FakeConn)
    # every delivered byte is granted back to the peer, per stream
    assert sum(n for sid, n in conn.consumed if sid == 1) == 5
    assert sum(n for sid, n in conn.consumed if sid == 3) == 3


def test_paused_application_holds_back_the_window_grant() -> None:
    log: list[tuple[str, str, bytes]] = []
    session = _session([ev.StreamDataReceived(1, b"xy"), ev.StreamDataReceived(1, b"z")],
                       log)
    app = AppStream(session, 1)
    app.connection_made(FakeTransport("app1", log))  # type: ignore[arg-type]
    session.streams[1] = app
    app.pause_writing()
    session.process()
    conn = session.conn
    assert isinstance(conn, FakeConn)
    assert conn.consumed == []
    app.resume_writing()
    assert conn.consumed == [(1, 3)]


def test_reads_through_the_shared_buffer_are_copied_out() -> None:
    log: list[tuple[str, str, bytes]] = []
    session = _session([], log)
    app = AppStream(session, 1)
    app.connection_made(FakeTransport("app1", log))  # type: ignore[arg-type]
    buf = app.get_buffer(-1)
    assert len(buf) == READ_SIZE and buf.obj is read_buffer().obj
    buf[:5] = b"hello"
    app.buffer_updated(5)
    buf[:5] = b"XXXXX"  # the loop's next read into the same buffer
    conn = session.conn
    assert isinstance(conn, FakeConn)
    (sid, data), = conn.sent
    assert sid == 1 and bytes(data) == b"hello"
