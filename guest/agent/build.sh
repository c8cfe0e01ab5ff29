#!/usr/bin/env bash
# Builds the guest agent as a static x86_64 Linux binary and prints its path on the last line.
#
#   guest/agent/build.sh               build (or reuse the cached build), print the path
#   guest/agent/build.sh --print-path  only print where the binary for the current sources lives
#
# The result is cached in ${SUPERMACHINE_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/supermachine}/agent/
# <key>/supermachine-agent, where <key> hashes the sources, Cargo.toml, Cargo.lock, this script, the
# flags and the toolchain version. The binary is moved into place with one rename.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${SUPERMACHINE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/supermachine}
target=x86_64-unknown-linux-gnu
# crt-static: no dynamic loader in the guest. relocation-model=static: a plain static executable
# rather than static-pie, so start-up does not relocate itself (fewer pages touched).
flags="-C target-feature=+crt-static -C relocation-model=static"

die() { echo "build.sh: error: $*" >&2; exit 1; }

print_only=0
case "${1:-}" in
  --print-path) print_only=1 ;;
  "") ;;
  *) die "unknown argument $1 (expected --print-path or nothing)" ;;
esac

command -v cargo >/dev/null || die "cargo not found; install Rust with rustup"
command -v rustc >/dev/null || die "rustc not found; install Rust with rustup"

key=$(
  cd "$here"
  {
    echo "flags $flags"
    echo "target $target"
    rustc -vV
    cargo -V
    find src -type f -name '*.rs' | LC_ALL=C sort | while read -r f; do
      echo "file $f $(sha256sum < "$f" | cut -c1-64)"
    done
    for f in Cargo.toml Cargo.lock build.sh; do
      echo "file $f $(sha256sum < "$f" | cut -c1-64)"
    done
  } | sha256sum | cut -c1-16
)
dest_dir="$cache/agent/$key"
dest="$dest_dir/supermachine-agent"

if [ "$print_only" = 1 ] || [ -x "$dest" ]; then
  echo "$dest"
  exit 0
fi

mkdir -p "$cache/agent"
exec 9>"$cache/agent/.build.lock"
flock 9
if [ -x "$dest" ]; then  # built by someone else while we waited for the lock
  echo "$dest"
  exit 0
fi

echo "building the guest agent ($key)" >&2
# Build scripts and proc macros are unaffected by RUSTFLAGS because --target is explicit.
(
  cd "$here"
  RUSTFLAGS="$flags" CARGO_TARGET_DIR="$cache/agent/target" \
    nice -n 10 cargo build --release --locked --target "$target" >&2
) || die "cargo build failed"
built="$cache/agent/target/$target/release/supermachine-agent"
[ -f "$built" ] || die "cargo did not produce $built"
if command -v readelf >/dev/null && readelf -lW "$built" | grep -q 'INTERP'; then
  die "$built is dynamically linked (has a program interpreter)"
fi

mkdir -p "$dest_dir"
tmp=$(mktemp "$dest_dir/.supermachine-agent.XXXXXX")
cp "$built" "$tmp"
chmod 0755 "$tmp"
mv -f "$tmp" "$dest"
echo "$dest"
