"""Small aiohttp helpers shared by the KME's ETSI 014 and SKIP handlers."""

from __future__ import annotations

from aiohttp import web

from qkd.etsi014 import messages as etsi014
from qkd.etsi014.messages import KeyRequest, Limits


def query_lists(request: web.Request) -> dict[str, list[str]]:
    """Every query parameter with all its values, so a repeated one can be refused."""
    return {name: request.query.getall(name) for name in request.query}


async def enc_keys_request(request: web.Request, limits: Limits) -> KeyRequest:
    """An enc_keys request's number and size, from the query (GET) or the body (POST)."""
    if request.method == "GET":
        return etsi014.parse_enc_keys_get(query_lists(request), limits)
    return etsi014.parse_enc_keys_post(await request.read(), limits)


async def dec_keys_request(request: web.Request, limits: Limits) -> list[str]:
    """A dec_keys request's key IDs, from the query (GET) or the body (POST)."""
    if request.method == "GET":
        return etsi014.parse_dec_keys_get(query_lists(request))
    return etsi014.parse_dec_keys_post(await request.read(), limits)
