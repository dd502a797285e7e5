"""The initiator's PSK promotion (on HandshakeDone) is written in the store's worker
thread: it lands on disk, a failed write is redone with the next change, and a crash
before it lands recovers by PSK like a crash before promoting."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from gateway.runtime.psk_store import PskStore, PskStoreError
from gateway.tunnel.handshake import AUTH_PSK
from tests.support.psk_sites import Site, connect, reconnect
from tests.support.tunnel_harness import FakeKmePair


@pytest.fixture
def sites(tmp_path: Path) -> tuple[Site, Site]:
    return Site(tmp_path / "a" / "psk.sqlite", "site-b"), \
        Site(tmp_path / "b" / "psk.sqlite", "site-a")


def on_disk(site: Site) -> tuple[int, int]:
    """(current, pending) epochs as the file holds them, read by a second handle."""
    site.store._settle()  # the background write, if any, has finished (or failed)
    other = PskStore(site.path, site.peer, lock=False)
    try:
        st = other.status()
        return st.current_epoch, st.pending_epoch
    finally:
        other.close()


def fail_background_writes(monkeypatch: pytest.MonkeyPatch, store: PskStore,
                           times: int = 1) -> list[str]:
    real = store._write
    failed: list[str] = []

    def write(slots: Any, now: float, new_max: int, bootstraps: int, step_name: str
              ) -> list[str]:
        if step_name.endswith("(background)") and len(failed) < times:
            failed.append(",".join(sorted(slots)))
            raise PskStoreError("disk full (test)")
        return real(slots, now, new_max, bootstraps, step_name)

    monkeypatch.setattr(store, "_write", write)
    return failed


def test_promotion_is_written_in_the_worker_and_lands(pki_dir: Path, sites: tuple[Site, Site],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    sa, sb = sites
    kme = FakeKmePair()
    threads: list[tuple[str, str]] = []
    real = sa.store._write

    def write(*args: Any) -> list[str]:
        threads.append((args[-1], threading.current_thread().name))
        return real(*args)

    monkeypatch.setattr(sa.store, "_write", write)
    for expected in (1, 2, 3):
        assert connect(pki_dir, sa, sb, kme).ready
        assert sa.store.status().current_epoch == expected
        assert sa.store.status().pending_epoch == 0
        assert on_disk(sa) == (expected, 0)
    background = [t for step, t in threads if step == "sqlite_commit (background)"]
    foreground = [t for step, t in threads if step == "sqlite_commit"]
    assert len(background) == 3 and all(t.startswith("psk-store") for t in background)
    assert foreground and all(t == threading.main_thread().name for t in foreground)


def test_failed_promotion_is_written_with_the_next_change(pki_dir: Path,
                                                          sites: tuple[Site, Site],
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    sa, sb = sites
    kme = FakeKmePair()
    assert connect(pki_dir, sa, sb, kme).ready  # PKI bootstrap: epoch 1
    assert connect(pki_dir, sa, sb, kme).ready  # PSK: epoch 2
    failed = fail_background_writes(monkeypatch, sa.store)
    assert connect(pki_dir, sa, sb, kme).ready  # PSK: epoch 3, its promotion fails
    sa.store._settle()
    assert failed == ["current,pending"]
    # The failure is real: memory holds 3 as current, the file still has it pending.
    assert sa.store.status().current_epoch == 3
    assert on_disk(sa) == (2, 3)
    # The next handshake's first write (its new pending PSK, before its Finished) also
    # writes the current slot memory holds; checked before that handshake's own
    # promotion (which would hide it). Without it the file would say (2, 4), and after a
    # crash a refused 4 would bring back 2, spent already, as the responder's previous.
    att = connect(pki_dir, sa, sb, kme, cut="initiator_crash_before_promoting")
    assert att.completed("b") is not None and sb.store.status().current_epoch == 4
    assert on_disk(sa) == (3, 4)
    assert sa.store._unsynced == set()


def test_crash_before_the_promotion_lands_recovers_by_psk(pki_dir: Path,
                                                          sites: tuple[Site, Site],
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    sa, sb = sites
    kme = FakeKmePair()
    assert connect(pki_dir, sa, sb, kme).ready
    assert connect(pki_dir, sa, sb, kme).ready
    failed = fail_background_writes(monkeypatch, sa.store)
    assert connect(pki_dir, sa, sb, kme).ready
    assert on_disk(sa) == (2, 3) and failed
    sa.restart()  # the write never landed: the file is what a crash leaves
    sb.restart()
    assert sa.store.status().current_epoch == 2 and sa.store.status().pending_epoch == 3
    att, attempts = reconnect(pki_dir, sa, sb, kme)
    done = att.completed("a")
    assert done is not None and done.auth == AUTH_PSK and done.psk_epoch == 3
    assert attempts == 1
    assert sa.store.status().current_epoch == sb.store.status().current_epoch == 4
    assert on_disk(sa) == (4, 0)
    # The epoch the crash left as the file's current is superseded at the responder:
    # its `previous` is 3, so 2 is never accepted again.
    assert sb.store.lookup(2) is None
