#!/usr/bin/env bash
# Host tools only the benchmarks need, built from crates.io into the user cache (keyed by name and
# version, so a second run costs nothing). Prints the directory to put on PATH.
#   vhost-device-vsock: QEMU's vsock on hosts without /dev/vhost-vsock, so the network benchmark
#   reaches the guest agent in its QEMU peer.
# And the Debian packages only the benchmarks need, installed with apt-get where they are missing
# (everything else comes from scripts/apt-packages.txt, through scripts/setup.sh):
#   duperemove: the block-level dedupe peer of the snapshot dedup benchmark.
set -euo pipefail

BENCH_APT_PACKAGES=(duperemove)

if command -v apt-get >/dev/null && command -v dpkg-query >/dev/null; then
  missing=()
  for pkg in "${BENCH_APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    printf '\033[1m==> %s\033[0m\n' "installing benchmark-only system packages: ${missing[*]}" >&2
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

VHOST_DEVICE_VSOCK=0.3.0

cache="${XDG_CACHE_HOME:-$HOME/.cache}/supermachine/tools"
root="$cache/vhost-device-vsock-$VHOST_DEVICE_VSOCK"
if [ ! -x "$root/bin/vhost-device-vsock" ]; then
  printf '\033[1m==> %s\033[0m\n' "building vhost-device-vsock $VHOST_DEVICE_VSOCK (once; a few minutes)" >&2
  # Built into a scratch root and renamed into place: an interrupted build leaves nothing behind
  # that the check above would take for a finished one.
  scratch="$cache/.vhost-device-vsock-$VHOST_DEVICE_VSOCK.$$"
  rm -rf "$scratch"
  mkdir -p "$cache"
  cargo install --quiet --locked --root "$scratch" "vhost-device-vsock@$VHOST_DEVICE_VSOCK" >&2
  rm -rf "$root"
  mv "$scratch" "$root"
fi
echo "$root/bin"
