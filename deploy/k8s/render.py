#!/usr/bin/env python3
"""Render the per-site Kubernetes manifests (deploy/k8s/site-a.yaml, site-b.yaml) from
the example configs (configs/*.toml), so the cluster runs exactly the configuration the
repository documents, with only the addresses changed:

    python3 deploy/k8s/render.py              # rewrite deploy/k8s/site-*.yaml
    python3 deploy/k8s/render.py --check      # exit 1 if they are out of date
    python3 deploy/k8s/render.py --pki DIR --site site-a > site-a-secrets.yaml
                                              # the two PKI Secrets with DIR's files
                                              # (keep that output out of git)

Layout of one site (namespace qkdgw-<site>):
- StatefulSet `kme` (1 replica, PersistentVolumeClaim `state` for its SQLite key store),
  Service `kme` (ETSI 014, :744x) for the site's gateway; on site B (Bob) also Service
  `kme-link` (:7451 classical, :7452 quantum) that site A's KME dials.
- Deployment `app`: the example application and the `gateway` sidecar beside it (they
  share the pod's loopback, as in configs/site-*.toml), with a PersistentVolumeClaim
  `gateway-state` (PSK state: losing it forces a PKI re-bootstrap). On site B, Service
  `tunnel` (:7500) that site A's gateway dials.
- PKI as Secrets (`kme-pki`, `gateway-pki`, mounted 0400 into an init container that
  copies them into a memory-backed emptyDir owned by uid 10001 with mode 0400: the
  loaders refuse group-readable keys, and a Secret volume's files belong to root or are
  made group-readable by fsGroup), configs as ConfigMaps.
- NetworkPolicies: deny everything, then allow DNS, gateway -> own KME, the tunnel
  (A's gateway -> B's `tunnel`), the link (A's KME -> B's `kme-link`) and Prometheus
  (namespace `monitoring`) -> the admin ports. Nothing else leaves or enters.
- Probes: `/readyz` and `/healthz` on each process's admin port.
"""

from __future__ import annotations

import argparse
import base64
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent
IMAGE = "localhost/qkdgw:latest"
UID = 10001
HOME = "/var/lib/qkdgw"

SITES: dict[str, dict[str, Any]] = {
    "site-a": {"peer": "site-b", "kme_cfg": "kme-a.toml", "gw_cfg": "site-a.toml",
               "etsi": 7441, "kme_admin": 9201, "gw_admin": 9101, "role": "alice"},
    "site-b": {"peer": "site-a", "kme_cfg": "kme-b.toml", "gw_cfg": "site-b.toml",
               "etsi": 7442, "kme_admin": 9202, "gw_admin": 9102, "role": "bob"},
}
TUNNEL_PORT = 7500
LINK_PORTS = {"classical": 7451, "quantum": 7452}
# Where site A's gateway connections come from, as site B's admission sees them: the
# cluster's pod network here; on two clusters, site A's egress address.
PEER_SOURCES = '["10.0.0.0/8"]'

HARDENED = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}

# Copies the Secret's files (root-owned, 0400) into the pod's private PKI directory as
# uid 10001, mode 0400, then exits. Secret volumes hold `..data` symlinks; skip them.
COPY_PKI = """\
import os, shutil
src, dst = "/pki-secret", "/var/lib/qkdgw/pki"
for top, dirs, files in os.walk(src, followlinks=True):
    dirs[:] = [d for d in dirs if not d.startswith("..")]
    rel = os.path.relpath(top, src)
    if rel.startswith(".."):
        continue
    os.makedirs(os.path.join(dst, rel), exist_ok=True)
    os.chown(os.path.join(dst, rel), 10001, 10001)
    for name in files:
        if name.startswith(".."):
            continue
        target = os.path.join(dst, rel, name)
        shutil.copyfile(os.path.join(top, name), target)
        os.chmod(target, 0o400)
        os.chown(target, 10001, 10001)
        print("pki:", os.path.normpath(os.path.join(rel, name)), "0400 uid 10001")
"""

KME_PKI = ("{site}/kme-server.crt", "{site}/kme-server.key", "tls-ca.crt", "link-secret.key")
GW_PKI = ("{site}/gateway.crt", "{site}/gateway.key", "{site}/sae-client.crt",
          "{site}/sae-client.key", "ca.crt", "crl.pem", "tls-ca.crt")


def ns(site: str) -> str:
    return f"qkdgw-{site}"


def _sub(text: str, pattern: str, repl: str) -> str:
    new, n = re.subn(pattern, repl, text, count=1, flags=re.M)
    if n != 1:
        raise SystemExit(f"render.py: pattern {pattern!r} not found in an example config")
    return new


def kme_config(site: str) -> str:
    s = SITES[site]
    text = (ROOT / "configs" / s["kme_cfg"]).read_text()
    text = _sub(text, r'^listen = "127\.0\.0\.1:(\d+)"$', r'listen = "0.0.0.0:\1"')
    peer_ns = ns(s["peer"])
    if s["role"] == "alice":
        text = _sub(text, r'^peer = "127\.0\.0\.1:(\d+)"$',
                    rf'peer = "kme-link.{peer_ns}.svc:\1"')
        text = _sub(text, r'^quantum = "127\.0\.0\.1:(\d+)"$',
                    rf'quantum = "kme-link.{peer_ns}.svc:\1"')
    else:
        text = _sub(text, r'^(listen|quantum_listen) = "127\.0\.0\.1:(\d+)"$',
                    r'\1 = "0.0.0.0:\2"')
        text = _sub(text, r'^quantum_listen = "127\.0\.0\.1:(\d+)"$',
                    r'quantum_listen = "0.0.0.0:\1"')
    # The admin endpoint: kubelet probes and Prometheus reach it on the pod address
    # (NetworkPolicy lets only the monitoring namespace in).
    text = _sub(text, r'^listen = "127\.0\.0\.1:(9\d+)"$', r'listen = "0.0.0.0:\1"')
    text = _sub(text, r'^format = "console"$', 'format = "json"')
    return text


def gateway_config(site: str) -> str:
    s = SITES[site]
    text = (ROOT / "configs" / s["gw_cfg"]).read_text()
    if site == "site-a":
        text = _sub(text, r'^connect = "127\.0\.0\.1:(\d+)"$',
                    rf'connect = "tunnel.{ns("site-b")}.svc:\1"')
    else:
        text = _sub(text, r'^listen = "127\.0\.0\.1:(75\d\d)"$', r'listen = "0.0.0.0:\1"')
        text = _sub(text, r'^peer_sources = \[.*\]$', f"peer_sources = {PEER_SOURCES}")
    text = _sub(text, r'^url = "https://127\.0\.0\.1:(\d+)"$',
                rf'url = "https://kme.{ns(site)}.svc:\1"')
    text = _sub(text, r'^listen = "127\.0\.0\.1:(9\d+)"$', r'listen = "0.0.0.0:\1"')
    text = _sub(text, r'^format = "console"$', 'format = "json"')
    return text


def _labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "qkd-gateway", "app.kubernetes.io/component": component}


def _product_container(command: str, ports: list[dict[str, Any]], admin: int,
                       memory: str, memory_limit: str) -> dict[str, Any]:
    """The KME or gateway container: `qkdgw <command> --config configs/<command>.toml`."""
    return {
        "name": command, "image": IMAGE, "imagePullPolicy": "IfNotPresent",
        "args": [command, "--config", f"{HOME}/configs/{command}.toml"],
        "ports": ports,
        "securityContext": HARDENED,
        "volumeMounts": [
            {"name": "config", "mountPath": f"{HOME}/configs", "readOnly": True},
            {"name": "pki", "mountPath": f"{HOME}/pki", "readOnly": True},
            {"name": "state", "mountPath": f"{HOME}/state"}],
        "resources": {"requests": {"cpu": "250m", "memory": memory},
                      "limits": {"cpu": "2", "memory": memory_limit}},
        **_probes(admin),
    }


def _probes(port: int) -> dict[str, Any]:
    return {
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": port},
                           "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": port},
                          "initialDelaySeconds": 10, "periodSeconds": 10,
                          "failureThreshold": 3},
        "startupProbe": {"httpGet": {"path": "/healthz", "port": port},
                         "periodSeconds": 2, "failureThreshold": 60},
    }


def _pki_items(files: tuple[str, ...], site: str) -> list[dict[str, Any]]:
    return [{"key": _secret_key(f.format(site=site)), "path": f.format(site=site),
             "mode": 0o400} for f in files]


def _secret_key(path: str) -> str:
    return path.replace("/", "_")


def _init_pki(secret_volume: str) -> dict[str, Any]:
    return {
        "name": "pki-permissions",
        "image": IMAGE, "imagePullPolicy": "IfNotPresent",
        "command": ["python3", "-c", COPY_PKI],
        # Root only to read the root-owned 0400 Secret files and hand them to uid 10001;
        # no other capability, no writable root filesystem, nothing left running.
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": False, "runAsUser": 0, "runAsGroup": 0,
                            "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]},
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "volumeMounts": [{"name": secret_volume, "mountPath": "/pki-secret", "readOnly": True},
                         {"name": "pki", "mountPath": f"{HOME}/pki"}],
        "resources": {"limits": {"cpu": "200m", "memory": "64Mi"}},
    }


def _pod_security() -> dict[str, Any]:
    return {"runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def manifests(site: str) -> list[dict[str, Any]]:
    s = SITES[site]
    n = ns(site)
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": n, "labels": {"app.kubernetes.io/part-of": "qkd-gateway",
                                            "pod-security.kubernetes.io/enforce": "baseline"}}},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "kme-config", "namespace": n, "labels": _labels("kme")},
         "data": {"kme.toml": kme_config(site)}},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "gateway-config", "namespace": n, "labels": _labels("gateway")},
         "data": {"gateway.toml": gateway_config(site)}},
    ]
    docs += secrets(site, None)

    # ------------------------------------------------------------------------- KME
    kme_ports = [{"name": "etsi014", "containerPort": s["etsi"]},
                 {"name": "admin", "containerPort": s["kme_admin"]}]
    if s["role"] == "bob":
        kme_ports += [{"name": f"link-{k}", "containerPort": v} for k, v in LINK_PORTS.items()]
    docs.append({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "kme", "namespace": n, "labels": _labels("kme")},
        "spec": {
            "serviceName": "kme", "replicas": 1,
            "selector": {"matchLabels": _labels("kme")},
            "template": {
                "metadata": {"labels": _labels("kme")},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": _pod_security(),
                    "initContainers": [_init_pki("kme-pki")],
                    "containers": [
                        _product_container("kme", kme_ports, s["kme_admin"], "256Mi", "1Gi")],
                    "volumes": [
                        {"name": "config", "configMap": {"name": "kme-config"}},
                        {"name": "kme-pki", "secret": {
                            "secretName": "kme-pki", "defaultMode": 0o400,
                            "items": _pki_items(KME_PKI, site)}},
                        {"name": "pki", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
                    ],
                },
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "state", "labels": _labels("kme")},
                "spec": {"accessModes": ["ReadWriteOnce"],
                         "resources": {"requests": {"storage": "1Gi"}}}}],
        },
    })
    docs.append({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kme", "namespace": n, "labels": _labels("kme")},
        "spec": {"selector": _labels("kme"),
                 "ports": [{"name": "etsi014", "port": s["etsi"], "targetPort": "etsi014"}]}})
    if s["role"] == "bob":
        docs.append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kme-link", "namespace": n, "labels": _labels("kme")},
            "spec": {"selector": _labels("kme"),
                     # The link must come up before the pool has key (readiness = keys).
                     "publishNotReadyAddresses": True,
                     "ports": [{"name": f"link-{k}", "port": v, "targetPort": f"link-{k}"}
                               for k, v in LINK_PORTS.items()]}})

    # ------------------------------------------------------------- app + gateway
    gw_ports = [{"name": "admin", "containerPort": s["gw_admin"]}]
    if site == "site-b":
        gw_ports.insert(0, {"name": "tunnel", "containerPort": TUNNEL_PORT})
    docs.append({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "gateway-state", "namespace": n, "labels": _labels("gateway")},
        "spec": {"accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": "64Mi"}}}})
    docs.append({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "app", "namespace": n, "labels": _labels("app")},
        "spec": {
            "replicas": 1,
            # One gateway per site at a time: its PSK state is on a ReadWriteOnce volume.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": _labels("app")},
            "template": {
                "metadata": {"labels": _labels("app")},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": _pod_security(),
                    "initContainers": [_init_pki("gateway-pki")],
                    "containers": [
                        _example_app(site),
                        _product_container("gateway", gw_ports, s["gw_admin"], "128Mi", "512Mi")],
                    "volumes": [
                        {"name": "config", "configMap": {"name": "gateway-config"}},
                        {"name": "gateway-pki", "secret": {
                            "secretName": "gateway-pki", "defaultMode": 0o400,
                            "items": _pki_items(GW_PKI, site)}},
                        {"name": "pki", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
                        {"name": "state", "persistentVolumeClaim": {
                            "claimName": "gateway-state"}},
                    ],
                },
            },
        },
    })
    if site == "site-b":
        docs.append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "tunnel", "namespace": n, "labels": _labels("gateway")},
            # Readiness is "tunnel up", which needs site A to connect first.
            "spec": {"selector": _labels("app"), "publishNotReadyAddresses": True,
                     "ports": [{"name": "tunnel", "port": TUNNEL_PORT,
                                "targetPort": "tunnel"}]}})
    docs += network_policies(site)
    return docs


def _example_app(site: str) -> dict[str, Any]:
    if site == "site-a":
        code = ("import hashlib, os, socket, sys, time\n"
                "while True:\n"
                "    data = os.urandom(65536)\n"
                "    try:\n"
                "        with socket.create_connection(('127.0.0.1', 7001), timeout=20) as s:\n"
                "            s.sendall(data); s.shutdown(socket.SHUT_WR); reply = b''\n"
                "            while len(reply) < 40 and (c := s.recv(40 - len(reply))):\n"
                "                reply += c\n"
                "        ok = reply == len(data).to_bytes(8, 'big') + "
                "hashlib.sha256(data).digest()\n"
                "        print('client: 65536 bytes via the tunnel:', 'ok' if ok else "
                "'MISMATCH', flush=True)\n"
                "    except OSError as exc:\n"
                "        print('client: failed:', exc, flush=True)\n"
                "    time.sleep(5)\n")
        name = "client"
    else:
        code = ("import asyncio, hashlib\n"
                "async def handle(r, w):\n"
                "    d, n = hashlib.sha256(), 0\n"
                "    while c := await r.read(65536):\n"
                "        d.update(c); n += len(c)\n"
                "    w.write(n.to_bytes(8, 'big') + d.digest()); await w.drain(); w.close()\n"
                "    print('sink:', n, 'bytes', flush=True)\n"
                "async def main():\n"
                "    async with await asyncio.start_server(handle, '127.0.0.1', 9000) as s:\n"
                "        await s.serve_forever()\n"
                "asyncio.run(main())\n")
        name = "sink"
    return {"name": name, "image": IMAGE, "imagePullPolicy": "IfNotPresent",
            "command": ["python3", "-c", code], "securityContext": HARDENED,
            "resources": {"limits": {"cpu": "500m", "memory": "128Mi"}}}


def network_policies(site: str) -> list[dict[str, Any]]:
    s = SITES[site]
    n = ns(site)
    peer_ns = ns(s["peer"])
    monitoring = {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}

    def pol(name: str, component: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": name, "namespace": n},
                "spec": {"podSelector": {"matchLabels": _labels(component)}
                         if component else {}, **spec}}

    kme_in: list[dict[str, Any]] = [
        {"from": [{"podSelector": {"matchLabels": _labels("app")}}],
         "ports": [{"protocol": "TCP", "port": s["etsi"]}]},
        {"from": [monitoring], "ports": [{"protocol": "TCP", "port": s["kme_admin"]}]},
    ]
    kme_out: list[dict[str, Any]] = []
    peer_kme = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": peer_ns}},
                "podSelector": {"matchLabels": _labels("kme")}}
    link_ports = [{"protocol": "TCP", "port": p} for p in LINK_PORTS.values()]
    if s["role"] == "bob":
        kme_in.append({"from": [peer_kme], "ports": link_ports})
    else:
        kme_out.append({"to": [peer_kme], "ports": link_ports})
    gw_in: list[dict[str, Any]] = [
        {"from": [monitoring], "ports": [{"protocol": "TCP", "port": s["gw_admin"]}]}]
    gw_out: list[dict[str, Any]] = [
        {"to": [{"podSelector": {"matchLabels": _labels("kme")}}],
         "ports": [{"protocol": "TCP", "port": s["etsi"]}]}]
    peer_gw = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": peer_ns}},
               "podSelector": {"matchLabels": _labels("app")}}
    tunnel = [{"protocol": "TCP", "port": TUNNEL_PORT}]
    if site == "site-b":
        gw_in.append({"from": [peer_gw], "ports": tunnel})
    else:
        gw_out.append({"to": [peer_gw], "ports": tunnel})
    dns = {"to": [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "kube-system"}},
        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    return [
        pol("default-deny", "", {"policyTypes": ["Ingress", "Egress"]}),
        pol("kme", "kme", {"policyTypes": ["Ingress", "Egress"], "ingress": kme_in,
                           "egress": [dns, *kme_out]}),
        pol("gateway", "app", {"policyTypes": ["Ingress", "Egress"], "ingress": gw_in,
                               "egress": [dns, *gw_out]}),
    ]


def secrets(site: str, pki: Path | None) -> list[dict[str, Any]]:
    """The two PKI Secrets; with `pki`, filled from that `qkdgw pki init` directory, else
    with placeholders (the manifest shows their shape; never commit real keys)."""
    out = []
    for name, files, component in (("kme-pki", KME_PKI, "kme"),
                                   ("gateway-pki", GW_PKI, "gateway")):
        paths = [f.format(site=site) for f in files]
        if pki is None:
            body: dict[str, Any] = {"stringData": {
                _secret_key(p): f"REPLACE: {p} from `qkdgw pki init` (see "
                                "deploy/k8s/render.py --pki)" for p in paths}}
        else:
            body = {"data": {_secret_key(p): base64.b64encode((pki / p).read_bytes()).decode()
                             for p in paths}}
        out.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": {"name": name, "namespace": ns(site),
                                 "labels": _labels(component)}, **body})
    return out


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str)


def render(site: str) -> str:
    head = (f"# qkd-gateway, {site}: generated by deploy/k8s/render.py from configs/ "
            "(do not edit; re-run it).\n# Apply after replacing the Secrets "
            "(render.py --pki DIR --site SITE). See deploy/README.md.\n")
    return head + yaml.dump_all(manifests(site), Dumper=_Dumper, sort_keys=False,
                                width=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="fail if the files are stale")
    ap.add_argument("--pki", type=Path, help="print the Secrets filled from this PKI")
    ap.add_argument("--site", choices=sorted(SITES), help="with --pki: which site")
    args = ap.parse_args(argv)
    if args.pki is not None:
        if args.site is None:
            ap.error("--pki needs --site")
        sys.stdout.write(yaml.dump_all(secrets(args.site, args.pki), Dumper=_Dumper,
                                       sort_keys=False))
        return 0
    stale = []
    for site in SITES:
        path = OUT / f"{site}.yaml"
        text = render(site)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)} (run python3 deploy/k8s/render.py)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
