"""Suite-wide hook: in CI a test skipped for a missing system tool is a failure.

The deploy tests skip where promtool, prometheus or chromium is not installed, the
network-namespace tests where `ip` is missing or the user is not root (a developer's
laptop). `.ci/run` runs as root, installs them and sets QKDGW_REQUIRE_TOOLS=1, so such a
skip there means a broken install, not a passing suite.
"""

from __future__ import annotations

import os

import pytest

REQUIRED_TOOLS = ("promtool", "prometheus", "chromium", "ip")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and os.environ.get("QKDGW_REQUIRE_TOOLS") == "1"):
        return
    reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
    if any(f"{tool} not installed" in reason for tool in REQUIRED_TOOLS):
        report.outcome = "failed"
        report.longrepr = f"required tool missing in CI: {reason}"
