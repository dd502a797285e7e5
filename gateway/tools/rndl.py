"""`qkdgw rndl`: does recorded traffic stay secret? ("record now, decrypt later")

Runs the two sites (separate processes) with a recording relay between the gateways
that keeps every byte in both directions, sends known plaintext through the tunnel
across at least one re-handshake, then plays the adversary offline. The adversary gets
the recording plus a chosen subset of the secrets: the per-session ML-KEM shared
secrets and QKD keys (from the gateways' key log, which exists only for this check),
and the long-term signing keys. It rebuilds whatever it can of the key schedule from
the recorded handshakes, checks each guess against the recorded Finished MACs, decrypts
what its keys open, and reports whether the exact known plaintext came out.

The decryptor below is written against the wire format only (records, handshake
messages, stream frames), sharing the parsers and the key schedule with the gateway;
it holds no state from the live run.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from gateway.tools.testbed import Testbed, TestbedError, TestbedOptions
from gateway.tunnel.handshake import (
    AUTH_PSK,
    MSG_CERTIFICATE,
    MSG_CERTIFICATE_VERIFY,
    MSG_CLIENT_HELLO,
    MSG_FINISHED,
    MSG_SERVER_HELLO,
    TRANSCRIPT_LABEL,
    ClientHello,
    ServerHello,
    _join_qkd_keys,
    decode_finished,
    message_type,
)
from gateway.tunnel.key_schedule import HybridKeySchedule, finished_mac, transcript_hasher
from gateway.tunnel.record import (
    FLAG_KEY_PHASE,
    INNER_HANDSHAKE,
    INNER_STREAM,
    PLAINTEXT_HANDSHAKE,
    RecordError,
    RecordLayer,
    RecordLimits,
    RecordReader,
)
from gateway.tunnel.streams import FRAME_DATA, FRAME_HEADER, FRAME_HEADER_LEN
from gateway.tunnel.wire import DecodeError
from qkd.common.tcp_relay import A2B, B2A, Hook, TcpRelay

SECRETS = ("mlkem", "qkd", "signing")

# (name, what the adversary holds, whether the exact plaintext must come out)
SCENARIOS: tuple[tuple[str, frozenset[str], bool], ...] = (
    ("nothing", frozenset(), False),
    ("mlkem_secrets_only", frozenset({"mlkem"}), False),
    ("qkd_keys_only", frozenset({"qkd"}), False),
    ("signing_keys_only", frozenset({"signing"}), False),
    ("mlkem_secrets_and_signing_keys", frozenset({"mlkem", "signing"}), False),
    ("qkd_keys_and_signing_keys", frozenset({"qkd", "signing"}), False),
    # Both secrets, but only of the first session: the traffic after the re-handshake
    # stays closed, because every session mixes in a fresh ML-KEM secret and QKD key.
    ("mlkem_and_qkd_of_first_session_only", frozenset({"mlkem", "qkd", "first_session"}),
     False),
    ("mlkem_secrets_and_qkd_keys", frozenset({"mlkem", "qkd"}), True),
)


# ------------------------------------------------------------------------ recording


class RecordingRelay:
    """A TCP relay between the gateways that keeps every byte, in its own thread."""

    def __init__(self, target_port: int, out_dir: Path) -> None:
        self.target_port = target_port
        self.a2b = out_dir / "recording-a2b.bin"
        self.b2a = out_dir / "recording-b2a.bin"
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop: asyncio.Event | None = None

    def start(self) -> int:
        self._thread.start()
        if not self._ready.wait(10):
            raise TestbedError("the recording relay did not start")
        return self.port

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        files = (open(self.a2b, "wb"), open(self.b2a, "wb"))  # noqa: SIM115 - closed below

        def recorder(f: Any) -> Hook:
            def hook(data: bytes) -> tuple[bytes]:
                f.write(data)
                return (data,)

            return hook

        relay = TcpRelay(("127.0.0.1", self.target_port),
                         hooks=lambda conn: {A2B: recorder(files[0]), B2A: recorder(files[1])})
        self.port = await relay.start()
        self._ready.set()
        await self._stop.wait()
        await relay.close()
        for f in files:
            f.close()

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


# ------------------------------------------------------------------------ adversary


@dataclass
class KeyLog:
    mlkem: dict[str, bytes] = field(default_factory=dict)  # session id -> secret
    qkd: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> KeyLog:
        log = cls()
        for line in text.splitlines():
            parts = line.split()
            if len(parts) != 4:
                continue
            label, sid, _epoch, value = parts
            if label == "MLKEM_SS":
                log.mlkem[sid] = bytes.fromhex(value)
            elif label == "QKD_KEY":
                log.qkd[sid] = bytes.fromhex(value)
        return log


_TRANSCRIPT_TYPES = frozenset((MSG_CLIENT_HELLO, MSG_SERVER_HELLO, MSG_CERTIFICATE,
                               MSG_CERTIFICATE_VERIFY, MSG_FINISHED))


@dataclass
class _Handshake:
    """What the adversary reconstructs of one recorded handshake, per direction."""

    a2b: list[bytes] = field(default_factory=list)
    b2a: list[bytes] = field(default_factory=list)

    def add(self, direction: str, msg: bytes) -> None:
        if message_type(msg) in _TRANSCRIPT_TYPES:
            (self.a2b if direction == "a2b" else self.b2a).append(msg)

    def done(self, direction: str) -> bool:
        msgs = self.a2b if direction == "a2b" else self.b2a
        return bool(msgs) and message_type(msgs[-1]) == MSG_FINISHED

    @property
    def complete(self) -> bool:
        return self.done("a2b") and self.done("b2a")

    def transcript(self) -> list[bytes]:
        """Protocol order: ClientHello, the responder's flight, the initiator's rest."""
        return [self.a2b[0], *self.b2a, *self.a2b[1:]]


@dataclass
class _Direction:
    name: str
    records: list[tuple[int, int, bytes, memoryview]]
    layer: RecordLayer = field(default_factory=lambda: RecordLayer(RecordLimits(
        hard_max_records=1 << 62, hard_max_bytes=1 << 62)))
    pos: int = 0
    blocked: bool = False
    failed: bool = False


class Adversary:
    """Offline decryption of a recorded tunnel with a subset of the secrets."""

    def __init__(self, a2b: bytes, b2a: bytes, keylog: KeyLog, has: frozenset[str],
                 signing_keys: list[bytes], stolen_psks: dict[int, bytes] | None = None
                 ) -> None:
        self.has = has
        self.keylog = keylog
        self.signing_keys = signing_keys
        self.dirs = {"a2b": _Direction("a2b", _split(a2b)), "b2a": _Direction("b2a", _split(b2a))}
        self.streams: dict[int, bytearray] = {}
        self.sessions_opened = 0
        self._hs = _Handshake()
        self._chain: bytes | None = None
        # PSKs by epoch: those read from a stolen PSK store ("psk" in has), plus those
        # of sessions the adversary opened itself.
        self._psks: dict[int, bytes] = dict(stolen_psks or {}) if "psk" in has else {}

    def _guesses(self, what: str, sid: str) -> list[bytes]:
        """Candidate values for one secret: the real one if handed over, otherwise the
        best the adversary can do with what it holds (its signing keys, or zeros)."""
        table = self.keylog.mlkem if what == "mlkem" else self.keylog.qkd
        if what in self.has and sid in table:
            return [table[sid]]
        guesses = [bytes(32), bytes(34)]
        if "signing" in self.has:
            for k in self.signing_keys:
                guesses += [hashlib.sha256(k).digest(), k[-32:], _join_qkd_keys([k[-32:]])]
        return guesses

    def _derive(self) -> bool:
        """Try every combination of guesses; a guess is right only if it reproduces the
        recorded Finished MACs, exactly as a gateway would check them."""
        messages = self._hs.transcript()
        ch = ClientHello.decode(messages[0])
        sh = ServerHello.decode(messages[1])
        sid = ch.nonce.hex()
        th = transcript_hasher()
        th.update(TRANSCRIPT_LABEL)
        hello_th = b""
        finished: list[tuple[bytes, bytes]] = []
        for msg in messages:
            if message_type(msg) == MSG_FINISHED:
                finished.append((th.copy().digest(), decode_finished(msg)[0]))
            th.update(len(msg).to_bytes(4, "big"))
            th.update(msg)
            if message_type(msg) == MSG_SERVER_HELLO:
                hello_th = th.copy().digest()
        final_th = th.digest()
        (th_r, mac_r), (th_i, mac_i) = finished
        qkd_guesses = self._guesses("qkd", sid) if sh.mode == "hybrid" else [b""]
        if ch.auth == AUTH_PSK:
            # A PSK-authenticated tunnel is salted with a PSK from an earlier session:
            # without having opened that session, the adversary cannot know it.
            salt = self._psks.get(ch.psk_epoch)
            if salt is None:
                return False
        else:
            salt = self._chain
        for ss in self._guesses("mlkem", sid):
            for k_qkd in qkd_guesses:
                sched = HybridKeySchedule(ss, k_qkd, salt)
                confirm = sched.confirmation_keys(hello_th)
                if not (hmac.compare_digest(finished_mac(confirm.responder, th_r), mac_r)
                        and hmac.compare_digest(finished_mac(confirm.initiator, th_i), mac_i)):
                    continue
                keys = sched.session_keys(final_th)
                self.dirs["a2b"].layer.install_recv(keys.i2r_traffic)
                self.dirs["b2a"].layer.install_recv(keys.r2i_traffic)
                self._chain = keys.chain_key
                if sh.next_psk_epoch:
                    self._psks[sh.next_psk_epoch] = keys.next_psk
                self.sessions_opened += 1
                return True
        return False

    def run(self) -> None:
        while True:
            moved = [self._advance(d) for d in self.dirs.values()]
            if any(moved):
                continue
            if not self._hs.complete:
                return  # nothing left that the adversary's keys open
            if not self._derive():
                return  # its secrets do not reproduce the Finished MACs: stuck here
            self._hs = _Handshake()
            for d in self.dirs.values():
                d.blocked = False

    def _advance(self, d: _Direction) -> bool:
        moved = False
        while d.pos < len(d.records) and not d.blocked and not d.failed:
            rtype, flags, header, body = d.records[d.pos]
            if rtype != PLAINTEXT_HANDSHAKE:
                phase = d.layer.recv_phase
                # Protected bytes before any key, or the first record under the keys of
                # a re-handshake this direction just finished: wait for the handshake.
                if phase is None or (self._hs.done(d.name)
                                     and (flags & FLAG_KEY_PHASE) != phase):
                    d.blocked = True
                    return moved
            try:
                inner, payload = d.layer.open(rtype, flags, header, body)
            except RecordError:
                d.failed = True
                return moved
            d.pos += 1
            moved = True
            if inner == INNER_HANDSHAKE:
                self._hs.add(d.name, bytes(payload))
            elif inner == INNER_STREAM:
                self._frames(payload)
        return moved

    def _frames(self, payload: bytes | memoryview) -> None:
        pos = 0
        while pos + FRAME_HEADER_LEN <= len(payload):
            ftype, sid, length = FRAME_HEADER.unpack_from(payload, pos)
            pos += FRAME_HEADER_LEN
            if ftype == FRAME_DATA:
                self.streams.setdefault(sid, bytearray()).extend(payload[pos : pos + length])
            pos += length

    def recovered(self) -> bytes:
        return b"".join(bytes(v) for _, v in sorted(self.streams.items()))


def _first_session_only(keylog: KeyLog, a2b: bytes) -> KeyLog:
    """The key log reduced to the session whose ClientHello opens the recording."""
    records = _split(a2b)
    if not records or records[0][0] != PLAINTEXT_HANDSHAKE:
        return KeyLog()
    sid = ClientHello.decode(bytes(records[0][3])).nonce.hex()
    return KeyLog({k: v for k, v in keylog.mlkem.items() if k == sid},
                  {k: v for k, v in keylog.qkd.items() if k == sid})


def _split(data: bytes) -> list[tuple[int, int, bytes, memoryview]]:
    reader = RecordReader()
    reader.feed(data)
    out = []
    try:
        while (rec := reader.next_record()) is not None:
            out.append(rec)
    except DecodeError:
        pass
    return out


# ------------------------------------------------------------------------- the run


def _send_known_plaintext(port: int, parts: list[bytes], wait_between: Any) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        for i, part in enumerate(parts):
            s.sendall(part)
            if i + 1 < len(parts):
                wait_between()
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while len(reply) < 40:
            chunk = s.recv(40 - len(reply))
            if not chunk:
                break
            reply += chunk
    whole = b"".join(parts)
    if reply[:8] != len(whole).to_bytes(8, "big") or reply[8:] != hashlib.sha256(whole).digest():
        raise TestbedError("the known plaintext did not arrive intact at site B")


def run_rndl(workdir: Path, *, rekey_interval: float = 1.0) -> dict[str, Any]:
    bed = Testbed(workdir, TestbedOptions(rekey_interval=rekey_interval, keylog=True))
    tag = os.urandom(8).hex()
    parts = [f"RNDL known plaintext, part 1 of 2, run {tag}: wire transfer ref 0042 "
             f"to IBAN DE00 1234 5678 9012 3456 78. ".encode() * 40,
             f"RNDL known plaintext, part 2 of 2, run {tag}, sent after a re-handshake. "
             .encode() * 40]
    plaintext = b"".join(parts)
    bed.prepare()
    bed.start_kmes()
    sink = bed.start_sink()
    bed.start_gateway("site-b", "site-a", connect=None, services={"sink": sink})
    relay = RecordingRelay(bed.ports["tunnel-site-b"], workdir)
    relay_port = relay.start()
    try:
        bed.start_gateway("site-a", "site-b", connect=relay_port, listeners={"sink": 0})
        bed.wait_tunnel()

        def wait_for_rekey() -> None:
            start_epoch = bed.status("site-a")["peer"].get("epoch", 0)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if bed.status("site-a")["peer"].get("epoch", 0) > start_epoch:
                    return
                time.sleep(0.1)
            raise TestbedError("no re-handshake happened within 30 s")

        _send_known_plaintext(bed.ports["listen-site-a-sink"], parts, wait_for_rekey)
        status = bed.status("site-a")
    finally:
        bed.stop()
        relay.stop()
    a2b, b2a = relay.a2b.read_bytes(), relay.b2a.read_bytes()
    keylog = KeyLog.parse(bed.keylog_path("site-a").read_text())
    signing = []
    for site in ("site-a", "site-b"):
        key = serialization.load_pem_private_key(
            (bed.pki / site / "gateway.key").read_bytes(), password=None)
        signing.append(key.private_bytes(serialization.Encoding.DER,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    first = _first_session_only(keylog, a2b)
    scenarios = []
    for name, has, expected in SCENARIOS:
        adversary = Adversary(a2b, b2a, first if "first_session" in has else keylog, has,
                              signing)
        adversary.run()
        recovered = adversary.recovered()
        scenarios.append({
            "name": name,
            "adversary_has": sorted(has),
            "plaintext_recovered": plaintext in recovered,
            "expected": expected,
            "sessions_opened": adversary.sessions_opened,
            "bytes_decrypted": len(recovered),
            "ok": (plaintext in recovered) == expected,
        })
    return {
        "ok": all(s["ok"] for s in scenarios),
        "recorded_bytes": {"a2b": len(a2b), "b2a": len(b2a)},
        "sessions_in_recording": status["handshakes"],
        "plaintext_bytes": len(plaintext),
        "scenarios": scenarios,
    }


def _cmd_rndl(args: argparse.Namespace) -> int:
    keep = args.workdir is not None
    workdir = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="qkdgw-rndl-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if not args.json:
        print("qkdgw rndl: recording the tunnel between two sites (key log ON for this "
              "check only)...", file=sys.stderr, flush=True)
    try:
        result = run_rndl(workdir)
    except TestbedError as exc:
        result = {"ok": False, "error": str(exc), "workdir": str(workdir)}
        keep = True
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    elif "error" in result:
        print(f"rndl FAILED: {result['error']}")
    else:
        print(f"recorded {result['recorded_bytes']['a2b'] + result['recorded_bytes']['b2a']:,} "
              f"bytes over {result['sessions_in_recording']} sessions; "
              f"known plaintext {result['plaintext_bytes']} bytes\n")
        print(f"  {'adversary holds':44} {'recovered':10} {'expected':9} verdict")
        for s in result["scenarios"]:
            has = " + ".join(h for h in s["adversary_has"] if h != "first_session")
            if "first_session" in s["adversary_has"]:
                has += " (first session only)"
            has = has or "(recording only)"
            print(f"  {has:44} {s['plaintext_recovered']!s:10} {s['expected']!s:9} "
                  f"{'ok' if s['ok'] else 'WRONG'}")
        print("\nOK: only ML-KEM secrets together with QKD keys open the recording"
              if result["ok"] else "\nFAILED: see the rows marked WRONG")
    return 0 if result["ok"] else 1


def register_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("rndl", help="record the tunnel and try to decrypt it offline with "
                       "subsets of the secrets", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--workdir", help="keep the recording, key log, PKI and logs here")
    p.set_defaults(handler=_cmd_rndl)
