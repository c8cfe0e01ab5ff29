#!/usr/bin/env bash
# Build the distributable wheel into dist/: stage the guest kernels (both profiles), the agent and
# the VMM worker into the package (scripts/stage_wheel_artefacts.py; the recipes' input-keyed caches
# make this cheap after the first time), then `maturin build --release` with the manylinux tag of
# pyproject.toml. Prints the wheel's path on the last line of stdout.
#   scripts/build-wheel.sh [--sdist]   --sdist: also write the source distribution into dist/
set -euo pipefail
cd "$(dirname "$0")/.."
maturin=${MATURIN:-.venv/bin/maturin}
[ -x "$maturin" ] || maturin=$(command -v maturin) ||
  { echo "error: maturin not found; run scripts/setup.sh" >&2; exit 1; }

python3 scripts/stage_wheel_artefacts.py
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$maturin" build --release --out "$out" >&2
if [ "${1:-}" = --sdist ]; then
  "$maturin" sdist --out dist >&2
fi
mkdir -p dist
wheel=$(ls "$out"/*.whl)
mv -f "$wheel" dist/
wheel=dist/$(basename "$wheel")
echo "wheel: $wheel, $(( $(stat -c %s "$wheel") / 1024 )) KiB" >&2
echo "$wheel"
