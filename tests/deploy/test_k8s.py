"""deploy/k8s/: the per-site manifests are current (rendered from configs/ by
deploy/k8s/render.py), valid against the Kubernetes schemas offline
(kubernetes-validate, strict), and say what the design asks: KME StatefulSet with a
PVC, gateway sidecar beside an app, PKI Secrets mounted 0400 and handed to uid 10001 by
an init container (whose script is run here on a real Secret-volume layout, after which
the project's own loaders accept the keys), configs as ConfigMaps the real loaders parse,
probes on /readyz and /healthz, a Service for the tunnel, and NetworkPolicies that let
only the tunnel, the link, DNS and Prometheus through."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.ops_testbed import ROOT

kv = pytest.importorskip("kubernetes_validate")
K8S = ROOT / "deploy" / "k8s"
VERSION = "1.30.0"


def _render_module() -> Any:
    spec = importlib.util.spec_from_file_location("k8s_render", K8S / "render.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _docs(site: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / f"{site}.yaml").read_text()) if d]


def _by(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_manifests_are_rendered_from_the_current_configs() -> None:
    r = subprocess.run([sys.executable, str(K8S / "render.py"), "--check"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("site", ["site-a", "site-b"])
def test_manifests_validate_against_the_schemas(site: str) -> None:
    docs = _docs(site)
    assert len(docs) >= 12
    for doc in docs:
        kv.validate(doc, VERSION, strict=True)


def test_validation_catches_a_broken_manifest() -> None:
    """Positive control: a wrong type and an unknown field are both rejected."""
    sts = _by(_docs("site-a"), "StatefulSet", "kme")
    sts["spec"]["replicas"] = "one"
    with pytest.raises(kv.ValidationError):
        kv.validate(sts, VERSION, strict=True)
    svc = _by(_docs("site-b"), "Service", "tunnel")
    svc["spec"]["publishNotReadyAdresses"] = True  # misspelt
    with pytest.raises(kv.ValidationError):
        kv.validate(svc, VERSION, strict=True)


@pytest.mark.parametrize("site", ["site-a", "site-b"])
def test_site_layout(site: str) -> None:
    docs = _docs(site)
    ns = f"qkdgw-{site}"
    assert all(d["metadata"].get("namespace", ns) == ns for d in docs)
    sts = _by(docs, "StatefulSet", "kme")
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "state"
    app = _by(docs, "Deployment", "app")
    pod = app["spec"]["template"]["spec"]
    names = [c["name"] for c in pod["containers"]]
    assert "gateway" in names and len(names) == 2  # the sidecar beside the example app
    for workload, admin_cfg in ((sts, "kme-config"), (app, "gateway-config")):
        spec = workload["spec"]["template"]["spec"]
        assert spec["automountServiceAccountToken"] is False
        config = next(iter(_by(docs, "ConfigMap", admin_cfg)["data"].values()))
        admin_port = int(re.search(r'^\[admin\][^\[]*?^listen = "0\.0\.0\.0:(\d+)"', config,
                                   re.M | re.S).group(1))  # type: ignore[union-attr]
        main = next(c for c in spec["containers"] if c["name"] in ("kme", "gateway"))
        assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": admin_port}
        assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": admin_port}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["runAsUser"] == 10001 and sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
        # PKI: Secret mounted 0400, only into the init container that hands it over.
        secret_vols = [v for v in spec["volumes"] if "secret" in v]
        assert len(secret_vols) == 1
        sv = secret_vols[0]
        assert sv["secret"]["defaultMode"] == 0o400
        assert all(i["mode"] == 0o400 for i in sv["secret"]["items"])
        init = spec["initContainers"][0]
        assert sv["name"] in [m["name"] for m in init["volumeMounts"]]
        assert all(sv["name"] not in [m["name"] for m in c.get("volumeMounts", [])]
                   for c in spec["containers"])
        assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    if site == "site-b":
        svc = _by(docs, "Service", "tunnel")
        assert svc["spec"]["ports"][0]["port"] == 7500
        assert svc["spec"]["publishNotReadyAddresses"] is True
        assert _by(docs, "Service", "kme-link")


def _rules(pol: dict[str, Any], key: str) -> list[dict[str, Any]]:
    return list(pol["spec"].get(key, []))


@pytest.mark.parametrize("site", ["site-a", "site-b"])
def test_network_policies_let_only_tunnel_and_link_out(site: str) -> None:
    docs = _docs(site)
    deny = _by(docs, "NetworkPolicy", "default-deny")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    peer_ns = "qkdgw-site-b" if site == "site-a" else "qkdgw-site-a"
    cross: set[tuple[str, str, int]] = set()
    for pol in (d for d in docs if d["kind"] == "NetworkPolicy"):
        for direction, key, peer_key in (("out", "egress", "to"), ("in", "ingress", "from")):
            for rule in _rules(pol, key):
                for peer in rule[peer_key]:
                    other = peer.get("namespaceSelector", {}).get("matchLabels", {}).get(
                        "kubernetes.io/metadata.name")
                    assert "ipBlock" not in peer  # no "anywhere"
                    if other == peer_ns:
                        for p in rule["ports"]:
                            cross.add((direction, pol["metadata"]["name"], p["port"]))
                    elif other not in (None, "kube-system", "monitoring"):
                        raise AssertionError(f"unexpected namespace {other}")
                    if other == "kube-system":
                        assert {p["port"] for p in rule["ports"]} == {53}
    if site == "site-a":
        assert cross == {("out", "gateway", 7500), ("out", "kme", 7451), ("out", "kme", 7452)}
    else:
        assert cross == {("in", "gateway", 7500), ("in", "kme", 7451), ("in", "kme", 7452)}


def _secret_volume(src: Path, files: dict[str, bytes]) -> None:
    """The layout kubelet writes for a Secret volume with items: a timestamped dir,
    `..data` pointing at it, and top-level symlinks through `..data`."""
    stamp = src / "..2026_12_02_00_00_00.000000001"
    for rel, data in files.items():
        p = stamp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.chmod(0o400)
    (src / "..data").symlink_to(stamp.name)
    for top in {rel.split("/")[0] for rel in files}:
        (src / top).symlink_to(f"..data/{top}")


@pytest.mark.skipif(os.geteuid() != 0, reason="the init container's chown needs root")
@pytest.mark.parametrize("site", ["site-a", "site-b"])
def test_configmaps_and_pki_handover_load_with_the_real_loaders(site: str,
                                                                tmp_path: Path) -> None:
    from gateway.config import GatewayConfig
    from gateway.pki import init_pki
    from qkd.kme.config import KmeConfig

    render = _render_module()
    pki = tmp_path / "made-pki"
    init_pki(pki, ["site-a", "site-b"], algorithm="ecdsa-p256",
             kme_hosts=["site-a=kme.qkdgw-site-a.svc", "site-b=kme.qkdgw-site-b.svc"])
    home = tmp_path / "var-lib-qkdgw"
    (home / "configs").mkdir(parents=True)
    (home / "state").mkdir()
    docs = _docs(site)
    (home / "configs" / "kme.toml").write_text(_by(docs, "ConfigMap", "kme-config")["data"][
        "kme.toml"])
    (home / "configs" / "gateway.toml").write_text(_by(docs, "ConfigMap", "gateway-config")[
        "data"]["gateway.toml"])
    for name in ("kme-pki", "gateway-pki"):
        sts_or_app = _by(docs, "StatefulSet" if name == "kme-pki" else "Deployment",
                         "kme" if name == "kme-pki" else "app")
        spec = sts_or_app["spec"]["template"]["spec"]
        vol = next(v for v in spec["volumes"] if v["name"] == name)
        src = tmp_path / f"secret-{name}"
        src.mkdir()
        _secret_volume(src, {i["path"]: (pki / i["path"]).read_bytes()
                             for i in vol["secret"]["items"]})
        script = spec["initContainers"][0]["command"][2]
        script = script.replace('"/pki-secret"', repr(str(src))).replace(
            '"/var/lib/qkdgw/pki"', repr(str(home / "pki")))
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stderr
    for p in (home / "pki").rglob("*"):
        if p.is_file():
            st = p.stat()
            assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o400, 10001, 10001), p
    assert not any(part.startswith("..") for p in (home / "pki").rglob("*")
                   for part in p.relative_to(home / "pki").parts)
    kme = KmeConfig.load(home / "configs" / "kme.toml")
    gw = GatewayConfig.load(home / "configs" / "gateway.toml")
    assert kme.listen.host == "0.0.0.0" and kme.admin_listen is not None
    assert gw.kme_url == f"https://kme.qkdgw-{site}.svc:{render.SITES[site]['etsi']}"
    from gateway.runtime import load_credentials

    creds = load_credentials(gw)  # the loaders accept the handed-over 0400 keys
    assert creds.chain
    # Positive control: the same key with the mode fsGroup would give (0440) is refused.
    key = home / "pki" / site / "gateway.key"
    key.chmod(0o440)
    from gateway.pki import PkiError, load_private_key

    with pytest.raises(PkiError, match="group or others"):
        load_private_key(key)


def test_secrets_from_a_pki(tmp_path: Path) -> None:
    from gateway.pki import init_pki

    init_pki(tmp_path / "pki", ["site-a", "site-b"], algorithm="ecdsa-p256")
    r = subprocess.run([sys.executable, str(K8S / "render.py"), "--pki", str(tmp_path / "pki"),
                        "--site", "site-a"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    docs = list(yaml.safe_load_all(r.stdout))
    assert {d["metadata"]["name"] for d in docs} == {"kme-pki", "gateway-pki"}
    for d in docs:
        kv.validate(d, VERSION, strict=True)
        assert "stringData" not in d and all(d["data"].values())
    # The placeholders in the committed manifests are not keys.
    committed = (K8S / "site-a.yaml").read_text()
    assert "PRIVATE KEY" not in committed and "REPLACE:" in committed
