#!/usr/bin/env bash
# One-shot, idempotent set-up of a fresh Debian/Ubuntu machine for supermachine development:
# system packages, a virtualenv in .venv, the Rust extension built and installed into it.
# Usage: scripts/setup.sh [extra,extra...]   (extras from pyproject: test, lint, bench)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test,lint}"

log() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# 1. System packages: install only what is missing, so repeated runs cost nothing.
mapfile -t wanted < <(grep -v -e '^#' -e '^$' scripts/apt-packages.txt)
missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  log "installing system packages: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. Rust toolchain must already exist (rustup); say so plainly if it does not.
command -v cargo >/dev/null || { echo "error: cargo not found; install Rust with rustup first" >&2; exit 1; }

# 3. Python virtualenv with the build backend and the requested extras.
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  "$python" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
stamp=.venv/.deps-$(cat pyproject.toml scripts/apt-packages.txt | sha256sum | cut -c1-16)-${extras//,/_}
if [ ! -f "$stamp" ]; then
  log "installing Python build and dev dependencies ($extras)"
  python -m pip install -q --upgrade pip
  python -m pip install -q "maturin>=1.7,<2"
fi

# 4. Build the Rust core in release mode and install the package (editable) with its extras.
log "building the Rust core (release) and installing supermachine"
# Quiet when it works (pip lists every satisfied requirement); the whole log when it does not.
if ! maturin develop --release -q -E "$extras" >.venv/build.log 2>&1; then
  cat .venv/build.log >&2
  echo "error: building or installing supermachine failed (log above, also in .venv/build.log)" >&2
  exit 1
fi
python -c "import supermachine._core" || { echo "error: the extension did not build or import" >&2; exit 1; }

# 5. The VMM worker executable (one process per VM), installed next to the package.
log "building the VMM worker (supermachine-vmm)"
if ! cargo build --release -q -p supermachine-core --bin supermachine-vmm >>.venv/build.log 2>&1; then
  cat .venv/build.log >&2
  echo "error: building the VMM worker failed (log above, also in .venv/build.log)" >&2
  exit 1
fi
pkg_dir=$(python -c "import supermachine, pathlib; print(pathlib.Path(supermachine.__file__).parent)")
mkdir -p "$pkg_dir/bin"
install -m 0755 target/release/supermachine-vmm "$pkg_dir/bin/supermachine-vmm.tmp"
mv -f "$pkg_dir/bin/supermachine-vmm.tmp" "$pkg_dir/bin/supermachine-vmm"
touch "$stamp"
