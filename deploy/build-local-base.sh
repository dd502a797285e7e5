#!/usr/bin/env bash
# Build a local Debian bookworm base image with Python 3.11, pip and venv, for hosts that
# reach Debian's package mirror but no container registry (so `FROM python:3.11-slim`
# cannot be pulled). The image is made from a debootstrap rootfs with `podman import`.
#
#   deploy/build-local-base.sh            # builds localhost/qkdgw-base:bookworm if missing
#   deploy/build-local-base.sh --force    # rebuilds it
#
# Environment:
#   BASE_TAG         image to create (default localhost/qkdgw-base:bookworm)
#   DEBIAN_MIRROR    Debian mirror (default http://deb.debian.org/debian)
#   DEBIAN_SECURITY  security mirror (default http://deb.debian.org/debian-security)
#   CONTAINERS_CONF  podman config (default deploy/containers.conf beside this script)
#
# Needs root (debootstrap), debootstrap, debian-archive-keyring and podman:
#   apt-get install -y podman runc catatonit debootstrap
# Idempotent: does nothing when BASE_TAG exists, unless --force.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BASE_TAG="${BASE_TAG:-localhost/qkdgw-base:bookworm}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBIAN_SECURITY="${DEBIAN_SECURITY:-http://deb.debian.org/debian-security}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"

force=0
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "build-local-base.sh: unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

for tool in podman debootstrap; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "build-local-base.sh: $tool is not installed" \
             "(fix: apt-get install -y podman runc catatonit debootstrap)" >&2
        exit 2
    fi
done
if [ "$(id -u)" -ne 0 ]; then
    echo "build-local-base.sh: debootstrap needs root (run with sudo)" >&2
    exit 2
fi

if [ "$force" -eq 0 ] && podman image exists "$BASE_TAG"; then
    echo "build-local-base.sh: $BASE_TAG already exists (use --force to rebuild)"
    exit 0
fi

work="$(mktemp -d /var/tmp/qkdgw-base.XXXXXX)"
cleanup() {
    # debootstrap may leave /proc or /sys mounted in the target on failure.
    for m in proc sys dev/pts dev; do
        if mountpoint -q "$work/rootfs/$m" 2>/dev/null; then umount -l "$work/rootfs/$m" || true; fi
    done
    rm -rf "$work"
}
trap cleanup EXIT

rootfs="$work/rootfs"
echo "build-local-base.sh: debootstrap bookworm into $rootfs (mirror $DEBIAN_MIRROR)"
# minbase: only Essential + apt. python3-venv brings ensurepip (pip and setuptools wheels)
# for `python3 -m venv`; python3-pip is the system pip; ca-certificates for HTTPS;
# gcc, libc6-dev and python3-dev build the compiled kernels (qkd/native) in the image's
# wheel stage (the runtime stage copies only the wheels).
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates,gcc,libc6-dev,python3-dev \
    bookworm "$rootfs" "$DEBIAN_MIRROR"

# Same apt sources as the official Debian image (main + updates + security), so a
# later `apt-get update && apt-get upgrade` in a derived image gets security fixes.
rm -f "$rootfs/etc/apt/sources.list"
cat > "$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $DEBIAN_MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $DEBIAN_SECURITY
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF

# Like the official slim images: no man pages or docs from later apt installs, and no
# apt caches in layers.
mkdir -p "$rootfs/etc/dpkg/dpkg.cfg.d" "$rootfs/etc/apt/apt.conf.d"
cat > "$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
cat > "$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Binary::apt::APT::Keep-Downloaded-Packages "false";
APT::Install-Recommends "false";
EOF

# Bring the rootfs up to date with bookworm-updates/-security, then strip caches, docs
# and the host-specific files debootstrap leaves behind.
mount -t proc proc "$rootfs/proc"
chroot "$rootfs" /usr/bin/env DEBIAN_FRONTEND=noninteractive sh -c \
    'apt-get update -q && apt-get -y -q upgrade && apt-get clean'
umount "$rootfs/proc"
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/log/* \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
       "$rootfs"/tmp/* "$rootfs"/var/tmp/* "$rootfs"/debootstrap
: > "$rootfs/etc/hostname"
rm -f "$rootfs/etc/resolv.conf"

echo "build-local-base.sh: importing as $BASE_TAG"
tar --numeric-owner --xattrs -C "$rootfs" -cf - . | podman import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    --message "debootstrap bookworm minbase + python3 python3-venv python3-pip ca-certificates gcc libc6-dev python3-dev" \
    - "$BASE_TAG" >/dev/null

podman run --rm --runtime runc "$BASE_TAG" python3 -c \
    'import sys, ensurepip, venv; print("build-local-base.sh: python", sys.version.split()[0], "ok")'
podman image ls "$BASE_TAG"
