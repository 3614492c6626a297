#!/usr/bin/env bash
# Idempotent set-up: a .venv with the pinned requirements and scoreda installed editable,
# plus the Debian packages that the SLURM tooling needs, installed only when missing.
# Re-running is cheap: pip is skipped when the requirements file has not changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
venv="$root/.venv"

if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating $venv"
    "$py" -m venv "$venv"
fi

stamp="$venv/.scoreda-requirements.sha256"
want="$(cat env/requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing pinned requirements (log: $venv/setup.log)"
    log="$venv/setup.log"
    : > "$log"
    pipi() { "$venv/bin/python" -m pip install --quiet "$@" >>"$log" 2>&1 || { tail -n 30 "$log" >&2; exit 1; }; }
    pipi --upgrade pip
    # torch first and alone, so that no other package's open range pulls a CUDA build.
    pipi "$(grep -E '^torch==' env/requirements.txt)"
    pipi -r env/requirements.txt
    pipi --no-deps --no-build-isolation -e .
    # PYTHONDONTWRITEBYTECODE may be set: byte-compile once so CLI start-up stays fast.
    "$venv/bin/python" -m compileall -q "$venv/lib" >/dev/null 2>&1 || true
    echo "$want" > "$stamp"
fi

# Debian packages for the local SLURM (later stages); only when missing, never fatal for
# stages that do not need them.
need=()
for pkg in slurm-wlm munge; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing Debian packages: ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
            || echo "[setup] warning: could not install ${need[*]} (needed only for SLURM tests)" >&2
    else
        echo "[setup] note: ${need[*]} missing and not root; SLURM tests will be skipped" >&2
    fi
fi
echo "[setup] ok: $("$venv/bin/python" -c 'import torch, zarr, xarray; print("torch", torch.__version__, "zarr", zarr.__version__, "xarray", xarray.__version__)')"
