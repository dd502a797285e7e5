"""`--netns auto|on|off` of `qkdgw demo --topology`: when namespaces are used, and the
errors when they cannot be (gateway.tools.network_demo.netns_choice)."""

from __future__ import annotations

import os
import shutil

import pytest

from gateway.tools import network_demo
from gateway.tools.network_demo import netns_choice
from qkd.common.errors import UserError


def test_off_never_uses_namespaces() -> None:
    assert netns_choice("off", None) == (False, "--netns off")


def test_not_root_auto_falls_back_and_on_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(network_demo.os, "geteuid", lambda: 1000)
    assert netns_choice("auto", None) == (False, "not running as root")
    with pytest.raises(UserError, match="--netns on: not running as root; run as root "
                       r"with iproute2, or use --netns off \(loopback\)"):
        netns_choice("on", None)


def test_missing_ip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(network_demo.os, "geteuid", lambda: 0)
    monkeypatch.setattr(network_demo.shutil, "which", lambda _name: None)
    assert netns_choice("auto", None) == (False, "the ip command (iproute2) is missing")
    with pytest.raises(UserError, match="iproute2"):
        netns_choice("on", None)


def test_compromise_stays_on_loopback() -> None:
    assert netns_choice("auto", "site-b") == (False,
                                             "--compromise records the hops on loopback")
    with pytest.raises(UserError, match="--compromise records the hops on loopback"):
        netns_choice("on", "site-b")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                    reason="not root, or ip not installed (iproute2)")
def test_root_with_ip_uses_namespaces() -> None:
    assert netns_choice("auto", None) == (True, "root and ip netns work")
    assert netns_choice("on", None)[0] is True


def test_address_range_skips_one_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    import ipaddress
    import json

    def fake_ip(*args: str, check: bool = True) -> str:
        if "addr" in args:  # this host already has 10.201.0.5/24
            return json.dumps([{"addr_info": [{"local": "10.201.0.5", "prefixlen": 24}]}])
        return json.dumps([{"dst": "default"}, {"dst": "10.201.1.0/24"}])

    monkeypatch.setattr(network_demo, "_ip", fake_ip)
    assert network_demo._free_net() == ipaddress.IPv4Network("10.201.2.0/24")
    # Control: with nothing in use the documented range is taken.
    monkeypatch.setattr(network_demo, "_ip", lambda *a, check=True: "[]")
    assert network_demo._free_net() == ipaddress.IPv4Network("10.201.0.0/24")


def test_address_range_skips_a_whole_bridge_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """podman's default bridge (10.88.0.1/16) is on CI machines; a /16 in use moves the
    search to the next second octet."""
    import ipaddress
    import json

    def fake_ip(*args: str, check: bool = True) -> str:
        if "addr" in args:
            return json.dumps([{"addr_info": [{"local": "10.88.0.1", "prefixlen": 16},
                                              {"local": "10.201.0.1", "prefixlen": 16}]}])
        return "[]"

    monkeypatch.setattr(network_demo, "_ip", fake_ip)
    assert network_demo._free_net() == ipaddress.IPv4Network("10.202.0.0/24")
