"""ETSI GS QKD 014 client used by gateways (the SAE side), over HTTPS with a client cert.

Security-critical: whatever a KME answers decides which key the tunnel mixes in, so
every answer is validated strictly by `qkd.etsi014.messages` (exact count, exactly the asked-for
key IDs, no duplicates, exact key length, canonical UUIDs, strict base64 and JSON) and
anything else raises `KmeProtocolError`. This client also remembers the key IDs it was
recently given and refuses a KME that hands one out again.

HTTP/1.1 is spoken by the small keep-alive transport below (`_Http1`), not aiohttp: a
tunnel handshake waits for two KME requests, and aiohttp's per-request machinery
(cookies, redirects, compression, tracing) cost about twice the client CPU of the
whole request (benchmarks/README.md, handshake latency).

Errors name the KME URL and what went wrong; they never contain key bytes, and no
answer body is ever echoed (it might hold keys).

The KME is authenticated as *this site's* KME, not as any server the TLS CA signed:
with `kme_id` set, the TLS handshake itself fails unless the server certificate names
that KME (its subject commonName or a DNS subjectAltName), so a KME of another site
under the same CA is refused before a request is sent. TLS 1.3 is the minimum unless
the caller allows 1.2. Hybrid key exchange (X25519MLKEM768) is used when the linked
OpenSSL offers it (3.5 and later put it first in their default groups); Python's ssl
can neither set nor report groups before 3.13, so `tls_info()` says what is known.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from qkd.common.bounded import BoundedSet
from qkd.common.errors import QkdError
from qkd.common.log import get_logger
from qkd.etsi014 import messages as etsi014
from qkd.etsi014.constants import (
    API_PREFIX,
    BITS_PER_BYTE,
    DEC_KEYS,
    ENC_KEYS,
    HYBRID_GROUP,
    MAX_ANSWER_BYTES,
    SEEN_KEY_IDS,
    SERVER_ERROR,
    STATUS,
)
from qkd.etsi014.messages import QkdKey, SchemaError

__all__ = [
    "EtsiClient",
    "KmeError",
    "KmeNoKey",
    "KmeProtocolError",
    "KmeRejected",
    "KmeUnavailable",
    "QkdKey",
]

log = get_logger("qkd.etsi014.client")

# MAX_ANSWER_BYTES: far above any sane Key container, low enough that a broken or
# hostile KME cannot make a gateway buffer without limit. SEEN_KEY_IDS: ~10 MB at the
# limit.
TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def hybrid_group_offered() -> bool:
    """Whether the linked OpenSSL offers the hybrid ML-KEM group by default (3.5+)."""
    return ssl.OPENSSL_VERSION_INFO[:2] >= (3, 5)


def certificate_names(cert: dict[str, Any]) -> list[str]:
    """The names a peer certificate (as `getpeercert()` gives it) can be pinned on:
    subject commonNames and DNS subjectAltNames."""
    names = [value for rdn in cert.get("subject", ()) for key, value in rdn
             if key == "commonName"]
    names += [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    return names


def _checked_sslobject(kme_id: str | None, sink: dict[str, Any]) -> type[ssl.SSLObject]:
    """An SSLObject class that, once the handshake with the KME is done, refuses it
    unless the verified server certificate names `kme_id` (None: no pinning), and
    notes what was negotiated in `sink` (for /status)."""

    class CheckedSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()  # raises SSLWantReadError until the handshake is done
            names = certificate_names(self.getpeercert() or {})
            if kme_id is not None and kme_id not in names:
                shown = ", ".join(_clean(n, 64) for n in names[:4]) or "no name"
                raise ssl.SSLCertVerificationError(
                    f"server certificate is for {shown}, not this site's KME {kme_id!r} "
                    "(fix: point [kme] url at this site's KME, or set [kme] id to the "
                    "name in its certificate)")
            cipher = self.cipher()
            group = getattr(self, "group", None)  # newer Pythons: the negotiated group
            sink.clear()
            sink.update(version=self.version(), cipher=cipher[0] if cipher else None,
                        peer=names[0] if names else None,
                        group=group() if callable(group) else None)

    return CheckedSSLObject


class KmeError(QkdError):
    """Base of every KME failure; the message names the KME URL."""


class KmeUnavailable(KmeError):
    """Cannot talk to the KME: connection refused, timeout, TLS failure, 5xx."""


class KmeNoKey(KmeError):
    """The KME has no key to deliver right now (ETSI 503 with that meaning)."""


class KmeRejected(KmeError):
    """The KME refused the request (4xx); `status` and the KME's `message`."""

    def __init__(self, text: str, status: int, message: str) -> None:
        super().__init__(text)
        self.status = status
        self.message = message


class KmeProtocolError(KmeError):
    """The KME's answer is malformed or does not match the request."""


def _clean(text: str, limit: int = 300) -> str:
    """A KME-supplied message made safe for one log line."""
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[:limit] + "..."


MAX_HEADER_BYTES = 64 * 1024  # the whole status line and header block of an answer
IDEMPOTENT = frozenset({"GET", "HEAD"})


class _Stale(Exception):
    """A kept-alive connection ended before any byte of the answer to a request sent
    on it: the KME closed it meanwhile, or took the request and hung up."""


class _Http1:
    """HTTP/1.1 over TLS to one KME, with keep-alive: each connection carries one
    request at a time, idle ones are kept for the next request (at most `limit`
    connections). Lean on purpose (a handshake waits for two requests): no
    redirects, cookies, compression or proxies, none of which a KME needs.

    Answers are framed by Content-Length, chunked transfer coding, or the end of the
    connection, never more than `max_body` bytes. Idle connections the KME closed are
    dropped before use. A request whose kept-alive connection ends before any answer
    is sent again on a new one only if it is idempotent (RFC 9112 9.3.1): a POST
    might have been acted on."""

    def __init__(self, host: str, port: int, authority: str, context: ssl.SSLContext,
                 limit: int, max_body: int) -> None:
        self.host, self.port, self.authority = host, port, authority
        self.context = context
        self.max_body = max_body
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(limit)
        self._open: set[asyncio.StreamWriter] = set()

    async def request(self, method: str, target: str, body: bytes | None) -> tuple[int, bytes]:
        head = [f"{method} {target} HTTP/1.1", f"Host: {self.authority}",
                "Accept: application/json"]
        if body is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        wire = ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + (body or b"")
        async with self._slots:
            for attempt in range(2):
                conn = self._take_idle()
                reused = conn is not None
                if conn is None:
                    conn = await self._connect()
                try:
                    status, raw, keep = await self._exchange(conn, wire, method)
                except _Stale:
                    self._drop(conn)
                    if reused and attempt == 0 and method in IDEMPOTENT:
                        continue
                    raise ConnectionResetError("the KME closed the connection without "
                                               "answering") from None
                except BaseException:
                    self._drop(conn)
                    raise
                if keep:
                    self._idle.append(conn)
                else:
                    self._drop(conn)
                return status, raw
        raise AssertionError("unreachable")

    def _take_idle(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A kept-alive connection the KME has not closed meanwhile (an idle timeout),
        or None."""
        while self._idle:
            conn = self._idle.pop()
            if not conn[0].at_eof() and not conn[1].transport.is_closing():
                return conn
            self._drop(conn)
        return None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(
            self.host, self.port, ssl=self.context, server_hostname=self.host,
            limit=MAX_HEADER_BYTES)
        self._open.add(writer)
        return reader, writer

    def _drop(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        writer = conn[1]
        self._open.discard(writer)
        writer.transport.abort()

    async def _exchange(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                        wire: bytes, method: str) -> tuple[int, bytes, bool]:
        reader, writer = conn
        writer.write(wire)
        first = True
        while True:
            try:
                block = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if first and not exc.partial:
                    raise _Stale from None
                raise KmeProtocolError("the answer ends inside its header") from None
            except asyncio.LimitOverrunError:
                raise KmeProtocolError(f"answer header larger than {MAX_HEADER_BYTES} "
                                       "bytes") from None
            except ConnectionResetError:
                if first:
                    raise _Stale from None
                raise
            first = False
            version, status, headers = _parse_head(block)
            if 100 <= status < 200:
                continue  # an interim answer (we never ask for one): the real one follows
            break
        connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        keep = version == "HTTP/1.1" and "close" not in connection
        coding = headers.get("transfer-encoding")
        if method == "HEAD" or status in (204, 304):
            return status, b"", keep
        if coding is not None:
            if coding.strip().lower() != "chunked":
                raise KmeProtocolError(f"unsupported transfer coding {_clean(coding, 40)!r}")
            return status, await self._read_chunked(reader), keep
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise KmeProtocolError("bad Content-Length")
            size = int(length)
            if size > self.max_body:
                raise KmeProtocolError(f"answer larger than {self.max_body} bytes")
            return status, await self._read_exact(reader, size), keep
        # Neither: the body runs to the end of the connection.
        raw = await reader.read(self.max_body + 1)
        chunks = [raw]
        total = len(raw)
        while raw and total <= self.max_body:
            raw = await reader.read(self.max_body + 1 - total)
            chunks.append(raw)
            total += len(raw)
        if total > self.max_body:
            raise KmeProtocolError(f"answer larger than {self.max_body} bytes")
        return status, b"".join(chunks), False

    @staticmethod
    async def _read_exact(reader: asyncio.StreamReader, size: int) -> bytes:
        try:
            return await reader.readexactly(size)
        except asyncio.IncompleteReadError:
            raise KmeProtocolError("the answer is shorter than its Content-Length"
                                   ) from None

    async def _read_chunked(self, reader: asyncio.StreamReader) -> bytes:
        chunks: list[bytes] = []
        total = 0
        try:
            while True:
                line = await reader.readuntil(b"\r\n")
                size_text = line[:-2].split(b";", 1)[0].strip()
                if not size_text or len(size_text) > 8 or any(
                        c not in b"0123456789abcdefABCDEF" for c in size_text):
                    raise KmeProtocolError("bad chunk size in the answer")
                size = int(size_text, 16)
                if size == 0:
                    break
                total += size
                if total > self.max_body:
                    raise KmeProtocolError(f"answer larger than {self.max_body} bytes")
                chunks.append(await reader.readexactly(size))
                if await reader.readexactly(2) != b"\r\n":
                    raise KmeProtocolError("bad chunk framing in the answer")
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass  # trailer fields: none of them matters here
        except asyncio.IncompleteReadError:
            raise KmeProtocolError("the answer ends inside a chunk") from None
        except asyncio.LimitOverrunError:
            raise KmeProtocolError("bad chunk framing in the answer") from None
        return b"".join(chunks)

    async def close(self) -> None:
        self._idle.clear()
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()


def _parse_head(block: bytes) -> tuple[str, int, dict[str, str]]:
    """(HTTP version, status, {lower-case name: value}) of an answer's header block."""
    try:
        text = block.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise KmeProtocolError("answer header is not text") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or parts[0] not in ("HTTP/1.1", "HTTP/1.0") or not (
            len(parts[1]) == 3 and parts[1].isdigit()):
        raise KmeProtocolError("the answer is not HTTP/1.x")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        name = name.strip().lower()
        if not sep or not name or name != name.strip() or " " in name:
            raise KmeProtocolError("malformed header line in the answer")
        value = value.strip()
        if name in headers:
            if name in ("content-length", "transfer-encoding") and headers[name] != value:
                raise KmeProtocolError(f"conflicting {name} headers in the answer")
            headers[name] = headers[name] + ", " + value
        else:
            headers[name] = value
    if "content-length" in headers and "transfer-encoding" in headers:
        raise KmeProtocolError("answer has both Content-Length and Transfer-Encoding")
    return parts[0], int(parts[1]), headers


class EtsiClient:
    """One KME, one client identity. Use `async with` or call `close()`."""

    def __init__(self, base_url: str, *, ca_file: Path, cert_file: Path, key_file: Path,
                 timeout: float = 5.0, kme_id: str | None = None,
                 min_tls: str = "1.3") -> None:
        """`kme_id`: the KME's own name its certificate must carry (None switches the
        pinning off: any certificate from the CA is accepted). `min_tls`: "1.3" or
        "1.2"."""
        parts = urlsplit(base_url)
        if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"KME URL must be https://host[:port][/prefix], got {base_url!r}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.base_url = base_url.rstrip("/")
        self._timeout = timeout
        self._host = parts.hostname
        try:
            self._port = parts.port or 443
        except ValueError:
            raise ValueError(f"KME URL has a bad port: {base_url!r}") from None
        self._authority = parts.netloc
        if min_tls not in TLS_VERSIONS:
            raise ValueError(f"min_tls must be one of {', '.join(TLS_VERSIONS)}")
        self.kme_id = kme_id
        self._min_tls = TLS_VERSIONS[min_tls]
        self._ssl = self._ssl_context(ca_file, cert_file, key_file)
        self._tls: dict[str, Any] = {}
        self._ssl.sslobject_class = _checked_sslobject(kme_id, self._tls)
        self._http: _Http1 | None = None
        self._seen = BoundedSet(SEEN_KEY_IDS)

    def __repr__(self) -> str:
        return f"EtsiClient({self.base_url!r})"

    def _ssl_context(self, ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
        # cafile given => only that CA is trusted, not the system store.
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise KmeError(f"KME {self.base_url}: cannot load CA file {str(ca_file)!r} "
                           f"({exc})") from None
        ctx.minimum_version = self._min_tls
        try:
            ctx.load_cert_chain(str(cert_file), str(key_file))
        except (OSError, ssl.SSLError) as exc:
            raise KmeError(f"KME {self.base_url}: cannot load client certificate "
                           f"{str(cert_file)!r} / key {str(key_file)!r} ({exc})") from None
        return ctx

    # ---------------------------------------------------------------- lifecycle

    def _transport(self) -> _Http1:
        # Created lazily: its connections and semaphore belong to the running loop.
        if self._http is None:
            self._http = _Http1(self._host, self._port, self._authority, self._ssl,
                                limit=16, max_body=MAX_ANSWER_BYTES)
        return self._http

    def tls_info(self) -> dict[str, Any]:
        """What the last connection to the KME negotiated, for /status (no secrets)."""
        group = self._tls.get("group")
        return {
            "kme_id": self.kme_id, "pinned": self.kme_id is not None,
            "min_version": "1.3" if self._min_tls == ssl.TLSVersion.TLSv1_3 else "1.2",
            "version": self._tls.get("version"), "cipher": self._tls.get("cipher"),
            "peer": self._tls.get("peer"),
            "group": group,
            "hybrid_group": (group == HYBRID_GROUP) if group else None,
            "openssl": ssl.OPENSSL_VERSION,
            "hybrid_group_offered": hybrid_group_offered(),
            "note": (None if group else
                     "Python's ssl does not report the key-exchange group; "
                     + (f"{HYBRID_GROUP} is offered first by this OpenSSL"
                        if hybrid_group_offered() else
                        "this OpenSSL offers no ML-KEM group, so the exchange is classical "
                        "(ECDHE)")),
        }

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def __aenter__(self) -> EtsiClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # ----------------------------------------------------------------- transport

    def _url(self, sae_id: str, what: str) -> str:
        if not etsi014.is_valid_id(sae_id):
            raise ValueError(f"invalid SAE ID {sae_id!r}")
        return f"{self.base_url}{API_PREFIX}/{sae_id}/{what}"

    async def _call(self, method: str, url: str, body: dict[str, Any] | None) -> Any:
        """Send one request; the parsed JSON of a 200 answer, else the matching KmeError."""
        data = etsi014.dumps(body) if body is not None else None
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            async with asyncio.timeout(self._timeout):
                status, raw = await self._transport().request(method, target, data)
        except KmeProtocolError as exc:  # the framing; the transport names no URL
            raise KmeProtocolError(f"KME {self.base_url}: {exc}") from None
        except TimeoutError:
            raise KmeUnavailable(f"KME {self.base_url}: no answer within "
                                 f"{self._timeout} s") from None
        except (ssl.SSLError, OSError) as exc:
            raise KmeUnavailable(f"KME {self.base_url}: {type(exc).__name__}: "
                                 f"{_clean(str(exc))}") from None

        if status == 200:
            try:
                return etsi014.loads_strict(raw)
            except (ValueError, RecursionError):
                raise KmeProtocolError(f"KME {self.base_url}: answer is not valid JSON"
                                       ) from None
        message = self._error_message(raw)
        where = f"KME {self.base_url}: {method} {urlsplit(url).path}"
        if status == SERVER_ERROR and etsi014.NO_KEY_PATTERN.search(message):
            raise KmeNoKey(f"{where}: no key available ({message})")
        if 500 <= status < 600:
            raise KmeUnavailable(f"{where}: server error {status} ({message})")
        if 400 <= status < 500:
            raise KmeRejected(f"{where}: refused with {status} ({message})", status, message)
        raise KmeProtocolError(f"{where}: unexpected HTTP status {status}")

    @staticmethod
    def _error_message(raw: bytes) -> str:
        try:
            message, _details = etsi014.parse_error(etsi014.loads_strict(raw))
        except (ValueError, RecursionError):
            message = ""
        return _clean(message) if message else "no ETSI error message"

    def _check_fresh(self, keys: list[QkdKey]) -> None:
        for k in keys:
            if k.key_id in self._seen:
                raise KmeProtocolError(f"KME {self.base_url}: delivered key ID {k.key_id} "
                                       "again; a key must be delivered once")
        self._seen.update(k.key_id for k in keys)

    # ----------------------------------------------------------------- ETSI 014

    async def status(self, slave_sae_id: str) -> dict[str, Any]:
        """The KME's Status for keys shared with `slave_sae_id` (validated)."""
        obj = await self._call("GET", self._url(slave_sae_id, STATUS), None)
        try:
            return etsi014.parse_status(obj, slave_sae_id)
        except SchemaError as exc:
            raise KmeProtocolError(f"KME {self.base_url}: bad Status: {exc}") from None

    async def get_enc_keys(self, slave_sae_id: str, number: int = 1,
                           size: int = 256) -> list[QkdKey]:
        """New keys shared with `slave_sae_id` (we are the master SAE)."""
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError("number must be a positive integer")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % BITS_PER_BYTE:
            raise ValueError("size must be a positive multiple of 8 bits")
        # POST, not GET: same semantics, and it keeps parameters out of URLs and logs.
        obj = await self._call("POST", self._url(slave_sae_id, ENC_KEYS),
                               etsi014.build_key_request(number, size))
        try:
            keys = etsi014.parse_enc_keys_answer(obj, number, size)
        except SchemaError as exc:
            raise KmeProtocolError(f"KME {self.base_url}: bad enc_keys answer: {exc}"
                                   ) from None
        self._check_fresh(keys)
        log.debug("kme_enc_keys", kme=self.base_url, slave=slave_sae_id,
                  key_ids=[k.key_id for k in keys])
        return keys

    async def get_dec_keys(self, master_sae_id: str, key_ids: list[str], *,
                           size: int | None = None) -> list[QkdKey]:
        """The keys `master_sae_id` obtained under `key_ids` (we are the slave SAE).

        Returns exactly those IDs in the order given. `size` (bits), if known from the
        handshake, is checked too. Malformed or repeated `key_ids` raise ValueError."""
        if not key_ids:
            raise ValueError("key_ids must not be empty")
        wanted = [etsi014.canonical_key_id(k) for k in key_ids]
        if len(set(wanted)) != len(wanted):
            raise ValueError("key_ids contains the same key ID twice")
        if size is not None and (size <= 0 or size % BITS_PER_BYTE):
            raise ValueError("size must be a positive multiple of 8 bits")
        obj = await self._call("POST", self._url(master_sae_id, DEC_KEYS),
                               etsi014.build_key_ids(wanted))
        try:
            keys = etsi014.parse_dec_keys_answer(obj, wanted, size)
        except SchemaError as exc:
            raise KmeProtocolError(f"KME {self.base_url}: bad dec_keys answer: {exc}"
                                   ) from None
        self._check_fresh(keys)
        log.debug("kme_dec_keys", kme=self.base_url, master=master_sae_id,
                  key_ids=[k.key_id for k in keys])
        # Hand back the caller's own spelling of each ID, so equality checks upstream work.
        return [QkdKey(orig, k.key) for orig, k in zip(key_ids, keys, strict=True)]
