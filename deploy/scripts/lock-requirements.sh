#!/usr/bin/env bash
# Regenerate deploy/requirements.lock: resolve requirements.txt plus torch in a throwaway venv
# and pin everything that lands there (torch itself stays pinned by TORCH_SPEC).
set -euo pipefail
cd "$(dirname "$0")/../.."
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --disable-pip-version-check "$TORCH_SPEC" -r requirements.txt
{
    echo "# Runtime dependencies of the image, fully pinned (direct deps from requirements.txt plus"
    echo "# everything they and torch pull in). Used as a pip constraints file by deploy/Dockerfile and"
    echo "# deploy/scripts/build-image.sh; torch itself is pinned by the TORCH_SPEC build argument."
    echo "# Regenerate after changing requirements.txt: bash deploy/scripts/lock-requirements.sh"
    "$tmp/venv/bin/pip" freeze --all | grep -v -E '^(torch|pip|wheel)=='
} >deploy/requirements.lock
echo "wrote deploy/requirements.lock ($(grep -c '==' deploy/requirements.lock) pins)"
