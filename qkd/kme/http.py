"""Small aiohttp helpers shared by the KME's ETSI 014 and SKIP handlers."""

from __future__ import annotations

from aiohttp import web


def query_lists(request: web.Request) -> dict[str, list[str]]:
    """Every query parameter with all its values, so a repeated one can be refused."""
    return {name: request.query.getall(name) for name in request.query}
