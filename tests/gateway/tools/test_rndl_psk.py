"""Record now, decrypt later, for a PSK-authenticated tunnel: the offline adversary of
`qkdgw rndl` against a recording of a tunnel that started in PSK mode, holding subsets
of the secrets including the stolen PSK store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.tools.rndl import Adversary, KeyLog
from gateway.tunnel import events as ev
from gateway.tunnel.connection import TunnelConnection
from gateway.tunnel.handshake import AUTH_PSK, KeyLogEntry
from tests.support.psk_sites import Site, connect
from tests.support.tunnel_harness import FakeKmePair, params

SECRET = b"PSK-mode session, recorded today: payroll batch 7731 " * 50


def _record_psk_tunnel(pki: Path, tmp: Path) -> tuple[bytes, bytes, KeyLog, dict[int, bytes]]:
    sa = Site(tmp / "a.sqlite", "site-b")
    sb = Site(tmp / "b.sqlite", "site-a")
    kme = FakeKmePair()
    assert connect(pki, sa, sb, kme).ready  # PKI bootstrap, not recorded
    offered = sa.store.offer()
    assert offered is not None
    stolen = {offered.epoch: offered.key}  # what a copy of psk.sqlite gives a thief
    keylog = KeyLog()

    def log(entry: KeyLogEntry) -> None:
        keylog.mlkem[entry.session_id] = entry.mlkem_shared_secret
        keylog.qkd[entry.session_id] = entry.qkd_key

    a = TunnelConnection(initiator=True, keylog=log,
                         params=params(pki, "site-a", "site-b", psk_book=sa.store))
    b = TunnelConnection(initiator=False,
                         params=params(pki, "site-b", "site-a", psk_book=sb.store))
    wire = {"a2b": bytearray(), "b2a": bytearray()}
    a.start(0.0)
    sid = None
    for _ in range(200):
        moved = False
        for name, conn, other, site in (("a2b", a, b, sa), ("b2a", b, a, sb)):
            for e in iter(conn.next_event, None):
                moved = True
                if isinstance(e, ev.NextPskDerived | ev.PskConfirmed):
                    site.store.apply(e)
                elif isinstance(e, ev.QkdKeysRequested):
                    conn.supply_qkd_keys(e.handshake_id, kme.enc(e.number, e.size_bits) or [], 0)
                elif isinstance(e, ev.QkdKeysToFetch):
                    conn.supply_qkd_keys(e.handshake_id, kme.dec(e.key_ids) or [], 0)
                elif isinstance(e, ev.StreamDataReceived):
                    conn.stream_data_consumed(e.stream_id, len(e.data))
            if name == "a2b" and a.ready and sid is None:
                assert a.session is not None and a.session.auth == AUTH_PSK
                sid = a.open_stream("svc")
                a.send_stream_data(sid, SECRET)
                a.end_stream(sid)
                moved = True
            out = b"".join(conn.data_to_send())
            if out:
                moved = True
                wire[name] += out
                other.receive_data(out, 0.0)
        if not moved:
            break
    assert sid is not None
    return bytes(wire["a2b"]), bytes(wire["b2a"]), keylog, stolen


@pytest.fixture(scope="module")
def recording(pki_dir: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[bytes, bytes, KeyLog, dict[int, bytes]]:
    return _record_psk_tunnel(pki_dir, tmp_path_factory.mktemp("rndl-psk"))


@pytest.mark.parametrize("has", [
    frozenset(),
    frozenset({"psk"}),
    frozenset({"psk", "mlkem"}),
    frozenset({"psk", "qkd"}),
    frozenset({"psk", "signing"}),
    # Both session secrets but not the PSK: a PSK-mode session is salted with it.
    frozenset({"mlkem", "qkd"}),
])
def test_stolen_psk_store_opens_nothing_without_both_session_secrets(
        recording: tuple[bytes, bytes, KeyLog, dict[int, bytes]], has: frozenset[str]) -> None:
    a2b, b2a, keylog, stolen = recording
    adv = Adversary(a2b, b2a, keylog, has, [os.urandom(64)], stolen_psks=stolen)
    adv.run()
    assert adv.sessions_opened == 0
    assert SECRET[:40] not in adv.recovered()


def test_positive_control_psk_and_both_secrets_recover_the_plaintext(
        recording: tuple[bytes, bytes, KeyLog, dict[int, bytes]]) -> None:
    a2b, b2a, keylog, stolen = recording
    adv = Adversary(a2b, b2a, keylog, frozenset({"psk", "mlkem", "qkd"}), [],
                    stolen_psks=stolen)
    adv.run()
    assert adv.sessions_opened == 1
    assert adv.recovered() == SECRET
