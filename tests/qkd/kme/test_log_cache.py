"""configure_logging(cache=True), as a KME process sets it up: loggers are bound once
and keep writing one line per event, the secret-field filter still applied."""

from __future__ import annotations

import io
import json

import structlog

from qkd.common.log import configure_logging, get_logger


def test_cached_logger_keeps_writing_and_redacting() -> None:
    out = io.StringIO()
    try:
        configure_logging("info", "json", stream=out, process="kme", cache=True)
        log = get_logger("test.kme.cached")
        for i in range(3):
            log.info("keys_delivered", count=i, key_ids=[f"id-{i}"], shared_secret="s3")
        lines = [json.loads(x) for x in out.getvalue().splitlines()]
        assert [ln["count"] for ln in lines] == [0, 1, 2]
        assert all(ln["shared_secret"] == "<redacted>" and ln["process"] == "kme"
                   for ln in lines)
        assert "s3" not in out.getvalue()
        # Bound once: a later configure does not reach it (why only a process that
        # configures once, first thing, asks for the cache).
        other = io.StringIO()
        configure_logging("info", "json", stream=other)
        log.info("after")
        assert "after" in out.getvalue() and not other.getvalue()
    finally:
        structlog.reset_defaults()


def test_uncached_logger_follows_reconfiguration() -> None:
    """The control: without the cache (the default) the same logger writes where the
    newest configuration says."""
    first, second = io.StringIO(), io.StringIO()
    try:
        configure_logging("info", "json", stream=first)
        log = get_logger("test.kme.uncached")
        log.info("one")
        configure_logging("info", "json", stream=second)
        log.info("two")
        assert "one" in first.getvalue() and "two" not in first.getvalue()
        assert "two" in second.getvalue()
    finally:
        structlog.reset_defaults()
