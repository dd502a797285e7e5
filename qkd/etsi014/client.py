"""ETSI GS QKD 014 client used by gateways (the SAE side), over HTTPS with a client cert.

Security-critical: whatever a KME answers decides which key the tunnel mixes in, so
every answer is validated strictly by `qkd.etsi014.messages` (exact count, exactly the asked-for
key IDs, no duplicates, exact key length, canonical UUIDs, strict base64 and JSON) and
anything else raises `KmeProtocolError`. This client also remembers the key IDs it was
recently given and refuses a KME that hands one out again.

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

import ssl
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import aiohttp

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
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        if min_tls not in TLS_VERSIONS:
            raise ValueError(f"min_tls must be one of {', '.join(TLS_VERSIONS)}")
        self.kme_id = kme_id
        self._min_tls = TLS_VERSIONS[min_tls]
        self._ssl = self._ssl_context(ca_file, cert_file, key_file)
        self._tls: dict[str, Any] = {}
        self._ssl.sslobject_class = _checked_sslobject(kme_id, self._tls)
        self._session: aiohttp.ClientSession | None = None
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

    def _get_session(self) -> aiohttp.ClientSession:
        # Created lazily: aiohttp sessions belong to the running loop. No await between
        # the check and the assignment, so concurrent first calls share one session.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=16),
                timeout=self._timeout,
            )
        return self._session

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
        if self._session is not None:
            await self._session.close()
            self._session = None

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
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._get_session().request(
                method, url, data=data, headers=headers, allow_redirects=False,
            ) as resp:
                status = resp.status
                raw = await self._read(resp)
        except KmeError:
            raise
        except TimeoutError:
            raise KmeUnavailable(f"KME {self.base_url}: no answer within "
                                 f"{self._timeout.total} s") from None
        except (aiohttp.ClientError, ssl.SSLError, OSError) as exc:
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

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        chunks: list[bytes] = []
        total = 0
        async for chunk in resp.content.iter_chunked(65536):
            total += len(chunk)
            if total > MAX_ANSWER_BYTES:
                raise KmeProtocolError(f"KME {self.base_url}: answer larger than "
                                       f"{MAX_ANSWER_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

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
