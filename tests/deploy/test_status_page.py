"""The gateway admin endpoint's status page (`/`) in headless Chromium (Debian's
`chromium`, driven by Playwright): it renders from a live two-site testbed on the BB84
link, its numbers are those of the `/status` answer it rendered, it keeps updating, it
loads nothing from elsewhere, and status text is shown as text (never as markup). A
screenshot is kept under artifacts/ (ignored by git) and the test's tmp dir."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qkd.common.budget import format_duration
from tests.support.ops_testbed import ROOT, LiveSites

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed "
                                "(Debian: apt-get install chromium)")
sync_api = pytest.importorskip("playwright.sync_api")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def _text(page: Any, sel: str) -> str:
    return str(page.inner_text(sel)).strip()


def _duration(value: Any) -> str:
    if value == "inf":
        return "never"
    return format_duration(float(value)) if isinstance(value, int | float) else "unknown"


def test_page_renders_the_status_it_fetched(browser: Any, live_sites: LiveSites,
                                            tmp_path: Path) -> None:
    port = live_sites.bed.ports["admin-site-a"]
    origin = f"http://127.0.0.1:{port}"
    with urllib.request.urlopen(origin + "/", timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/html")
        csp = resp.headers["Content-Security-Policy"]
        html = resp.read().decode()
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "<script src" not in html and "<link" not in html and "http" not in html.split(
        "<script>", 1)[0].replace('http-equiv', '')

    page = browser.new_page(viewport={"width": 1100, "height": 800})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    seen: list[dict[str, Any]] = []

    def capture(route: Any) -> None:
        resp = route.fetch()
        seen.append(json.loads(resp.text()))
        route.fulfill(response=resp)

    page.route("**/status", capture)
    # A long interval: exactly one /status answer is on screen while we compare.
    page.goto(origin + "/?interval=3600")
    page.wait_for_selector("body[data-updates='1']", timeout=15_000)
    s = seen[-1]
    peer, budget = s["peer"], s["budget"]
    assert _text(page, "#title") == f"qkdgw {s['site_id']} \u2192 {peer['site_id']}"
    assert _text(page, "#tunnel") == "up" == peer["tunnel"]
    assert _text(page, "#epoch") == str(peer["epoch"])
    assert _text(page, "#auth").startswith(peer["auth_mode"])
    assert _text(page, "#mode") == peer["mode"] == "hybrid"
    assert _text(page, "#psk-epoch").startswith(str(peer["psk"]["current_epoch"]))
    pool = budget["pool"]
    assert _text(page, "#pool-level") == f"{round(pool['level'])} keys"
    assert _text(page, "#pool-words") == pool["words"]
    assert _text(page, "#forecast") == _duration(pool["seconds_to_empty"])
    link = budget["link"]
    assert _text(page, "#qber") == f"{100 * link['last_qber']:.2f} %"
    assert float(_text(page, "#keyrate")) == float(link["secret_key_rate_bps"])
    assert _text(page, "#pad").startswith(f"{link['auth_pad_bytes']} bytes")
    assert int(page.get_attribute("#chart", "data-points")) == len(budget["history"]) > 0
    assert page.locator("#chart polyline").count() == 1
    assert not page.is_visible("#banner")  # hybrid: no degraded banner
    shot = page.screenshot(full_page=True)
    (tmp_path / "status-page.png").write_bytes(shot)
    art = ROOT / "artifacts"
    art.mkdir(exist_ok=True)
    (art / "status-page.png").write_bytes(shot)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000
    assert errors == [], errors
    assert requests and all(u.startswith(origin + "/") for u in requests), requests
    page.close()


def test_page_keeps_updating(browser: Any, live_sites: LiveSites) -> None:
    port = live_sites.bed.ports["admin-site-a"]
    page = browser.new_page()
    answers: list[dict[str, Any]] = []
    page.on("response", lambda r: answers.append(r) if r.url.endswith("/status") else None)
    page.goto(f"http://127.0.0.1:{port}/?interval=0.3")
    page.wait_for_selector("body[data-updates='1']", timeout=15_000)
    first = _text(page, "#subtitle")
    # (Polled from here: the page's CSP forbids the string eval wait_for_function uses.)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and int(page.get_attribute("body", "data-updates")) < 5:
        page.wait_for_timeout(100)
    assert int(page.get_attribute("body", "data-updates")) >= 5
    # The uptime in the subtitle moved on with the gateway's.
    while time.monotonic() < deadline and _text(page, "#subtitle") == first:
        page.wait_for_timeout(100)
    assert _text(page, "#subtitle") != first
    assert len(answers) >= 5
    assert _text(page, "#tunnel") == "up"
    page.close()


def test_degraded_and_hostile_status_render_as_text(browser: Any, live_sites: LiveSites) -> None:
    """A synthetic /status (served to the page in place of the real one): degraded mode
    shows the banner, a falling pool its forecast, and markup in a field stays text."""
    port = live_sites.bed.ports["admin-site-a"]
    real = live_sites.bed.status("site-a")
    fake = json.loads(json.dumps(real))
    fake["site_id"] = '<img src=x onerror="document.body.dataset.pwned=1">'
    fake["peer"].update(mode="mlkem-only", degraded=True, local_kme="no-key",
                        peer_kme="no-key")
    fake["budget"]["pool"].update(level=612, net_rate=-3.0, trend="falling",
                                  seconds_to_empty=204.0,
                                  words="pool 612 keys, falling 3/s, dry in ~3 min")
    page = browser.new_page()
    page.route("**/status", lambda route: route.fulfill(
        status=200, content_type="application/json", body=json.dumps(fake)))
    page.goto(f"http://127.0.0.1:{port}/?interval=3600")
    page.wait_for_selector("body[data-updates='1']", timeout=15_000)
    assert _text(page, "#mode") == "DEGRADED"
    assert page.is_visible("#banner") and "ML-KEM alone" in _text(page, "#banner")
    assert _text(page, "#pool-words") == "pool 612 keys, falling 3/s, dry in ~3 min"
    assert _text(page, "#forecast") == "~3 min"
    assert "bad" in (page.get_attribute("#forecast", "class") or "")
    assert fake["site_id"] in _text(page, "#title")  # shown literally ...
    assert page.locator("img").count() == 0  # ... never parsed
    assert page.evaluate("document.body.dataset.pwned") is None
    # Positive control: the same string given to innerHTML does make an element.
    page.evaluate("(s) => { const d = document.createElement('div'); d.innerHTML = s; "
                  "document.body.appendChild(d); }", fake["site_id"])
    assert page.locator("img").count() == 1
    page.close()
