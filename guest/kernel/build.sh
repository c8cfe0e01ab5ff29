#!/usr/bin/env bash
# Build the supermachine guest kernel: an uncompressed vmlinux with a PVH entry point.
#
#   build.sh PROFILE                 build (or take from the cache); last stdout line: path to vmlinux
#   build.sh --print-path PROFILE    print where vmlinux for the current inputs lives; never builds
#   build.sh --config-only PROFILE   prepare and check .config only; last stdout line: path to .config
#   build.sh --inputs PROFILE        print the config fragments and patches PROFILE is built from
#   build.sh --profiles              print the profiles, one per line
#
# Profiles: "normal" (hardware KVM), "compat" (hosts that emulate guest kernel code: one CPU) and
# "compat-smp" (compat with SMP, for VMs of more than one vCPU on such hosts). See README.md.
#
# Environment:
#   SUPERMACHINE_CACHE_DIR       cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/supermachine)
#   SUPERMACHINE_KERNEL_SOURCE   kernel source tarball (default /usr/src/linux-source-6.12.tar.xz)
#   SUPERMACHINE_KERNEL_JOBS     parallel make jobs (default: nproc)
#
# Only the final path goes to stdout; progress goes to stderr, compiler output to a log file.
set -euo pipefail

readonly PROFILES=(normal compat compat-smp)
# A profile that builds on another takes its patches, and merges its own config fragment after the
# other's.
declare -rA PARENT=([compat-smp]=compat)
readonly SRC_PKG=linux-source-6.12

prog=build.sh
die() {
	echo "$prog: error: $*" >&2
	exit 1
}
log() { echo "$prog: $*" >&2; }
usage() {
	local IFS='|'
	echo "usage: $prog [--print-path | --config-only | --inputs] {${PROFILES[*]}} | --profiles"
}

# Everything runs inside main() so bash has parsed the whole script before it starts: editing
# this file while a build runs must not change what that build does.
main() {
	here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
	self="$here/$(basename "${BASH_SOURCE[0]}")"

	mode=build
	case "${1:-}" in
	--print-path) mode=print-path && shift ;;
	--config-only) mode=config-only && shift ;;
	--inputs) mode=inputs && shift ;;
	--profiles) printf '%s\n' "${PROFILES[@]}" && exit 0 ;;
	-h | --help) usage && exit 0 ;;
	-*) usage >&2 && exit 2 ;;
	esac
	if [[ $# -ne 1 ]]; then
		usage >&2
		exit 2
	fi
	profile=$1
	known=0
	for p in "${PROFILES[@]}"; do [[ $p == "$profile" ]] && known=1; done
	((known)) || die "unknown profile '$profile' (expected one of: ${PROFILES[*]})"

	# ---- inputs -------------------------------------------------------------------------------------
	# The profile's lineage, oldest first: its fragments merge in this order, and it takes the
	# patches of every profile in it.
	lineage=("$profile")
	while [[ -v PARENT[${lineage[0]}] ]]; do lineage=("${PARENT[${lineage[0]}]}" "${lineage[@]}"); done
	fragments=("$here/config/base.config")
	patches=()
	for p in "${lineage[@]}"; do
		[[ -f $here/config/$p.config ]] && fragments+=("$here/config/$p.config")
		if [[ -d $here/patches/$p ]]; then
			while IFS= read -r -d '' f; do patches+=("$f"); done \
				< <(find "$here/patches/$p" -maxdepth 1 -name '*.patch' -print0 | LC_ALL=C sort -z)
		fi
	done
	if [[ $mode == inputs ]]; then
		printf '%s\n' "${fragments[@]#"$here"/}" "${patches[@]#"$here"/}"
		exit 0
	fi

	src_tar=${SUPERMACHINE_KERNEL_SOURCE:-/usr/src/$SRC_PKG.tar.xz}
	[[ -f $src_tar ]] ||
		die "kernel source $src_tar not found: install the Debian package $SRC_PKG (apt-get install $SRC_PKG)"
	src_size=$(stat -c %s "$src_tar")
	if [[ -z ${SUPERMACHINE_KERNEL_SOURCE:-} ]]; then
		src_version=$(dpkg-query -W -f='${Version}' "$SRC_PKG" 2>/dev/null || true)
		[[ -n $src_version ]] || src_version="unpackaged-$(stat -c %Y "$src_tar")"
		src_id="$SRC_PKG-$src_version-$src_size"
	else
		src_id="$(basename "$src_tar")-$(stat -c %Y "$src_tar")-$src_size"
	fi
	src_id=${src_id//[^A-Za-z0-9._+-]/_}

	# Digest of a list of files, by path relative to this directory and content.
	digest_files() {
		local f
		for f in "$@"; do
			printf 'file %s %s\n' "${f#"$here"/}" "$(sha256sum <"$f" | cut -d' ' -f1)"
		done
	}

	# kbuild uses gcc whatever CC says in the environment.
	cc_id=$( (gcc --version 2>/dev/null || echo "no compiler") | head -n1)
	patch_key=$( {
		echo "source $src_id"
		digest_files "${patches[@]}"
	} | sha256sum | cut -c1-16)
	key=$( {
		echo "profile $profile"
		echo "source $src_id"
		echo "compiler $cc_id"
		digest_files "$self" "${fragments[@]}" "${patches[@]}"
	} | sha256sum | cut -c1-16)

	cache_root=${SUPERMACHINE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/supermachine}
	kdir=$cache_root/kernels
	out=$kdir/$profile-$key

	if [[ $mode == print-path ]]; then
		echo "$out/vmlinux"
		exit 0
	fi
	if [[ $mode == build && -f $out/vmlinux ]]; then
		echo "$out/vmlinux"
		exit 0
	fi

	# ---- one build at a time --------------------------------------------------------------------------
	mkdir -p "$kdir"
	if command -v flock >/dev/null; then
		exec 9>"$kdir/.build.lock"
		if ! flock -n 9; then
			log "waiting for another kernel build to finish"
			flock 9
		fi
		if [[ $mode == build && -f $out/vmlinux ]]; then
			echo "$out/vmlinux"
			exit 0
		fi
	fi

	# ---- pristine source, extracted once per source version --------------------------------------------
	pristine=$kdir/src/$src_id
	if [[ ! -f $pristine/.extracted ]]; then
		log "extracting $src_tar"
		rm -rf "$pristine" "$pristine.tmp"
		mkdir -p "$pristine.tmp"
		tar -xf "$src_tar" -C "$pristine.tmp" --strip-components=1
		[[ -f $pristine.tmp/Makefile && -d $pristine.tmp/arch/x86 ]] ||
			die "$src_tar does not look like a Linux source tarball"
		touch "$pristine.tmp/.extracted"
		mv -T "$pristine.tmp" "$pristine"
	fi

	# ---- per-profile work tree: hard-linked copy of the source plus this profile's patches -------------
	# `patch` replaces the files it changes, so the pristine tree is never modified. The object directory
	# survives config changes (kbuild rebuilds what changed) but not patch changes: a removed patch would
	# leave sources older than their objects.
	work=$kdir/work/$profile
	tree=$work/src
	obj=$work/obj
	buildlog=$work/build.log
	if [[ ! -f $work/.patches || $(<"$work/.patches") != "$patch_key" ]]; then
		log "preparing source tree for profile $profile"
		rm -rf "$work"
		mkdir -p "$work"
		cp -al "$pristine" "$tree"
		rm -f "$tree/.extracted"
		for p in "${patches[@]}"; do
			log "applying ${p#"$here"/}"
			patch -p1 -d "$tree" --forward --batch --quiet <"$p" >&2 ||
				die "patch ${p#"$here"/} does not apply to $src_id"
		done
		mkdir -p "$obj"
		echo "$patch_key" >"$work/.patches"
	fi
	: >"$buildlog"

	kmake() { nice -n 10 make -C "$tree" O="$obj" "$@" >>"$buildlog" 2>&1; }
	fail_with_log() {
		tail -n 30 "$buildlog" >&2 || true
		die "$1 (full log: $buildlog)"
	}

	# ---- configuration ------------------------------------------------------------------------------
	log "configuring (tinyconfig + ${fragments[*]##*/})"
	kmake tinyconfig || fail_with_log "make tinyconfig failed"
	# Kconfig reads later assignments over earlier ones, so appending the fragments merges them.
	cat "${fragments[@]}" >>"$obj/.config"
	kmake olddefconfig || fail_with_log "make olddefconfig failed"

	# olddefconfig silently drops options whose dependencies are missing: compare with what was asked
	# for (the last fragment that mentions a symbol wins).
	declare -A wanted=()
	order=()
	while IFS= read -r line; do
		if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
			sym=${BASH_REMATCH[1]} val=${BASH_REMATCH[2]}
		elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set ]]; then
			sym=${BASH_REMATCH[1]} val=n
		else
			continue
		fi
		[[ -v wanted[$sym] ]] || order+=("$sym")
		wanted[$sym]=$val
	done < <(cat "${fragments[@]}")
	bad=()
	for sym in "${order[@]}"; do
		got=$(sed -n -e "s/^$sym=\(.*\)$/\1/p" "$obj/.config")
		if [[ ${wanted[$sym]} == n ]]; then
			[[ -z $got || $got == n ]] || bad+=("$sym (wanted n, got $got)")
		elif [[ $got != "${wanted[$sym]}" ]]; then
			bad+=("$sym (wanted ${wanted[$sym]}, got ${got:-unset})")
		fi
	done
	if ((${#bad[@]})); then
		msg=$(printf '%s; ' "${bad[@]}")
		die "options did not stick in .config (unmet dependencies?): ${msg%; }"
	fi
	log "all ${#order[@]} requested options are in .config"

	if [[ $mode == config-only ]]; then
		echo "$obj/.config"
		exit 0
	fi

	# ---- build --------------------------------------------------------------------------------------
	jobs=${SUPERMACHINE_KERNEL_JOBS:-$(nproc)}
	log "building vmlinux for profile $profile with $jobs jobs (log: $buildlog)"
	start=$SECONDS
	kmake -j"$jobs" vmlinux || fail_with_log "kernel build failed"
	log "built in $((SECONDS - start)) s"

	# The PVH entry point is an ELF note of type XEN_ELFNOTE_PHYS32_ENTRY (18) owned by "Xen".
	if command -v readelf >/dev/null &&
		! LC_ALL=C readelf -n "$obj/vmlinux" | grep -A1 -E '^ +Xen ' | grep -qiE '0x00000012|PHYS32_ENTRY'; then
		die "$obj/vmlinux has no PVH entry note (is CONFIG_PVH set?)"
	fi

	# ---- store atomically -----------------------------------------------------------------------------
	tmp=$(mktemp -d "$kdir/.tmp-$profile-$key.XXXXXX")
	cp "$obj/vmlinux" "$tmp/vmlinux"
	cp "$obj/.config" "$tmp/.config"
	{
		echo "profile $profile"
		echo "key $key"
		echo "source $src_id"
		echo "compiler $cc_id"
		echo "release $(cat "$obj/include/config/kernel.release" 2>/dev/null || echo unknown)"
		digest_files "$self" "${fragments[@]}" "${patches[@]}"
	} >"$tmp/inputs"
	chmod 755 "$tmp"
	[[ -e $out && ! -f $out/vmlinux ]] && rm -rf "$out"
	if ! mv -T "$tmp" "$out" 2>/dev/null; then
		rm -rf "$tmp"
		[[ -f $out/vmlinux ]] || die "could not store the kernel in $out"
	fi
	log "stored $out"
	echo "$out/vmlinux"
}

main "$@"
