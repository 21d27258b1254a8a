#!/usr/bin/env bash
# Print the name of a Prometheus image that exists locally, making one if need be.
#
# Tries $PROMETHEUS_IMAGE (default: the one docker-compose.yml names) locally, then pulls it.
# Where no registry is in reach, builds $PROMETHEUS_LOCAL_IMAGE instead: Debian's `prometheus`
# package binary (downloaded on the host with apt-get, not installed there) on the local
# debootstrap base that build-image.sh makes. Made once, reused while it exists.
#
# Usage: PROMETHEUS_IMAGE=$(deploy/scripts/build-prometheus-image.sh)
#        docker compose --profile monitoring up
set -euo pipefail
cd "$(dirname "$0")/../.."

PROMETHEUS_IMAGE="${PROMETHEUS_IMAGE:-prom/prometheus:v3.5.0}"
PROMETHEUS_LOCAL_IMAGE="${PROMETHEUS_LOCAL_IMAGE:-lmps-prometheus:local}"
LMPS_LOCAL_BASE="${LMPS_LOCAL_BASE:-lmps-base:bookworm}"
PULL_TIMEOUT_S="${PULL_TIMEOUT_S:-120}"
log() { printf '[build-prometheus-image] %s\n' "$*" >&2; }

for image in "$PROMETHEUS_IMAGE" "$PROMETHEUS_LOCAL_IMAGE"; do
    if docker image inspect "$image" >/dev/null 2>&1; then
        echo "$image"
        exit 0
    fi
done
if timeout "$PULL_TIMEOUT_S" docker pull -q "$PROMETHEUS_IMAGE" >/dev/null 2>&1; then
    echo "$PROMETHEUS_IMAGE"
    exit 0
fi

log "$PROMETHEUS_IMAGE cannot be pulled: building $PROMETHEUS_LOCAL_IMAGE from Debian's package"
if ! docker image inspect "$LMPS_LOCAL_BASE" >/dev/null 2>&1; then
    # build-image.sh makes the base on its offline path; ask it for just that.
    LMPS_OFFLINE=1 LMPS_BASE_ONLY=1 bash deploy/scripts/build-image.sh >&2
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download prometheus >/dev/null 2>&1) || {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    (cd "$tmp" && apt-get download prometheus >/dev/null)
}
dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
mkdir -p "$tmp/ctx"
cp "$tmp/root/usr/bin/prometheus" "$tmp/ctx/prometheus"
cat >"$tmp/ctx/Dockerfile" <<EOF
FROM $LMPS_LOCAL_BASE
COPY prometheus /bin/prometheus
RUN mkdir -p /prometheus /etc/prometheus && chown 65534:65534 /prometheus
USER 65534:65534
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
EOF
DOCKER_BUILDKIT=0 docker build -q -t "$PROMETHEUS_LOCAL_IMAGE" "$tmp/ctx" >/dev/null
log "built $PROMETHEUS_LOCAL_IMAGE ($("$tmp/root/usr/bin/prometheus" --version 2>&1 | head -n 1))"
echo "$PROMETHEUS_LOCAL_IMAGE"
