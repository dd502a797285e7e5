"""SKIP client for gateways: the same calls as `EtsiClient`, over draft-cisco-skip.

The TLS set-up, KME pinning, answer size cap, error mapping and the replayed-key check
are `EtsiClient`'s; only the paths and the message shapes differ. SKIP hands out one
key per request, so `number` keys cost `number` requests. SKIP has no pool count:
`status()` reports `stored_key_count` as None, and callers must not read that as
"keys available".
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from qkd.etsi014 import messages as etsi014
from qkd.etsi014.client import EtsiClient, KmeProtocolError
from qkd.etsi014.messages import QkdKey, SchemaError
from qkd.skip import messages as skip


class SkipClient(EtsiClient):
    """One SKIP key provider, one client identity. Use `async with` or `close()`."""

    def __repr__(self) -> str:
        return f"SkipClient({self.base_url!r})"

    def _skip_url(self, path: str, remote: str) -> str:
        if not etsi014.is_valid_id(remote):
            raise ValueError(f"invalid remote system ID {remote!r}")
        return f"{self.base_url}{path}?remoteSystemID={quote(remote, safe='')}"

    async def capabilities(self) -> dict[str, Any]:
        obj = await self._call("GET", self.base_url + skip.CAPABILITIES_PATH, None)
        try:
            return skip.parse_capabilities(obj)
        except SchemaError as exc:
            raise KmeProtocolError(f"KME {self.base_url}: bad SKIP capabilities: {exc}"
                                   ) from None

    async def status(self, slave_sae_id: str) -> dict[str, Any]:
        caps = await self.capabilities()
        if slave_sae_id not in caps["remoteSystemID"]:
            raise KmeProtocolError(f"KME {self.base_url}: SKIP capabilities do not list "
                                   f"remote system {slave_sae_id!r}")
        return {"key_size": caps["defaultKeySize"], "min_key_size": caps["minKeySize"],
                "max_key_size": caps["maxKeySize"], "stored_key_count": None,
                "slave_SAE_ID": slave_sae_id, "master_SAE_ID": caps["localSystemID"]}

    async def get_enc_keys(self, slave_sae_id: str, number: int = 1,
                           size: int = 256) -> list[QkdKey]:
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError("number must be a positive integer")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 8:
            raise ValueError("size must be a positive multiple of 8 bits")
        keys: list[QkdKey] = []
        url = self._skip_url(skip.KEY_PATH, slave_sae_id) + f"&size={size}"
        for _ in range(number):
            obj = await self._call("GET", url, None)
            try:
                keys.append(skip.parse_key_answer(obj, size))
            except SchemaError as exc:
                raise KmeProtocolError(f"KME {self.base_url}: bad SKIP key answer: {exc}"
                                       ) from None
        if len({k.key_id for k in keys}) != len(keys):
            raise KmeProtocolError(f"KME {self.base_url}: SKIP gave the same keyId twice")
        self._check_fresh(keys)
        return keys

    async def get_dec_keys(self, master_sae_id: str, key_ids: list[str], *,
                           size: int | None = None) -> list[QkdKey]:
        if not key_ids:
            raise ValueError("key_ids must not be empty")
        wanted = [etsi014.canonical_key_id(k) for k in key_ids]
        if len(set(wanted)) != len(wanted):
            raise ValueError("key_ids contains the same key ID twice")
        keys: list[QkdKey] = []
        for key_id in wanted:
            url = self._skip_url(f"{skip.KEY_PATH}/{skip.skip_key_id(key_id)}",
                                 master_sae_id)
            obj = await self._call("GET", url, None)
            try:
                keys.append(skip.parse_key_answer(obj, size, expected_id=key_id))
            except SchemaError as exc:
                raise KmeProtocolError(f"KME {self.base_url}: bad SKIP key answer: {exc}"
                                       ) from None
        self._check_fresh(keys)
        return [QkdKey(orig, k.key) for orig, k in zip(key_ids, keys, strict=True)]
