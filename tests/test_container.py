"""The container image: builds with podman, runs `qkdgw` as uid 10001, makes a PKI in a
mounted directory, and carries traffic between both sites in one pod.

Slow (builds an image; the first run also makes the local Debian base image with
debootstrap): `pytest -m slow tests/test_container.py`. Skipped only where podman is
not installed. The build goes through deploy/build-image.sh, so it uses the same base
image, CA bundle and package index settings as a person building by hand; see
deploy/README.md. Set QKDGW_TEST_BASE_IMAGE to build from another base (for example
docker.io/library/python:3.11-slim-bookworm where a registry is reachable).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
IMAGE = os.environ.get("QKDGW_TEST_IMAGE", "localhost/qkdgw:test")
UID = 10001

NO_PODMAN = "podman is not installed (apt-get install -y podman runc catatonit debootstrap)"
requires_podman = pytest.mark.skipif(shutil.which("podman") is None, reason=NO_PODMAN)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(DEPLOY / "containers.conf"))
    env["IMAGE"] = IMAGE
    if "QKDGW_TEST_BASE_IMAGE" in os.environ:
        env["BASE_IMAGE"] = os.environ["QKDGW_TEST_BASE_IMAGE"]
    return env


def _run(args: list[str], timeout: float = 120, check: bool = True,
         extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env=_env() | (extra_env or {}))
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}\n"
                    f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def _podman(*args: str, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["podman", *args], timeout=timeout, check=check)


def _chown_for_container(path: Path) -> None:
    """Give PATH to uid 10001 as the containers see it (rootless: inside the userns)."""
    if os.geteuid() == 0:
        os.chown(path, UID, UID)
    else:
        _podman("unshare", "chown", f"{UID}:{UID}", str(path))


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    if shutil.which("podman") is None:
        pytest.skip(NO_PODMAN)
    # Builds the local debootstrap base first when it is missing (needs root).
    _run([str(DEPLOY / "build-image.sh")], timeout=1800)
    yield IMAGE
    _podman("rmi", IMAGE, check=False)  # only untags when :latest is the same image


@requires_podman
def test_image_config_and_help(image: str) -> None:
    config = json.loads(_podman("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["qkdgw"]
    assert config["Cmd"] == ["--help"]
    assert config["WorkingDir"] == "/var/lib/qkdgw"

    default = _podman("run", "--rm", image)  # CMD ["--help"]
    assert "usage: qkdgw" in default.stdout
    for command in ("pki", "kme", "gateway", "status"):
        assert command in default.stdout

    who = _podman("run", "--rm", "--entrypoint", "sh", image, "-c",
                  "id -u; id -g; test ! -e /run/secrets/ca; test ! -e /wheels; "
                  "test ! -e /opt/qkdgw/bin/pip; echo clean")
    assert who.stdout.split() == [str(UID), str(UID), "clean"]


@requires_podman
def test_pki_init_into_a_mounted_directory(image: str, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    _chown_for_container(pki)
    out = _podman("run", "--rm", "--network", "none", "-v", f"{pki}:/var/lib/qkdgw/pki",
                  image, "pki", "init", "--out", "/var/lib/qkdgw/pki",
                  "--site", "site-a", "--site", "site-b")
    assert "Wrote a new PKI" in out.stdout

    expected = ["ca.crt", "ca.key", "tls-ca.crt", "tls-ca.key", "link-secret.key"]
    for site in ("site-a", "site-b"):
        for name in ("gateway", "kme-server", "sae-client"):
            expected += [f"{site}/{name}.crt", f"{site}/{name}.key"]
    for rel in expected:
        assert (pki / rel).is_file(), rel
    for key in pki.rglob("*.key"):
        assert key.stat().st_mode & 0o777 == 0o600, key
        if os.geteuid() == 0:  # rootless: the owner is a subordinate uid on the host
            assert key.stat().st_uid == UID, key

    # The keys are readable by the user the image runs as: a second container (as
    # uid 10001) loads the gateway key the way the gateway does.
    check = _podman("run", "--rm", "--network", "none",
                    "-v", f"{pki}:/var/lib/qkdgw/pki:ro", "--entrypoint", "python3", image,
                    "-c", "from cryptography.hazmat.primitives.serialization import "
                          "load_pem_private_key as load; "
                          "load(open('/var/lib/qkdgw/pki/site-a/gateway.key','rb').read(), None); "
                          "print('key ok')")
    assert check.stdout.strip() == "key ok"


@requires_podman
def test_two_sites_in_one_pod(image: str, tmp_path: Path) -> None:
    """deploy/run-pod.sh: both KMEs, both gateways and the two apps in one pod; the
    tunnel comes up hybrid (ML-KEM + QKD) and a 4 MiB transfer is checked end to end."""
    pod = f"qkdgw-test-{uuid.uuid4().hex[:8]}"
    demo = tmp_path / "demo"
    env = {"QKDGW_DEMO_DIR": str(demo), "QKDGW_POD_NAME": pod, "VERIFY_TIMEOUT": "120"}
    script = str(DEPLOY / "run-pod.sh")
    try:
        _run([script, "up"], timeout=300, extra_env=env)
        verify = _run([script, "verify"], timeout=300, check=False, extra_env=env)
        out = verify.stdout
        ok = verify.returncode == 0 and all(
            line in out for line in ("peer site-b: tunnel up", "peer site-a: tunnel up",
                                     "mode             hybrid", "ok: 4194304 bytes")
        ) and "restarted" not in out
        if not ok:
            logs = _run([script, "logs"], timeout=120, check=False, extra_env=env)
            pytest.fail(f"run-pod.sh verify exited {verify.returncode}\n{out}\n"
                        f"{verify.stderr[-3000:]}\ncontainer logs:\n{logs.stdout[-8000:]}")
    finally:
        _run([script, "down"], timeout=300, check=False, extra_env=env)
