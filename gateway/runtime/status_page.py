"""The admin endpoint's status page (`/`): one self-contained HTML file
(gateway/runtime/static/status.html, package data) with inline style and script, no external
asset, so it works on air-gapped sites. It polls `/status` and draws the pool level of
the last minutes as inline SVG.

The Content-Security-Policy allows exactly the page's own inline script and style (by
hash) and requests to its own origin: nothing else loads or runs, even if a status
field were ever to carry markup (the script only sets textContent).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources


@functools.cache
def status_page_html() -> str:
    return resources.files("gateway.runtime").joinpath("static/status.html").read_text("utf-8")


def _hashes(tag: str, html: str) -> list[str]:
    out = []
    for body in re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S):
        digest = hashlib.sha256(body.encode("utf-8")).digest()
        out.append(f"'sha256-{base64.b64encode(digest).decode()}'")
    return out


def _csp() -> str:
    html = status_page_html()
    return ("default-src 'none'; "
            f"script-src {' '.join(_hashes('script', html))}; "
            f"style-src {' '.join(_hashes('style', html))}; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


PAGE_CSP = _csp()

__all__ = ["PAGE_CSP", "status_page_html"]
