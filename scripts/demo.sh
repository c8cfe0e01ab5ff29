#!/usr/bin/env bash
# The main job: build two releases of a small image with real OCI tools, serve them from a
# registry on loopback, pull both with supermachine into its content-addressed layer cache, run
# one in a KVM microVM, bake a warm snapshot of it and run from that, and measure how much of the
# layers is redundant below the layer level.
#
# Everything is local: the registry listens on 127.0.0.1 only, and the image cache is .demo/cache
# (set SUPERMACHINE_CACHE_DIR to use another one); the guest kernel and agent, which are slow to
# build and keyed by their inputs, are shared with the user's cache.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
work=$(mktemp -d)
demo=$PWD/.demo
if [ -z "${SUPERMACHINE_CACHE_DIR:-}" ]; then
  shared=$(python -c 'from supermachine import paths; print(paths.cache_dir())')
  mkdir -p "$demo/cache"
  for artefact in kernels agent initramfs; do
    mkdir -p "$shared/$artefact"
    [ -e "$demo/cache/$artefact" ] || ln -s "$shared/$artefact" "$demo/cache/$artefact"
  done
  export SUPERMACHINE_CACHE_DIR="$demo/cache"
fi
registry_pid=""
cleanup() {
  [ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
log() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# A payload that real images carry: a language runtime's standard library (falls back to
# generated files where the host has none).
payload=/usr/lib/python3.11
make_payload() {
  local dest=$1
  mkdir -p "$dest"
  if [ -d "$payload" ]; then
    tar -C "$(dirname "$payload")" --exclude=__pycache__ -cf - "$(basename "$payload")" | tar -C "$dest" -xf -
  else
    for i in $(seq 1 400); do seq "$i" 99999 > "$dest/file$i.txt"; done
  fi
}

log "building demo/app:v1 and demo/app:v2 with umoci (busybox base + runtime layer)"
layout=$work/layout
umoci init --layout "$layout"
umoci new --image "$layout:v1"
umoci unpack --image "$layout:v1" "$work/b1" >/dev/null
mkdir -p "$work/b1/rootfs/bin"
cp /bin/busybox "$work/b1/rootfs/bin/busybox"
for applet in sh ls cat echo env uname wc; do ln -s busybox "$work/b1/rootfs/bin/$applet"; done
umoci repack --image "$layout:v1" "$work/b1"
umoci unpack --image "$layout:v1" "$work/b1b" >/dev/null
make_payload "$work/b1b/rootfs/usr/lib"
umoci repack --image "$layout:v1" "$work/b1b"
umoci config --image "$layout:v1" --config.cmd /bin/sh >/dev/null
# v2: the same base and a rebuilt runtime layer with a few files changed, as a CI rebuild produces.
umoci new --image "$layout:v2"
umoci unpack --image "$layout:v2" "$work/b2" >/dev/null
cp -a "$work/b1/rootfs/." "$work/b2/rootfs/"
umoci repack --image "$layout:v2" "$work/b2"
umoci unpack --image "$layout:v2" "$work/b2b" >/dev/null
make_payload "$work/b2b/rootfs/usr/lib"
# The first 25 sources in sorted order. No `| head` in a pipeline: under pipefail, the writer that
# head stops reading from dies of SIGPIPE and fails the script on hosts with many files.
mapfile -t sources < <(find "$work/b2b/rootfs/usr/lib" -name '*.py' | LC_ALL=C sort)
for f in "${sources[@]:0:25}"; do echo "# patched" >> "$f"; done
echo "release 2" > "$work/b2b/rootfs/RELEASE"
umoci repack --image "$layout:v2" "$work/b2b"
umoci config --image "$layout:v2" --config.cmd /bin/sh >/dev/null

log "serving them from a registry on loopback"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/registry.yml" <<YAML
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: 127.0.0.1:$port}
YAML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 1 50); do
  curl -fs "http://127.0.0.1:$port/v2/" >/dev/null 2>&1 && break
  sleep 0.1
done
for tag in v1 v2; do
  skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$layout:$tag" "docker://127.0.0.1:$port/demo/app:$tag"
done

log "pulling both releases with supermachine into $SUPERMACHINE_CACHE_DIR"
supermachine pull "127.0.0.1:$port/demo/app:v1"
supermachine pull "127.0.0.1:$port/demo/app:v2"
supermachine images

log "running demo/app:v1 in a microVM (the first boot also builds the guest kernel and agent)"
supermachine run "127.0.0.1:$port/demo/app:v1" -- sh -c \
  'echo "hello from $(uname -n), Linux $(uname -r)"; echo "$(find /usr/lib -type f | wc -l) files under /usr/lib"'

log "baking a snapshot of demo/app:v1 after a warm-up command, then restoring it instead of booting"
# A new name per run: from the second run on, the new snapshot is stored as a diff against the
# first (its golden), which `supermachine snapshots` shows.
snap=app-warm-$(date +%Y%m%d-%H%M%S)
supermachine snapshot --name "$snap" --memory 256 "127.0.0.1:$port/demo/app:v1" -- sh -c 'echo warmed > /tmp/state'
supermachine run "snapshot:$snap" -- sh -c 'echo "restored: $(cat /tmp/state)"'
supermachine snapshots
log "sub-layer redundancy of the layer cache"
supermachine probe chunk-dedup
