#!/usr/bin/env bash
# Build the qkdgw image with podman on a host without a Docker engine or registry access.
#
#   deploy/build-image.sh                      # localhost/qkdgw:latest, local base, no liboqs
#   IMAGE=localhost/qkdgw:dev deploy/build-image.sh
#   BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm WITH_LIBOQS=1 deploy/build-image.sh
#
# Environment:
#   IMAGE            tag to build (default localhost/qkdgw:latest)
#   BASE_IMAGE       base image (default localhost/qkdgw-base:bookworm, made by
#                    deploy/build-local-base.sh when missing)
#   WITH_LIBOQS      1 builds liboqs from its pinned release (needs github.com); default 0
#   CA_BUNDLE        CA bundle handed to the build as the secret "ca" (default: the one
#                    pip uses here: $PIP_CERT, pip's `cert` setting, $REQUESTS_CA_BUNDLE,
#                    $SSL_CERT_FILE, /etc/ssl/certs/ca-certificates.crt); "none" for none
#   CONTAINERS_CONF  podman config (default deploy/containers.conf)
#   EXTRA_BUILD_ARGS more `podman build` arguments (word-split)
#
# The package index: pip inside the build uses the host's http(s) index settings
# (index-url / extra-index-url from pip's config or PIP_* variables), passed as the
# secret "pipconf" (a temporary pip.conf, so a URL with credentials never reaches the
# image or its history). file:// indexes and find-links of the host cannot be seen from
# inside the build and are left out.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
IMAGE="${IMAGE:-localhost/qkdgw:latest}"
BASE_IMAGE="${BASE_IMAGE:-localhost/qkdgw-base:bookworm}"
WITH_LIBOQS="${WITH_LIBOQS:-0}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"

if ! command -v podman >/dev/null 2>&1; then
    echo "build-image.sh: podman is not installed (fix: apt-get install -y podman runc catatonit debootstrap)" >&2
    exit 2
fi

if ! podman image exists "$BASE_IMAGE"; then
    if [ "$BASE_IMAGE" = "localhost/qkdgw-base:bookworm" ]; then
        BASE_TAG="$BASE_IMAGE" "$here/build-local-base.sh"
    else
        echo "build-image.sh: base image $BASE_IMAGE is not present; podman will try to pull it"
    fi
fi

pip_cmd=()
for candidate in "${PIP:-}" "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/pip}" "$repo/.venv/bin/pip" pip3 pip; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1; then
        pip_cmd=("$candidate"); break
    fi
done
pip_get() {  # pip_get KEY: the host pip's setting (env var wins), empty when unset
    local key="$1" env_name
    env_name="PIP_$(echo "$key" | tr 'a-z-' 'A-Z_')"
    if [ -n "${!env_name:-}" ]; then printf '%s\n' "${!env_name}"; return; fi
    if [ "${#pip_cmd[@]}" -gt 0 ]; then
        "${pip_cmd[@]}" config get "global.$key" 2>/dev/null || true
    fi
}

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
secrets=()

# The CA bundle pip trusts here: needed inside the build when TLS is intercepted.
ca="${CA_BUNDLE:-}"
if [ -z "$ca" ]; then
    for c in "$(pip_get cert)" "${REQUESTS_CA_BUNDLE:-}" "${SSL_CERT_FILE:-}" \
             /etc/ssl/certs/ca-certificates.crt; do
        if [ -n "$c" ] && [ -s "$c" ]; then ca="$c"; break; fi
    done
fi
if [ -n "$ca" ] && [ "$ca" != none ]; then
    secrets+=(--secret "id=ca,src=$ca")
    echo "build-image.sh: CA bundle for the build: $ca (build secret, not stored in the image)"
fi

# The host's http(s) package indexes, as a pip.conf build secret.
index_url="$(pip_get index-url)"
extra=()
for u in $(pip_get extra-index-url); do
    case "$u" in http://*|https://*) extra+=("$u") ;; esac
done
case "$index_url" in http://*|https://*) ;; *) index_url="" ;; esac
if [ -n "$index_url" ] || [ "${#extra[@]}" -gt 0 ]; then
    {
        echo "[global]"
        [ -n "$index_url" ] && echo "index-url = $index_url"
        [ "${#extra[@]}" -gt 0 ] && echo "extra-index-url = ${extra[*]}"
    } > "$tmp/pip.conf"
    secrets+=(--secret "id=pipconf,src=$tmp/pip.conf")
    echo "build-image.sh: package index from the host's pip settings (build secret)"
else
    echo "build-image.sh: package index: pip's default (the host sets no http(s) index)"
fi

set -x
# shellcheck disable=SC2086
podman build \
    --isolation=chroot \
    --layers \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --build-arg "WITH_LIBOQS=$WITH_LIBOQS" \
    "${secrets[@]}" \
    ${EXTRA_BUILD_ARGS:-} \
    -f "$repo/Dockerfile" \
    -t "$IMAGE" \
    "$repo"
set +x
podman image ls "$IMAGE"
