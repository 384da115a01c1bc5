# Sourced by scripts/serve and scripts/test: makes .venv (or $TENSORWIRE_VENV) with the
# given parts installed, reinstalling only when a pyproject.toml changed. Parts, comma
# separated: "server" (both distributions, editable: client/ and server/), and the
# dependency groups of the root pyproject.toml ("dev", "bench").
# torch is pinned to 2.13.0 in server/pyproject.toml: an unpinned torch pulls GBs of CUDA wheels.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${TENSORWIRE_VENV:-$root/.venv}
parts=$1
stamp="$venv/.tensorwire-$parts"
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
stale=0
[ -f "$stamp" ] || stale=1
for manifest in "$root/pyproject.toml" "$root/client/pyproject.toml" "$root/server/pyproject.toml"; do
    [ "$manifest" -nt "$stamp" ] && stale=1
done
if [ "$stale" = 1 ]; then
    # pip 25.1 or newer reads dependency groups (--group).
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    args=(-e "$root/client")
    IFS=, read -ra wanted <<<"$parts"
    for part in "${wanted[@]}"; do
        case "$part" in
            server) args+=(-e "$root/server") ;;
            *) args+=(--group "$root/pyproject.toml:$part") ;;
        esac
    done
    "$venv/bin/python" -m pip install --quiet "${args[@]}"
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
cd "$root"
