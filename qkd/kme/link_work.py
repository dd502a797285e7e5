"""The event loop's default executor in a KME process: the BB84 link's heavy round
work on lower-priority threads.

The link runs its round work through `asyncio.to_thread` (pulse emission in
`LinkCore.prepare_round`, sifting, Cascade and privacy amplification in `Work.run`):
seconds of CPU per round, on the same two cores as the event loop and the store
thread that answer SAEs. `LinkWorkExecutor` sends exactly those calls to threads
whose nice value is raised (Linux keeps one per thread), so they get the cores the
request path leaves; the link's short calls (a RESERVE, a frame) stay on normal
threads, or a reservation would wait behind a round for the CPU.
"""

from __future__ import annotations

import contextvars
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from qkd.common.errors import UserError
from qkd.link.core import LinkCore, Work

# Niceness added to the round-work threads (0..19; 10 gives them ~1/10 of a core's
# share against a busy normal thread, and all of any idle core).
LINK_WORK_NICE = 10
NICE_ENV = "QKDGW_KME_LINK_NICE"  # 0 turns it off (the benchmarks' comparison)
_HEAVY = (Work.run, LinkCore.prepare_round)


def lower_priority(increment: int) -> None:
    """Raise this thread's nice value by `increment` (no-op where not supported)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid)
                       + increment)
    except (OSError, AttributeError):  # not Linux, or not allowed: normal priority
        pass


def is_round_work(fn: Callable[..., Any]) -> bool:
    """True for what `asyncio.to_thread` hands over for a heavy link step: a
    partial of `Context.run` around `Work.run` or `LinkCore.prepare_round`."""
    target: Any = fn
    if isinstance(fn, functools.partial) and fn.args and \
            isinstance(getattr(fn.func, "__self__", None), contextvars.Context):
        target = fn.args[0]
    return getattr(target, "__func__", None) in _HEAVY


class LinkWorkExecutor(ThreadPoolExecutor):
    """A ThreadPoolExecutor (normal priority) that runs round work on its own
    lower-priority threads."""

    def __init__(self, nice: int = LINK_WORK_NICE) -> None:
        super().__init__(thread_name_prefix="kme-exec")
        # The link runs one work item and one emission at a time: two threads.
        self._round_work = ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="kme-round-work",
            initializer=lower_priority, initargs=(nice,))

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if is_round_work(fn):
            return self._round_work.submit(fn, *args, **kwargs)
        return super().submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._round_work.shutdown(wait, cancel_futures=cancel_futures)
        super().shutdown(wait, cancel_futures=cancel_futures)


def install(loop: Any) -> None:
    """Make a LinkWorkExecutor the loop's default executor, unless QKDGW_KME_LINK_NICE
    is 0."""
    raw = os.environ.get(NICE_ENV, str(LINK_WORK_NICE))
    try:
        nice = int(raw)
    except ValueError:
        raise UserError(f"{NICE_ENV}={raw!r}: expected a whole number 0..19 (0 keeps the "
                        "round work at normal priority)") from None
    if nice > 0:
        loop.set_default_executor(LinkWorkExecutor(nice))
