# qkd-gateway container image: one image for every process of a site
# (`qkdgw kme`, `qkdgw gateway`, `qkdgw pki init`, `qkdgw status`).
#
# With registry and GitHub access (Docker BuildKit or podman):
#   docker build -t qkdgw .
#   podman build -t qkdgw .
# Without GitHub access, or without a registry for the base image, see deploy/README.md:
#   deploy/build-local-base.sh && deploy/build-image.sh      (WITH_LIBOQS=0, local base)
#
# Build arguments:
#   BASE_IMAGE             any Debian-based image with python3 (>= 3.11) and its venv
#                          module: the official python image or a local debootstrap one
#   WITH_LIBOQS            1: build liboqs from a pinned release (needs github.com) and
#                          install liboqs-python; 0: the `cryptography` (OpenSSL) backend only
#   LIBOQS_VERSION / LIBOQS_SHA256 / LIBOQS_URL / LIBOQS_PYTHON_VERSION   the liboqs pins
#   PIP_INDEX_URL / PIP_EXTRA_INDEX_URL   a package index mirror WITHOUT credentials
#                          (build args are visible in the image history)
# Build secrets (never stored in a layer):
#   --secret id=ca,src=/path/ca-bundle.crt      CA bundle for pip/curl/apt (TLS-intercepting
#                                               proxies); optional
#   --secret id=pipconf,src=/path/pip.conf      pip config, e.g. an index URL with credentials;
#                                               optional
#
# No secrets are baked in: the PKI, the configs and the state directory are mounted at
# run time (see deploy/two-site-pod.yaml).

ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
ARG WITH_LIBOQS=1

# ---------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS base
# PYTHONUNBUFFERED is deliberately not set: qkdgw logs to stderr, which Python
# line-buffers and structlog flushes per event, so each log line is one write. Unbuffered
# streams write a line and its newline separately, which container log drivers record
# as a partial line plus an empty one.
ENV LANG=C.UTF-8 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# ---------------------------------------------------------------------------------------
# Stage 1: wheels of the project and of everything it depends on. The only stage that
# talks to the package index; the runtime stage installs from /wheels with --no-index.
FROM base AS wheels
ARG WITH_LIBOQS
ARG LIBOQS_PYTHON_VERSION=0.16.0.1
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
WORKDIR /src
# A C compiler for the compiled kernels (qkd/native/*.c, built by setup.py into the
# project's wheel); the official python image has the headers but no gcc.
RUN --mount=type=secret,id=ca \
    set -eu; \
    if command -v gcc >/dev/null; then exit 0; fi; \
    apt_ca=""; \
    if [ -s /run/secrets/ca ]; then apt_ca="-o Acquire::https::CAInfo=/run/secrets/ca"; fi; \
    apt-get $apt_ca update; \
    DEBIAN_FRONTEND=noninteractive apt-get $apt_ca install -y --no-install-recommends gcc libc6-dev; \
    rm -rf /var/lib/apt/lists/*
# README.md* : the readme pyproject.toml names, copied when present (a glob, so a
# checkout without it still builds; setuptools then only warns).
COPY pyproject.toml setup.py README.md* ./
COPY gateway ./gateway
COPY pqc ./pqc
COPY qkd ./qkd
RUN --mount=type=secret,id=ca \
    --mount=type=secret,id=pipconf \
    --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    case "$WITH_LIBOQS" in 0|1) ;; *) echo "WITH_LIBOQS must be 0 or 1" >&2; exit 2 ;; esac; \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    if [ -s /run/secrets/pipconf ]; then export PIP_CONFIG_FILE=/run/secrets/pipconf; fi; \
    if [ -z "$PIP_INDEX_URL" ]; then unset PIP_INDEX_URL; fi; \
    if [ -z "$PIP_EXTRA_INDEX_URL" ]; then unset PIP_EXTRA_INDEX_URL; fi; \
    python3 -m venv /opt/build; \
    /opt/build/bin/pip wheel --wheel-dir /wheels .; \
    if [ "$WITH_LIBOQS" = 1 ]; then \
        /opt/build/bin/pip wheel --wheel-dir /wheels --no-deps \
            "liboqs-python==${LIBOQS_PYTHON_VERSION}"; \
    fi; \
    cd /wheels; \
    sha256sum -- *.whl > SHA256SUMS; \
    cat SHA256SUMS

# ---------------------------------------------------------------------------------------
# Stage 2 (optional): liboqs from a pinned release tarball, checked against its SHA-256,
# built as a shared library with only ML-KEM and ML-DSA. With WITH_LIBOQS=0 both RUNs
# only create the empty /out, so that build needs no access to github.com. (A shell
# condition rather than `FROM liboqs-${WITH_LIBOQS}`: buildah 1.28 cannot resolve a
# stage name built from an ARG's default value.)
FROM base AS liboqs
ARG WITH_LIBOQS
RUN --mount=type=secret,id=ca \
    set -eu; \
    mkdir -p /out; \
    if [ "$WITH_LIBOQS" != 1 ]; then exit 0; fi; \
    apt_ca=""; \
    if [ -s /run/secrets/ca ]; then apt_ca="-o Acquire::https::CAInfo=/run/secrets/ca"; fi; \
    apt-get $apt_ca update; \
    DEBIAN_FRONTEND=noninteractive apt-get $apt_ca install -y --no-install-recommends \
        ca-certificates curl cmake ninja-build gcc libc6-dev; \
    rm -rf /var/lib/apt/lists/*
# liboqs and liboqs-python share major.minor; liboqs-python warns when they differ.
ARG LIBOQS_VERSION=0.16.0
ARG LIBOQS_SHA256=162d5b510518ee5f285f82fa1f16402a885176e818bf1b1a4c3c91c9a2f01eae
ARG LIBOQS_URL=https://github.com/open-quantum-safe/liboqs/archive/refs/tags/${LIBOQS_VERSION}.tar.gz
RUN --mount=type=secret,id=ca \
    set -eu; \
    if [ "$WITH_LIBOQS" != 1 ]; then echo "WITH_LIBOQS=$WITH_LIBOQS: liboqs not built"; exit 0; fi; \
    ca=""; \
    if [ -s /run/secrets/ca ]; then ca="--cacert /run/secrets/ca"; fi; \
    curl $ca -fsSL --retry 3 -o /tmp/liboqs.tar.gz "$LIBOQS_URL"; \
    echo "$LIBOQS_SHA256  /tmp/liboqs.tar.gz" | sha256sum -c -; \
    mkdir /tmp/liboqs; \
    tar -xzf /tmp/liboqs.tar.gz -C /tmp/liboqs --strip-components=1; \
    cmake -S /tmp/liboqs -B /tmp/liboqs-build -G Ninja \
        -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_INSTALL_PREFIX=/usr/local \
        -DCMAKE_INSTALL_LIBDIR=lib \
        -DBUILD_SHARED_LIBS=ON \
        -DOQS_BUILD_ONLY_LIB=ON \
        -DOQS_DIST_BUILD=ON \
        -DOQS_USE_OPENSSL=OFF \
        -DOQS_MINIMAL_BUILD="KEM_ml_kem_512;KEM_ml_kem_768;KEM_ml_kem_1024;SIG_ml_dsa_44;SIG_ml_dsa_65;SIG_ml_dsa_87"; \
    cmake --build /tmp/liboqs-build; \
    DESTDIR=/out cmake --install /tmp/liboqs-build; \
    rm -rf /out/usr/local/include /out/usr/local/lib/cmake /out/usr/local/lib/pkgconfig \
        /tmp/liboqs /tmp/liboqs-build /tmp/liboqs.tar.gz; \
    ls -l /out/usr/local/lib

# ---------------------------------------------------------------------------------------
# Stage 3: the runtime image.
FROM base AS runtime
ARG WITH_LIBOQS
LABEL org.opencontainers.image.title="qkd-gateway" \
      org.opencontainers.image.description="Hybrid post-quantum + QKD site-to-site gateway (qkdgw)" \
      org.opencontainers.image.licenses="Apache-2.0"

# liboqs (when built) lands in /usr/local/lib; liboqs-python finds it via
# OQS_INSTALL_PATH and the loader cache, and never tries to download and build its own.
COPY --from=liboqs /out/ /
ENV OQS_INSTALL_PATH=/usr/local \
    PATH=/opt/qkdgw/bin:$PATH

# With liboqs: its ML-KEM and ML-DSA must interoperate with the OpenSSL backend.
ARG LIBOQS_SMOKE_TEST="import pqc, pqc.backend as b; p = b.probe_liboqs(); \
assert p.usable, p.reason; \
dk = pqc.get_kem('ML-KEM-768', 'liboqs').generate(); \
ct, ss = pqc.get_kem('ML-KEM-768', 'openssl').encapsulate(dk.encapsulation_key); \
assert dk.decapsulate(ct) == ss; \
sk = pqc.get_mldsa('ML-DSA-65', 'liboqs').generate(); \
assert pqc.get_mldsa('ML-DSA-65', 'openssl').verify(sk.public_key, sk.sign(b'm'), b'm'); \
print('liboqs', p.library, 'interoperates with OpenSSL: ML-KEM-768, ML-DSA-65')"

# The wheels' digests, a record of what the image was built from. Copied (not just
# bind-mounted) so that new wheels invalidate the cached install layer below: buildah
# does not include the contents of a RUN --mount=type=bind,from=... in its cache key.
COPY --from=wheels /wheels/SHA256SUMS /usr/local/share/qkdgw/wheels.sha256

# The project and its dependencies into a venv (works on the official python image and
# on a plain Debian python3 alike), offline from the wheels of stage 1; pip and
# setuptools are removed from it afterwards (not needed at run time), and so are the
# test suites numpy and scipy ship (~50 MB, never imported by qkdgw). Then the
# unprivileged user the processes run as.
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    set -eu; \
    ldconfig; \
    python3 -m venv /opt/qkdgw; \
    extra=""; \
    if [ "$WITH_LIBOQS" = 1 ]; then extra="liboqs-python"; fi; \
    /opt/qkdgw/bin/pip install --no-cache-dir --no-index --find-links=/wheels qkd-gateway $extra; \
    /opt/qkdgw/bin/pip uninstall --yes --quiet pip setuptools; \
    site="$(/opt/qkdgw/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"; \
    for pkg in numpy scipy; do \
        if [ -d "$site/$pkg" ]; then find "$site/$pkg" -depth -type d -name tests -exec rm -rf {} +; fi; \
    done; \
    groupadd --gid 10001 qkdgw; \
    useradd --uid 10001 --gid 10001 --home-dir /var/lib/qkdgw --no-create-home --no-log-init \
        --shell /usr/sbin/nologin qkdgw; \
    install -d -o 10001 -g 10001 -m 0700 /var/lib/qkdgw; \
    qkdgw --help >/dev/null; \
    python3 -c "import importlib as i, importlib.util as u; [i.import_module(m) for m in \
        ('numpy', 'scipy.fft', 'gateway.runtime', 'qkd.kme.service') if u.find_spec(m.split('.')[0])]"; \
    python3 -c "import pqc; print('pqc backends:', ', '.join(pqc.available_backends()))"; \
    python3 -c "import sys; from qkd import native; m = native.missing_kernels(); \
print('compiled kernels missing:', m) if m else print('compiled kernels: all built'); sys.exit(bool(m))"; \
    if [ "$WITH_LIBOQS" = 1 ]; then python3 -c "$LIBOQS_SMOKE_TEST"; fi

# State (SQLite key store, PSK epochs) and the mounted PKI/configs live under here.
WORKDIR /var/lib/qkdgw
USER 10001:10001
ENTRYPOINT ["qkdgw"]
CMD ["--help"]
