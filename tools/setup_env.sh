#!/usr/bin/env bash
# Create or update the project's virtual environment at <repo>/.venv from requirements.lock.
#
#   bash tools/setup_env.sh            # idempotent: a no-op when the lock has not changed
#
# What it does, in order:
#   1. finds Python 3.12 (TOPD_PYTHON, python3.12 on PATH, or pyenv's 3.12.x);
#   2. bootstraps uv (a fast resolver/installer) into a cache directory outside the clone;
#   3. syncs .venv to requirements.lock exactly, then installs megatron-bridge==0.6.2 with --no-deps
#      (its declared dependencies cannot co-resolve with SGLang; the ones it needs at run time are in the lock);
#   4. on a machine without a CUDA driver, removes sgl-flash-mla (it raises OSError at import there, and
#      Megatron-Core's attention module only catches ImportError);
#   5. installs this package in editable mode.
# A stamp holding the hash of requirements.lock + pyproject.toml + this script skips all of it when nothing changed.
#
# Environment: TOPD_CACHE_DIR (default ~/.cache/topd-megatron) holds uv and its package cache, so a fresh clone
# builds its venv in seconds once the cache is warm. UV_CACHE_DIR may point elsewhere.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
cache="${TOPD_CACHE_DIR:-$HOME/.cache/topd-megatron}"
mkdir -p "$cache"

is_py312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; }

find_python() {
    local c
    for c in "${TOPD_PYTHON:-}" python3.12 $(ls -d "$(pyenv root 2>/dev/null)"/versions/3.12.*/bin/python 2>/dev/null | sort -V -r); do
        if [[ -n "$c" ]] && is_py312 "$c"; then command -v "$c"; return; fi
    done
    echo "error: Python 3.12 not found. Install it (e.g. 'pyenv install 3.12') or set TOPD_PYTHON=/path/to/python3.12" >&2
    exit 1
}

python="$(find_python)"
stamp="$venv/.topd-env-stamp"
want="$(cat "$repo/requirements.lock" "$repo/pyproject.toml" "$repo/tools/setup_env.sh" | sha256sum | cut -c1-16)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/python" ]]; then
    echo "[setup_env] .venv is up to date ($want)"
    exit 0
fi

# uv lives in its own small venv in the cache, never in the project's.
uv_home="$cache/uv-bootstrap"
if [[ ! -x "$uv_home/bin/uv" ]]; then
    echo "[setup_env] bootstrapping uv into $uv_home"
    "$python" -m venv "$uv_home"
    "$uv_home/bin/python" -m pip install --quiet --disable-pip-version-check "uv==0.13.9"
fi
uv="$uv_home/bin/uv"
export UV_SYSTEM_CERTS=1
export UV_CACHE_DIR="${UV_CACHE_DIR:-$cache/uv-cache}"
export UV_LINK_MODE="${UV_LINK_MODE:-hardlink}"
# Respect a site-wide torch cap if the machine has one (pip reads it; uv does not by default).
if [[ -f /etc/xdg/pip/constraints.txt && -z "${UV_CONSTRAINT:-}" ]]; then
    export UV_CONSTRAINT=/etc/xdg/pip/constraints.txt
fi

if [[ ! -x "$venv/bin/python" ]]; then
    echo "[setup_env] creating $venv with $python"
    "$uv" venv --quiet --python "$python" "$venv"
fi
echo "[setup_env] syncing .venv to requirements.lock"
# Byte-compile at install: imports of torch/Megatron/SGLang then cost ~15 s less per process where
# PYTHONDONTWRITEBYTECODE is set (as on CI machines), and every rank, server and test pays them.
"$uv" pip sync --quiet --compile-bytecode --python "$venv/bin/python" "$repo/requirements.lock"
"$uv" pip install --quiet --python "$venv/bin/python" --no-deps "megatron-bridge==0.6.2"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup_env] no CUDA driver: removing sgl-flash-mla (raises OSError at import without a GPU)"
    "$uv" pip uninstall --quiet --python "$venv/bin/python" sgl-flash-mla || true
fi
"$uv" pip install --quiet --python "$venv/bin/python" --no-deps -e "$repo"
echo "$want" > "$stamp"
echo "[setup_env] .venv ready"
