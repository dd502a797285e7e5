"""Re-bootstrapping never reuses a one-time pad (issue 9.4).

A bootstrap binds a fresh nonce from each KME (BOOT / BOOT_ACK), so two bootstraps under
the same link secret share no pad and no tag, and a frame recorded under one fails under
the other. The positive control is the old derivation (`bootstrap_auth` without the
nonces): every bootstrap gets the same pads and an old HELLO verifies again. A KME whose
state file is gone but whose key store holds history refuses to bootstrap until the
operator runs `qkdgw link-reset` with a new link secret."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest

from gateway.cli import main as qkdgw
from qkd.common.storage_key import Sealer
from qkd.link import core as lc
from qkd.link import reset as link_reset
from qkd.link.bb84 import Bb84Link, Bb84Settings
from qkd.link.wegman_carter import PAD_BYTES
from tests.support.link_pair import PARAMS, PSK, pump


def _fresh_pair() -> tuple[lc.LinkCore, lc.LinkCore]:
    return tuple(lc.LinkCore(role, lc.unbootstrapped_auth(role), PARAMS, 256,  # type: ignore[return-value]
                             np.random.default_rng(1), link_secret=PSK)
                 for role in ("alice", "bob"))


def _bootstrap(a: lc.LinkCore, b: lc.LinkCore) -> bytes:
    """Run the exchange as the adapter does; returns Alice's first HELLO."""
    a.connection_made()
    boot = a.frames_to_send()
    assert len(boot) == 1 and boot[0][0] == lc.BOOT
    assert b.accept_hello(boot[0], 0.0)
    for f in b.frames_to_send():
        a.receive_frame(f, 0.0)
    hello = a.frames_to_send()
    assert hello and hello[0][0] == lc.HELLO
    for f in hello:
        b.receive_frame(f, 0.0)
    pump(a, b)
    assert a.peer_ready and b.peer_ready and a.auth.mode == b.auth.mode == "bootstrap"
    return hello[0]


def _pads(core: lc.LinkCore) -> list[bytes]:
    s = core.auth.export_state()
    raw = bytes.fromhex(str(s["a2b"])) + bytes.fromhex(str(s["b2a"]))
    return [raw[i:i + PAD_BYTES] for i in range(0, len(raw), PAD_BYTES)]


def test_two_bootstraps_share_no_pad_and_no_tag() -> None:
    a1, b1 = _fresh_pair()
    hello1 = _bootstrap(a1, b1)
    a2, b2 = _fresh_pair()
    hello2 = _bootstrap(a2, b2)
    # Same offsets, same message (committed 0, watermark 0), different tags.
    assert hello1[1:9] == hello2[1:9] and hello1[lc._CTRL.size:] == hello2[lc._CTRL.size:]
    assert hello1[9:25] != hello2[9:25]
    p1, p2 = _pads(a1), _pads(a2)
    assert len(p1) == len(p2) > 100 and all(x != y for x, y in zip(p1, p2, strict=True))
    assert not set(p1) & set(p2)
    # A frame recorded in the first run fails in the second.
    other = lc.LinkCore("bob", lc.unbootstrapped_auth("bob"), PARAMS, 256,
                        np.random.default_rng(3), link_secret=PSK)
    a3, _ = _fresh_pair()
    a3.connection_made()
    assert other.accept_hello(a3.frames_to_send()[0], 0.0)  # a new bootstrap at Bob
    other.frames_to_send()
    assert not other.accept_hello(hello1, 0.0)
    assert other.stats.auth_failures == 1


def test_control_old_bootstrap_reuses_pads_and_old_frames_verify() -> None:
    # The old derivation: link secret only, no nonces.
    p1 = _pads(lc.LinkCore("alice", lc.bootstrap_auth("alice", PSK), PARAMS, 256,
                           np.random.default_rng(1), link_secret=PSK))
    a = lc.LinkCore("alice", lc.bootstrap_auth("alice", PSK), PARAMS, 256,
                    np.random.default_rng(1), link_secret=PSK)
    assert _pads(a) == p1
    a.connection_made()
    hello_old = a.frames_to_send()[0]
    b = lc.LinkCore("bob", lc.bootstrap_auth("bob", PSK), PARAMS, 256,
                    np.random.default_rng(2), link_secret=PSK)
    assert b.accept_hello(hello_old, 0.0)  # a recorded first-run frame verifies again


def test_boot_exchange_refuses_forgery_replay_and_a_bootstrapped_bob() -> None:
    a, b = _fresh_pair()
    a.connection_made()
    boot = a.frames_to_send()[0]
    forged = boot[:-1] + bytes([boot[-1] ^ 1])
    assert not b.accept_hello(forged, 0.0) and b.auth.mode == lc.UNBOOTSTRAPPED
    assert b.accept_hello(boot, 0.0)
    ack = b.frames_to_send()[0]
    # An ACK for another BOOT (Alice reconnected meanwhile) is refused.
    a.connection_made()
    a.frames_to_send()
    with pytest.raises(lc.LinkProtocolError, match="BOOT_ACK"):
        a.receive_frame(ack, 0.0)
    # Control-frames before the exchange are refused too.
    with pytest.raises(lc.LinkProtocolError, match="before the bootstrap"):
        a.receive_frame(lc._CTRL.pack(lc.ABORT, 0, bytes(16)) + b"{}", 0.0)
    # Once Alice's HELLO verified at Bob, a new BOOT is refused, with the fix.
    a2, b2 = _fresh_pair()
    _bootstrap(a2, b2)
    a2.connection_made()
    a2.auth = lc.unbootstrapped_auth("alice")  # Alice lost her state
    a2.connection_made()
    with pytest.raises(lc.LinkProtocolError, match="link-reset"):
        b2.accept_hello(a2.frames_to_send()[-1], 0.0)


def _link(tmp_path: Path, history: int, secret: bytes = PSK) -> Bb84Link:
    from qkd.common.confload import HostPort

    s = Bb84Settings(role="bob", params=PARAMS, bootstrap_key=secret,
                     listen=HostPort("127.0.0.1", 0), quantum_listen=HostPort("127.0.0.1", 0))
    return Bb84Link(s, None, Sealer(bytes(32)), tmp_path / "link-state",  # type: ignore[arg-type]
                    key_size_bits=256, lifetime_s=60, max_key_count=10, local_saes=["b"],
                    peer_saes=["a"], key_history=history)


def test_missing_state_over_key_history_is_refused_until_reset(tmp_path: Path) -> None:
    _link(tmp_path, 0)  # control: a first start bootstraps (and records the secret)
    assert link_reset.used_secrets(tmp_path / "link-state") == [link_reset.fingerprint(PSK)]
    with pytest.raises(lc.LinkProtocolError, match="link-reset") as err:
        _link(tmp_path, 12)
    assert "12 blocks" in str(err.value) and "state file" in str(err.value)
    # A reset to the same secret is refused; a new secret is accepted once.
    with pytest.raises(ValueError, match="secret_file"):
        link_reset.reset_link(tmp_path / "link-state", tmp_path / "s.key", PSK,
                              new_secret=False)
    secret_file = tmp_path / "s.key"
    new = link_reset.reset_link(tmp_path / "link-state", secret_file, PSK, new_secret=True)
    assert secret_file.read_text().strip() == new.hex() and new != PSK
    assert (secret_file.stat().st_mode & 0o077) == 0
    with pytest.raises(lc.LinkProtocolError):
        _link(tmp_path, 12)  # the old secret still does not pass
    link = _link(tmp_path, 12, new)
    assert link.core.auth.mode == lc.UNBOOTSTRAPPED
    with pytest.raises(lc.LinkProtocolError):
        _link(tmp_path, 12, new)  # the marker is spent: once only


def test_kme_refuses_then_link_reset_command(tmp_path: Path, pki: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from qkd.kme.config import KmeConfig
    from qkd.kme.keystore import AsyncKeyStore
    from qkd.kme.service import start_kme
    from tests.support.kme_processes import bb84_link, kme_toml

    secret = tmp_path / "link-secret.key"
    secret.write_text((pki / "link-secret.key").read_text())
    os.chmod(secret, 0o600)
    db = tmp_path / "b.sqlite3"
    cfg = tmp_path / "kme-b.toml"
    cfg.write_text(kme_toml(pki, "b", db, link=bb84_link(pki, "bob").replace(
        str(pki / "link-secret.key"), str(secret))))
    config = KmeConfig.load(cfg)

    async def run() -> None:
        kme = await start_kme(config)
        await kme.close()
        store = await AsyncKeyStore.open(db, config.kme_id,
                                         Sealer(config_storage_key(config)))
        await store.deposit([("blk-1", os.urandom(32))], 0.0, 1.0, limit=10)  # expired
        await store.close()

    def config_storage_key(c: KmeConfig) -> bytes:
        from qkd.common.storage_key import load_or_create
        return load_or_create(c.storage_key)

    asyncio.run(run())
    assert config.link.state_file is not None
    config.link.state_file.unlink(missing_ok=True)  # the state file is lost
    with pytest.raises(Exception, match=r"\[link\] state_file.*link-reset"):
        asyncio.run(start_kme(KmeConfig.load(cfg)))
    assert qkdgw(["link-reset", "--config", str(cfg)]) == 2  # same secret: refused
    assert "--new-secret" in capsys.readouterr().err
    assert qkdgw(["link-reset", "--config", str(cfg), "--new-secret"]) == 0
    assert "copy it to the peer" in capsys.readouterr().out

    async def again() -> None:
        kme = await start_kme(KmeConfig.load(cfg))
        assert kme.link is not None and kme.link.core.auth.mode == lc.UNBOOTSTRAPPED
        await kme.close()

    asyncio.run(again())
