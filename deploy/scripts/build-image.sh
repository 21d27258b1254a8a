#!/usr/bin/env bash
# Build the lmps image (deploy/Dockerfile) — `make image`.
#
# With a registry and a package index in reach this is a plain `docker build`. Where the base
# image cannot be pulled (no registry; containers cannot reach a package index) it falls back
# to what works offline, automatically:
#   * a local base image made from Debian's packages with debootstrap (python3 + venv),
#     imported as $LMPS_LOCAL_BASE and kept: made once, reused while it exists;
#   * a wheelhouse in .wheelhouse/ downloaded on the host (pinned by requirements.txt,
#     deploy/requirements.lock and TORCH_SPEC), reused while those pins are unchanged.
# Each phase prints how long it took; the last line is the image and its size.
#
# Usage: deploy/scripts/build-image.sh [extra `docker build` arguments...]
# Env:
#   LMPS_IMAGE       tag to build (default lmps:latest)
#   BASE_IMAGE       base to try first (default python:3.11-slim-bookworm)
#   LMPS_OFFLINE     auto (default): fall back when BASE_IMAGE cannot be had;
#                    1: always use the local base and the wheelhouse; 0: never
#   LMPS_LOCAL_BASE  tag of the debootstrap base (default lmps-base:bookworm)
#   DEBIAN_MIRROR    mirror for debootstrap (default: the one this host's apt uses)
#   TORCH_SPEC, TORCH_INDEX_URL, PIP_INDEX_URL  passed to the build (see deploy/Dockerfile)
#   PULL_TIMEOUT_S   how long to try pulling BASE_IMAGE (default 120)
#   LMPS_BASE_ONLY   1: with LMPS_OFFLINE=1, make the local base and stop (used by
#                    build-prometheus-image.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."

LMPS_IMAGE="${LMPS_IMAGE:-lmps:latest}"
BASE_IMAGE="${BASE_IMAGE:-python:3.11-slim-bookworm}"
LMPS_OFFLINE="${LMPS_OFFLINE:-auto}"
LMPS_LOCAL_BASE="${LMPS_LOCAL_BASE:-lmps-base:bookworm}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PULL_TIMEOUT_S="${PULL_TIMEOUT_S:-120}"
PYTHON="${PYTHON:-python3}"
SUITE=bookworm            # Debian release of the local base: its python3 is 3.11, like the wheels
WHEELHOUSE_DIR=.wheelhouse
# Build-only tools the Dockerfile installs next to the runtime dependencies.
BUILD_TOOLS=(grpcio-tools==1.85.1 "setuptools>=68,<90" wheel)

log() { printf '[build-image] %s\n' "$*" >&2; }
now() { date +%s; }

# ---------------------------------------------------------------- choose the base
base_available() {
    docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && return 0
    log "pulling $BASE_IMAGE"
    timeout "$PULL_TIMEOUT_S" docker pull -q "$BASE_IMAGE" >/dev/null 2>&1
}

# The mirror this host's apt uses for $SUITE (deb822 or one-line sources), if any.
host_debian_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            /^URIs:/ { uri = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) found = uri }
            /^$/ { if (found) { print found; exit } uri = "" }
            END { if (found) print found }' "$f" | head -n 1
    done
    if [ -f /etc/apt/sources.list ]; then
        awk -v suite="$SUITE" '$1 == "deb" && $3 == suite { print $2; exit }' /etc/apt/sources.list
    fi
}

ensure_local_base() {
    if docker image inspect "$LMPS_LOCAL_BASE" >/dev/null 2>&1; then
        log "local base $LMPS_LOCAL_BASE exists: reusing it"
        return
    fi
    local t0 rootfs mirror
    t0=$(now)
    if ! command -v debootstrap >/dev/null 2>&1; then
        log "installing debootstrap"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    fi
    mirror="${DEBIAN_MIRROR:-$(host_debian_mirror | head -n 1)}"
    rootfs="$(mktemp -d)"
    log "debootstrap $SUITE (minbase + python3, python3-venv) from ${mirror:-the default mirror}"
    debootstrap --variant=minbase --include=python3,python3-venv "$SUITE" "$rootfs" \
        ${mirror:+"$mirror"} >/tmp/lmps-debootstrap.log 2>&1 || {
        tail -n 20 /tmp/lmps-debootstrap.log >&2
        rm -rf "$rootfs"
        exit 1
    }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["python3"]' \
        - "$LMPS_LOCAL_BASE" >/dev/null
    rm -rf "$rootfs"
    log "local base $LMPS_LOCAL_BASE made in $(($(now) - t0)) s"
}

# ---------------------------------------------------------------- wheelhouse
wheelhouse_key() {
    {
        cat requirements.txt deploy/requirements.lock
        echo "$TORCH_SPEC" "${BUILD_TOOLS[@]}" "$(uname -m)"
    } | sha256sum | cut -d' ' -f1
}

ensure_wheelhouse() {
    local key t0
    key="$(wheelhouse_key)"
    if [ -f "$WHEELHOUSE_DIR/.key" ] && [ "$(cat "$WHEELHOUSE_DIR/.key")" = "$key" ]; then
        log "wheelhouse $WHEELHOUSE_DIR/ is current: reusing it"
        return
    fi
    t0=$(now)
    log "downloading the wheelhouse into $WHEELHOUSE_DIR/ (cp311, $(uname -m))"
    rm -rf "$WHEELHOUSE_DIR"
    mkdir -p "$WHEELHOUSE_DIR"
    # Wheels for the image's interpreter (CPython 3.11, glibc 2.36), whatever the host runs:
    # pip takes a manylinux tag literally, so list every glibc level up to bookworm's.
    local arch platforms=() v
    arch="$(uname -m)"
    for v in $(seq 5 36); do platforms+=(--platform "manylinux_2_${v}_${arch}"); done
    platforms+=(--platform "manylinux2014_${arch}" --platform "manylinux2010_${arch}")
    platforms+=(--platform "manylinux1_${arch}")
    "$PYTHON" -m pip download -q --disable-pip-version-check -d "$WHEELHOUSE_DIR" \
        --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 \
        "${platforms[@]}" \
        -c deploy/requirements.lock -r requirements.txt "$TORCH_SPEC" "${BUILD_TOOLS[@]}"
    echo "$key" >"$WHEELHOUSE_DIR/.key"
    log "wheelhouse: $(find "$WHEELHOUSE_DIR" -name '*.whl' | wc -l) wheels," \
        "$(du -sh "$WHEELHOUSE_DIR" | cut -f1), in $(($(now) - t0)) s"
}

# ---------------------------------------------------------------- build
offline=0
case "$LMPS_OFFLINE" in
    1) offline=1 ;;
    0) offline=0 ;;
    auto) base_available || offline=1 ;;
    *) log "LMPS_OFFLINE must be auto, 0 or 1"; exit 2 ;;
esac

build_args=(--build-arg "TORCH_SPEC=$TORCH_SPEC")
[ -n "${TORCH_INDEX_URL+x}" ] && build_args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
[ -n "${PIP_INDEX_URL:-}" ] && build_args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")
if [ "$offline" = 1 ]; then
    log "$BASE_IMAGE cannot be had: building offline from a local base and a wheelhouse"
    ensure_local_base
    if [ "${LMPS_BASE_ONLY:-0}" = 1 ]; then
        exit 0
    fi
    ensure_wheelhouse
    build_args+=(--build-arg "BASE_IMAGE=$LMPS_LOCAL_BASE" --build-arg WHEELHOUSE=auto)
else
    build_args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg WHEELHOUSE=off)
fi

# The classic builder when BuildKit's CLI plugin (buildx) is missing: the Dockerfile needs
# no BuildKit feature, and the CLI refuses DOCKER_BUILDKIT=1 without buildx.
if [ -z "${DOCKER_BUILDKIT:-}" ] && ! docker buildx version >/dev/null 2>&1; then
    export DOCKER_BUILDKIT=0
fi

t0=$(now)
log "docker build -t $LMPS_IMAGE ${build_args[*]} $*"
docker build -f deploy/Dockerfile -t "$LMPS_IMAGE" "${build_args[@]}" "$@" . >&2
size=$(docker image inspect -f '{{.Size}}' "$LMPS_IMAGE")
log "image build took $(($(now) - t0)) s"
echo "$LMPS_IMAGE $((size / 1024 / 1024)) MiB"
