"""`qkdgw demo --topology line --netns on` (issue 11): every site in a network namespace
of its own, joined by veth pairs; checked traffic, and nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="not root, or ip not installed (iproute2; a failure under QKDGW_REQUIRE_TOOLS=1)")


def _leftovers(pid: int) -> tuple[list[str], list[str]]:
    """The namespaces and host links of the demo with this pid (qkdgw-<pid>-...), so a
    demo running beside this test does not count."""
    tag = f"qkdgw-{pid}-"
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                        check=True).stdout.split("\n")
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                           check=True).stdout.split("\n")
    return ([n for n in ns if n.startswith(tag)], [x for x in links if tag in x])


def test_demo_line_in_namespaces_carries_traffic_and_cleans_up() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "demo", "--topology",
                             "line", "--netns", "on", "--streams", "2", "--stream-mb", "1",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:] + out[-2000:]
    s = json.loads(out)
    assert "Traceback" not in err, err[-3000:]  # e.g. the forwarder's connections
    assert s["ok"] is True and s["tunnel_mode"] == "hybrid"
    assert s["bytes_verified"] == s["bytes_sent"] == 2 * 1024 * 1024
    assert s["relays_delivered"] >= 1 and s["relays_failed"] == 0
    ns = s["netns"]
    # Three sites and the bridge, named after the demo's pid (what _leftovers looks for).
    assert sorted(ns["namespaces"]) == [f"qkdgw-{proc.pid}-{x}" for x in
                                        ("br", "site-a", "site-b", "site-c")]
    assert sorted(ns["addresses"]) == ["site-a", "site-b", "site-c"]
    assert len(set(ns["addresses"].values())) == 3
    veth = ns["veth_bytes"]
    # The traffic went over the veths: into A (from the demo) and on to C (the tunnel,
    # sink in C's namespace) ...
    assert veth["site-a"]["rx"] > 2 * 1024 * 1024 and veth["site-a"]["tx"] > 2 * 1024 * 1024
    assert veth["site-c"]["rx"] > 2 * 1024 * 1024
    # ... and the trusted node B's only traffic was the relay (no tunnel through it).
    assert 0 < veth["site-b"]["tx"] < 256 * 1024
    assert _leftovers(proc.pid) == ([], [])


def test_netns_on_refused_with_compromise() -> None:
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "demo", "--topology",
                           "line", "--netns", "on", "--compromise", "site-b", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:] + proc.stdout[-2000:]
    assert "--netns on: --compromise records the hops on loopback" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_ctrl_c_mid_traffic_removes_the_namespaces() -> None:
    # SIGINT as a terminal's Ctrl-C sends it (a child of a non-interactive shell may
    # inherit SIGINT ignored: reset it first).
    reset = "import os,signal,sys; signal.signal(signal.SIGINT, signal.SIG_DFL); " \
            "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    proc = subprocess.Popen([sys.executable, "-c", reset, "-m", "gateway.cli", "demo",
                             "--topology", "line", "--netns", "on", "--streams", "2",
                             "--stream-mb", "1", "--duration", "120"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the traffic rounds have started
            if "round 1:" in line:
                break
        else:
            raise AssertionError("the demo ended before its first traffic round")
        # Positive control: the namespaces are there while the demo runs.
        assert len(_leftovers(proc.pid)[0]) == 4
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _leftovers(proc.pid) == ([], [])


@pytest.mark.parametrize("fail_after", [3, 9, 24])
def test_a_failed_setup_removes_what_it_had_created(monkeypatch: pytest.MonkeyPatch,
                                                    fail_after: int) -> None:
    """up() failing part-way (the n-th ip command refused; at 24 the host veth exists
    already): down() removes what had been created, so an error during setup leaves
    nothing behind either."""
    from gateway.tools import network_demo
    from gateway.tools.testbed import TestbedError

    real_ip = network_demo._ip
    calls: list[tuple[str, ...]] = []

    def flaky_ip(*args: str, check: bool = True) -> str:
        if args[:2] != ("-4", "-j"):  # _free_net's reads do not count
            calls.append(args)
            if len(calls) == fail_after:
                raise TestbedError(f"ip {' '.join(args)} failed: refused by the test")
        return real_ip(*args, check=check)

    monkeypatch.setattr(network_demo, "_ip", flaky_ip)
    ns = network_demo.Netns(["site-a", "site-b", "site-c"])
    try:
        with pytest.raises(TestbedError, match="refused by the test"):
            ns.up()
        # Positive control: something was created before the failure.
        assert _leftovers(os.getpid())[0]
    finally:
        ns.down()
    assert _leftovers(os.getpid()) == ([], [])
