# Sourced by scripts/serve and scripts/test: makes .venv (or $TENSORWIRE_VENV) with the
# given extras installed, reinstalling only when pyproject.toml changed.
# torch is pinned to 2.13.0 in pyproject.toml: an unpinned torch pulls GBs of CUDA wheels.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${TENSORWIRE_VENV:-$root/.venv}
extras=$1
stamp="$venv/.tensorwire-$extras"
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -e "$root[$extras]"
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
cd "$root"
