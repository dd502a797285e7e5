#!/usr/bin/env bash
# Run both sites in one pod with `podman play kube deploy/two-site-pod.yaml`.
#
#   deploy/run-pod.sh up       # prepare the demo tree (configs, PKI, state), start the pod
#   deploy/run-pod.sh verify   # tunnel status of both gateways + a checked transfer
#   deploy/run-pod.sh logs     # last lines of every container
#   deploy/run-pod.sh down     # stop and remove the pod (the demo tree stays)
#
# Environment:
#   QKDGW_DEMO_DIR   demo tree (default /srv/qkdgw-demo, the path the manifest names;
#                    another path is substituted into a rendered copy of the manifest)
#   IMAGE            image (default localhost/qkdgw:latest, what build-image.sh makes)
#   QKDGW_POD_NAME   pod name (default qkdgw-two-site, the manifest's); containers are
#                    named <pod>-<container>, e.g. qkdgw-two-site-gateway-a
#   VERIFY_TIMEOUT   seconds `verify` waits for the tunnel (default 90)
#   CONTAINERS_CONF  podman config (default deploy/containers.conf)
#
# The PKI is created by `qkdgw pki init` inside the image, running as uid 10001, the
# user every container of the pod runs as: the private keys (mode 0600) are then owned
# by the user that has to read them. Rootless podman: the host directories must belong
# to uid 10001 *inside* your user namespace, so this script uses `podman unshare chown`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
DEMO_DIR="${QKDGW_DEMO_DIR:-/srv/qkdgw-demo}"
IMAGE="${IMAGE:-localhost/qkdgw:latest}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"
POD="${QKDGW_POD_NAME:-qkdgw-two-site}"
MANIFEST="$here/two-site-pod.yaml"
UID_IN_IMAGE=10001

chown_demo() {  # chown_demo PATH...: to uid/gid 10001 as seen by the containers
    if [ "$(id -u)" -eq 0 ]; then
        chown -R "$UID_IN_IMAGE:$UID_IN_IMAGE" "$@"
    else
        podman unshare chown -R "$UID_IN_IMAGE:$UID_IN_IMAGE" "$@"
    fi
}

render_manifest() {  # prints the path of the manifest to play
    if [ "$DEMO_DIR" = /srv/qkdgw-demo ] && [ "$IMAGE" = localhost/qkdgw:latest ] \
        && [ "$POD" = qkdgw-two-site ]; then
        echo "$MANIFEST"
        return
    fi
    local out="$DEMO_DIR/two-site-pod.rendered.yaml"
    sed -e "s#/srv/qkdgw-demo#$DEMO_DIR#g" -e "s#localhost/qkdgw:latest#$IMAGE#g" \
        -e "s#^  name: qkdgw-two-site\$#  name: $POD#" "$MANIFEST" > "$out"
    echo "$out"
}

cmd_up() {
    if ! podman image exists "$IMAGE"; then
        echo "run-pod.sh: image $IMAGE not found (fix: deploy/build-image.sh)" >&2
        exit 2
    fi
    mkdir -p "$DEMO_DIR/configs" "$DEMO_DIR/pki" "$DEMO_DIR/state-a" "$DEMO_DIR/state-b"
    # The example configs, unchanged: their ../pki and ../state paths resolve inside the
    # containers to the mounts of two-site-pod.yaml.
    cp "$repo"/configs/kme-a.toml "$repo"/configs/kme-b.toml \
       "$repo"/configs/site-a.toml "$repo"/configs/site-b.toml "$DEMO_DIR/configs/"
    chmod 0755 "$DEMO_DIR" "$DEMO_DIR/configs"
    chmod 0644 "$DEMO_DIR"/configs/*.toml
    chown_demo "$DEMO_DIR/pki" "$DEMO_DIR/state-a" "$DEMO_DIR/state-b"
    chmod 0700 "$DEMO_DIR/pki" "$DEMO_DIR/state-a" "$DEMO_DIR/state-b"
    if [ ! -e "$DEMO_DIR/pki/ca.crt" ]; then
        echo "run-pod.sh: creating the PKI in $DEMO_DIR/pki (inside the image, as uid $UID_IN_IMAGE)"
        podman run --rm --runtime runc --user "$UID_IN_IMAGE:$UID_IN_IMAGE" --network none \
            -v "$DEMO_DIR/pki:/var/lib/qkdgw/pki" \
            "$IMAGE" pki init --out /var/lib/qkdgw/pki --site site-a --site site-b
    else
        echo "run-pod.sh: using the existing PKI in $DEMO_DIR/pki"
    fi
    local manifest
    manifest="$(render_manifest)"
    if podman pod exists "$POD"; then
        podman play kube --down "$manifest" >/dev/null
    fi
    podman play kube "$manifest"
    echo "run-pod.sh: pod $POD started; check it with: deploy/run-pod.sh verify"
}

cmd_verify() {
    local deadline=$((SECONDS + ${VERIFY_TIMEOUT:-90})) ok=0
    echo "run-pod.sh: waiting for the hybrid tunnel (gateway-a admin /status: tunnel up, not degraded)..."
    while [ "$SECONDS" -lt "$deadline" ]; do
        if podman exec "$POD-gateway-a" python3 -c '
import json, sys, urllib.request
s = json.load(urllib.request.urlopen("http://127.0.0.1:9101/status", timeout=5))
peer = s.get("peer", {})
sys.exit(0 if peer.get("tunnel") == "up" and peer.get("degraded") is False else 1)
' 2>/dev/null; then ok=1; break; fi
        sleep 2
    done
    echo "== gateway-a: qkdgw status --url http://127.0.0.1:9101"
    podman exec "$POD-gateway-a" qkdgw status --url http://127.0.0.1:9101
    echo "== gateway-b: qkdgw status --url http://127.0.0.1:9102"
    podman exec "$POD-gateway-b" qkdgw status --url http://127.0.0.1:9102
    if [ "$ok" -ne 1 ]; then
        TAIL=5 cmd_logs
        echo "run-pod.sh: the tunnel did not come up within ${VERIFY_TIMEOUT:-90} s" \
             "(logs above; an 'unknown field' error means the image is older than" \
             "configs/: rebuild it with deploy/build-image.sh)" >&2
        exit 1
    fi
    echo "== a checked 4 MiB transfer: client-a -> gateway-a :7001 -> tunnel -> gateway-b -> sink-b :9000"
    podman exec "$POD-client-a" python3 -c '
import hashlib, os, socket, time
data = os.urandom(4 << 20)
t0 = time.monotonic()
with socket.create_connection(("127.0.0.1", 7001), timeout=30) as s:
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while len(reply) < 40 and (chunk := s.recv(40 - len(reply))):
        reply += chunk
dt = time.monotonic() - t0
assert reply == len(data).to_bytes(8, "big") + hashlib.sha256(data).digest(), reply.hex()
print(f"ok: {len(data)} bytes, byte count and SHA-256 confirmed by sink-b, {dt:.2f} s")
'
    echo "== client-a (the app container), last lines"
    podman logs --tail 3 "$POD-client-a"
    local c n
    for c in kme-a kme-b gateway-a gateway-b sink-b client-a; do
        n="$(podman inspect --format '{{.RestartCount}}' "$POD-$c")"
        if [ "$n" != 0 ]; then
            echo "run-pod.sh: WARNING: $POD-$c restarted $n times (see: deploy/run-pod.sh logs)"
        fi
    done
}

cmd_logs() {
    local c
    for c in kme-a kme-b gateway-a gateway-b sink-b client-a; do
        echo "== $POD-$c"
        podman logs --tail "${TAIL:-15}" "$POD-$c" 2>&1 || true
    done
}

cmd_down() {
    if podman pod exists "$POD"; then
        podman play kube --down "$(render_manifest)"
    else
        echo "run-pod.sh: pod $POD is not running"
    fi
}

case "${1:-}" in
    up) cmd_up ;;
    verify) cmd_verify ;;
    logs) cmd_logs ;;
    down) cmd_down ;;
    *) sed -n '2,21p' "$0"; exit 2 ;;
esac
