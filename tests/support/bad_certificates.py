"""Real site certificates with one byte changed, and tunnel pairs that send them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.tunnel import events as ev
from gateway.tunnel.handshake import Credentials
from tests.support.tunnel_harness import Pair, credentials, make_pair, params

CN_OID = bytes.fromhex("0603550403")


def _cn_tag_positions(der: bytes) -> list[int]:
    """Offsets of the UTF8String tag (0x0c) after each commonName OID: issuer, subject."""
    out, start = [], 0
    while (i := der.find(CN_OID + b"\x0c", start)) >= 0:
        out.append(i + len(CN_OID))
        start = i + 1
    return out


def mutate(der: bytes, which: str) -> bytes:
    if which in ("issuer", "subject"):
        pos = _cn_tag_positions(der)[0 if which == "issuer" else 1]
        assert der[pos] == 0x0C
        return der[:pos] + b"\x41" + der[pos + 1:]
    assert which == "version"
    pos = der.find(bytes.fromhex("a003020102"))
    assert pos > 0
    return der[:pos + 4] + b"\x66" + der[pos + 5:]


MUTATIONS = ["issuer", "subject", "version"]


# What cryptography raised out of the gateway before the fix, for each mutation.
RAW_ERRORS: dict[str, type[Exception] | tuple[type[Exception], ...]] = {
    "issuer": ValueError, "subject": ValueError, "version": x509.InvalidVersion}


@dataclasses.dataclass(frozen=True)
class WireChain(Credentials):
    """Credentials whose Certificate message carries `wire` instead of the real chain
    (the signature is still made with the real key: the receiver never gets that far)."""

    wire: tuple[bytes, ...] = ()

    @property
    def chain_der(self) -> tuple[bytes, ...]:
        return self.wire


def with_wire_chain(creds: Credentials, wire: tuple[bytes, ...]) -> WireChain:
    return WireChain(creds.private_key, creds.chain, creds.trust_anchor, creds.crl_check,
                     creds.own_check, wire)


def der_of(pki: Path, site: str) -> bytes:
    return credentials(pki, site).chain[0].public_bytes(Encoding.DER)


def pair_with_bad_cert(pki: Path, sender: str, wire: tuple[bytes, ...]) -> Pair:
    pa, pb = params(pki, "site-a", "site-b"), params(pki, "site-b", "site-a")
    if sender == "initiator":
        pa = dataclasses.replace(pa, credentials=with_wire_chain(pa.credentials, wire))
    else:
        pb = dataclasses.replace(pb, credentials=with_wire_chain(pb.credentials, wire))
    return make_pair(pki, params_a=pa, params_b=pb)


def ends(pair: Pair) -> tuple[ev.ConnectionTerminated | None, ev.ConnectionTerminated | None]:
    def last(events: list[ev.Event]) -> ev.ConnectionTerminated | None:
        found = [e for e in events if isinstance(e, ev.ConnectionTerminated)]
        return found[-1] if found else None
    return last(pair.events_a), last(pair.events_b)
