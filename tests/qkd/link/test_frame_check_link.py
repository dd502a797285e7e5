"""The link runs Cascade's per-frame check (issue 13): FrameCheck and FrameCheckResult
cross the classical channel inside the round's transcript (which the transcript tags
cover, so a relay cannot alter them without the round aborting), and the round still
commits the same blocks on both KMEs. Drops are shown at the protocol level
(tests/qkd/sim/test_reconcile.py)."""

from __future__ import annotations

from qkd.link import core as lc
from qkd.sim import constants as c
from tests.support.link_pair import Tamper, committed, connect, pair, pump


def _watch(seen: dict[str, int]) -> Tamper:
    def tamper(name: str, i: int, frame: bytes) -> bytes:
        if frame[0] != lc.PP or len(frame) < 2:
            return frame
        kind = frame[1]
        if kind in (c.MSG_FRAME_CHECK, c.MSG_FRAME_CHECK_RESULT):
            seen[f"{name}:{kind}"] = seen.get(f"{name}:{kind}", 0) + 1
        return frame
    return tamper


def test_link_round_carries_frame_checks_and_commits() -> None:
    a, b = pair()
    connect(a, b)
    seen: dict[str, int] = {}
    a.start_round(0.0)
    ev = pump(a, b, _watch(seen))
    ka, kb = committed(ev, "alice"), committed(ev, "bob")
    assert ka and ka[0].blocks and ka[0].blocks == kb[0].blocks
    assert seen.get(f"a2b:{c.MSG_FRAME_CHECK}", 0) >= 1
    assert seen.get(f"b2a:{c.MSG_FRAME_CHECK_RESULT}", 0) == seen[f"a2b:{c.MSG_FRAME_CHECK}"]
