"""SKIP on KMEs whose keys come from the emulated BB84 link (separate processes): the
master's new key is reserved at the peer KME before it is handed out, so the slave gets
it by SKIP or by ETSI 014, once."""

from __future__ import annotations

from pathlib import Path

import pytest

from qkd.etsi014.client import EtsiClient, KmeRejected
from qkd.skip.client import SkipClient
from tests.support.kme_processes import KmeProcess, bb84_link, kme_toml, wait_until


def _client(cls: type[EtsiClient], pki: Path, site: str, kme: KmeProcess) -> EtsiClient:
    return cls(kme.url, ca_file=pki / "tls-ca.crt", cert_file=pki / site / "sae-client.crt",
               key_file=pki / site / "sae-client.key", timeout=10)


async def test_skip_keys_from_the_bb84_pool(tmp_path: Path, pki: Path) -> None:
    cfg_b = tmp_path / "kme-b.toml"
    cfg_b.write_text(kme_toml(pki, "b", tmp_path / "b.sqlite3", link=bb84_link(pki, "bob")))
    bob = KmeProcess(cfg_b, tmp_path, "kme-b")
    procs = [bob]
    try:
        ports = bob.link_ports()
        cfg_a = tmp_path / "kme-a.toml"
        cfg_a.write_text(kme_toml(pki, "a", tmp_path / "a.sqlite3", link=bb84_link(
            pki, "alice", peer=ports["classical"], quantum=ports["quantum"])))
        alice = KmeProcess(cfg_a, tmp_path, "kme-a")
        procs.append(alice)
        wait_until(lambda: int(alice.status(pki, "site-a", "site-b-gw")["stored_key_count"])
                   > 0, 90, "a committed round", procs)
        async with _client(SkipClient, pki, "site-a", alice) as a, \
                _client(SkipClient, pki, "site-b", bob) as b_skip, \
                _client(EtsiClient, pki, "site-b", bob) as b_etsi:
            k1, k2 = await a.get_enc_keys("site-b-gw", 2)
            assert (await b_skip.get_dec_keys("site-a-gw", [k1.key_id]))[0] == k1
            assert (await b_etsi.get_dec_keys("site-a-gw", [k2.key_id]))[0] == k2
            with pytest.raises(KmeRejected) as again:
                await b_skip.get_dec_keys("site-a-gw", [k2.key_id])
            assert again.value.status == 404
    finally:
        for p in procs:
            p.stop()
