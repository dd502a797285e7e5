"""Helpers shared by the end-to-end tests."""

from __future__ import annotations

import socket


def app_exchange(port: int, payload: bytes, timeout: float = 15.0) -> bytes:
    """What an application at site A sees: the sink's answer, or b"" on reset/close.

    A gateway that refuses the stream resets the connection; depending on timing the
    reset reaches the client during connect, send or receive."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(4096):
                out += chunk
            return out
    except (ConnectionResetError, BrokenPipeError):
        return b""
