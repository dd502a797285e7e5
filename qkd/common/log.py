"""Structured logging for every qkdgw process.

JSON lines in production (`format = "json"`), readable key=value lines on a terminal.
Nothing secret is ever passed to a logger; `assert_no_secret_fields` is a last line of
defence that drops fields whose names suggest key material, in case someone adds one.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

_SECRET_WORDS = ("secret", "private", "psk", "key_material", "shared_secret", "password")


def _drop_secret_fields(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    for name in list(event):
        lowered = name.lower()
        if lowered.endswith("_epoch"):
            continue  # epoch numbers are public (they travel in the clear)
        if any(word in lowered for word in _SECRET_WORDS):
            event[name] = "<redacted>"
    return event


def configure_logging(level: str = "info", fmt: str = "console",
                      stream: TextIO | None = None, process: str | None = None,
                      cache: bool = False) -> None:
    """Set up structlog for this process. `fmt` is "console" or "json".

    `cache` keeps each logger as first bound instead of rebuilding it on every call
    (a KME logs a line per delivery): only for a process that configures logging
    once, first thing, since a cached logger ignores any later `configure` (and
    `structlog.testing.capture_logs`, so tests leave it off)."""
    out = stream if stream is not None else sys.stderr
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_secret_fields,
    ]
    if process:
        processors.insert(0, _bind_process(process))
    if fmt == "json":
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=out.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=cache,
    )


def _bind_process(name: str) -> Any:
    def add(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("process", name)
        return event
    return add


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
