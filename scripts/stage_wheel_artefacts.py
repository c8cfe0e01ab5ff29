#!/usr/bin/env python3
"""Stage what the wheel carries besides Python code and ``_core``, inside the package directory.

    python/supermachine/guest/manifest.json          name -> file, sha256 and size of the content, recipe key
    python/supermachine/guest/vmlinux-normal.zst     guest/kernel/build.sh normal, zstd -19
    python/supermachine/guest/vmlinux-compat.zst     guest/kernel/build.sh compat, zstd -19
    python/supermachine/guest/supermachine-agent.zst guest/agent/build.sh, zstd -19
    python/supermachine/bin/supermachine-vmm         cargo build --release --bin supermachine-vmm

The kernels and the agent come from their recipes, which cache by input key in the user cache: a
wheel built again from the same inputs reuses them (and the compressed copies already staged).
Before building anything it checks the build dependencies of what is not cached and names every
one that is absent. Both staging directories are gitignored; ``[tool.maturin] include`` puts them
in the wheel.

Used by ``scripts/build-wheel.sh`` (``make wheel``) and by the PEP 517 backend (``pip install .``,
building from the sdist). Standard library only: it runs in pip's isolated build environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "python" / "supermachine"
STAGE = PACKAGE / "guest"
WORKER = PACKAGE / "bin" / "supermachine-vmm"
MANIFEST_VERSION = 1  # supermachine.artefacts.MANIFEST_VERSION
AGENT = "supermachine-agent"
# The wheel's platform tag (pyproject's [tool.maturin] compatibility): glibc symbol versions the
# worker may need. maturin checks the extension module itself; the worker is checked here.
MAX_GLIBC = (2, 34)


class StageError(Exception):
    pass


def log(message: str) -> None:
    print(f"stage: {message}", file=sys.stderr, flush=True)


def missing_tools(tools: list[str]) -> list[str]:
    return [tool for tool in tools if shutil.which(tool) is None]


def kernel_dependencies() -> list[str]:
    missing = missing_tools(["gcc", "make", "flex", "bison", "bc", "perl", "patch", "tar", "xz"])
    source = Path(os.environ.get("SUPERMACHINE_KERNEL_SOURCE", "/usr/src/linux-source-6.12.tar.xz"))
    if not source.is_file():
        missing.append(f"{source} (Debian package linux-source-6.12)")
    if not Path("/usr/include/libelf.h").is_file():
        missing.append("libelf headers (libelf-dev)")
    return missing


def rust_dependencies() -> list[str]:
    return missing_tools(["cargo", "rustc", "cc"])


def recipe(*args: str, quiet: bool = False) -> Path:
    """Runs a guest recipe and returns the path it prints last (its progress goes to stderr)."""
    result = subprocess.run(
        ["bash", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL if quiet else None,
        text=True,
        check=False,
    )
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0 or not lines:
        raise StageError(f"{' '.join(args)} failed (exit status {result.returncode}; its errors are above)")
    return Path(lines[-1])


def kernel_profiles(script: Path) -> list[str]:
    """The kernel profiles the recipe builds: the wheel carries each one's vmlinux."""
    result = subprocess.run(["bash", str(script), "--profiles"], capture_output=True, text=True, check=False)
    profiles = result.stdout.split()
    if result.returncode != 0 or not profiles:
        raise StageError(f"{script} --profiles failed (exit status {result.returncode}): {result.stderr}")
    return profiles


def cached(script: Path, *args: str) -> Path | None:
    """The recipe's cached output for the current inputs, or ``None`` when it must be built (or
    the recipe cannot even compute its key, say without its compiler or kernel source)."""
    try:
        wanted = recipe(str(script), "--print-path", *args, quiet=True)
    except StageError:
        return None
    return wanted if wanted.is_file() else None


def check_dependencies(kernels: dict[str, Path | None], agent: Path | None) -> None:
    """Names every missing build dependency of what has to be built, before building any of it."""
    missing = rust_dependencies()  # the worker (and the extension) are always compiled
    if any(path is None for path in kernels.values()):
        missing += kernel_dependencies()
    if agent is None:
        missing += rust_dependencies()
    missing += missing_tools(["zstd", "readelf"])
    if missing:
        unique = ", ".join(dict.fromkeys(missing))
        raise StageError(
            f"cannot build the wheel, missing build dependencies: {unique} (scripts/apt-packages.txt)"
        )


def built(script: Path, *args: str) -> Path:
    log(f"building with {script.relative_to(ROOT)} {' '.join(args)}".rstrip())
    path = recipe(str(script), *args)
    if not path.is_file():
        raise StageError(f"{script} reported {path}, which does not exist")
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def staged_digest(path: Path) -> str | None:
    """The SHA-256 of what a staged ``.zst`` decompresses to (``None`` if it does not)."""
    proc = subprocess.run(["zstd", "-dcq", str(path)], capture_output=True, check=False)
    return hashlib.sha256(proc.stdout).hexdigest() if proc.returncode == 0 else None


def compress(source: Path, dest: Path, previous: dict[str, object] | None, name: str) -> dict[str, object]:
    """Compresses ``source`` to ``dest`` (reusing the staged copy when its content is unchanged)."""
    digest = sha256(source)
    entry: dict[str, object] = {
        "file": dest.name,
        "sha256": digest,
        "size": source.stat().st_size,
        "recipe": source.parent.name,
    }
    if previous == entry and dest.is_file() and staged_digest(dest) == digest:
        os.chmod(dest, 0o644)
        log(f"{name}: unchanged ({digest[:16]})")
        return entry
    tmp = dest.with_name(f".{dest.name}.tmp")
    # One thread and a fixed level: the same input always gives the same bytes.
    subprocess.run(["zstd", "-19", "-T1", "-q", "-f", "-o", str(tmp), str(source)], check=True)
    os.chmod(tmp, 0o644)  # zstd copies the source's mode; these are data, not programs
    os.replace(tmp, dest)
    log(f"{name}: {source.stat().st_size >> 10} KiB -> {dest.stat().st_size >> 10} KiB ({digest[:16]})")
    return entry


def glibc_versions(binary: Path) -> list[tuple[int, ...]]:
    out = subprocess.run(["readelf", "-VW", str(binary)], capture_output=True, text=True, check=True).stdout
    return sorted({tuple(int(p) for p in m.split(".")) for m in re.findall(r"GLIBC_([0-9.]+)", out)})


def stage_worker() -> None:
    log("building the VMM worker (cargo build --release --bin supermachine-vmm)")
    subprocess.run(
        ["cargo", "build", "--release", "-q", "-p", "supermachine-core", "--bin", "supermachine-vmm"],
        cwd=ROOT,
        check=True,
    )
    built = ROOT / os.environ.get("CARGO_TARGET_DIR", "target") / "release" / "supermachine-vmm"
    needed = glibc_versions(built)
    if needed and needed[-1] > MAX_GLIBC:
        have = ".".join(map(str, needed[-1]))
        raise StageError(f"the VMM worker needs glibc {have}, newer than the wheel's manylinux tag allows")
    WORKER.parent.mkdir(parents=True, exist_ok=True)
    tmp = WORKER.with_name(f".{WORKER.name}.tmp")
    shutil.copyfile(built, tmp)
    os.chmod(tmp, 0o755)
    os.replace(tmp, WORKER)


def stage() -> None:
    previous: dict[str, dict[str, object]] = {}
    manifest = STAGE / "manifest.json"
    if manifest.is_file():
        try:
            previous = json.loads(manifest.read_text())["artefacts"]
        except (ValueError, KeyError, TypeError):
            previous = {}
    STAGE.mkdir(parents=True, exist_ok=True)
    # The manifest goes first so a failed run never leaves one that names stale files.
    manifest.unlink(missing_ok=True)

    kernel_recipe = ROOT / "guest" / "kernel" / "build.sh"
    agent_recipe = ROOT / "guest" / "agent" / "build.sh"
    kernels = {profile: cached(kernel_recipe, profile) for profile in kernel_profiles(kernel_recipe)}
    agent = cached(agent_recipe)
    check_dependencies(kernels, agent)

    entries: dict[str, dict[str, object]] = {}
    for profile, vmlinux in kernels.items():
        vmlinux = vmlinux or built(kernel_recipe, profile)
        name = f"vmlinux-{profile}"
        entries[name] = compress(vmlinux, STAGE / f"{name}.zst", previous.get(name), name)
    agent = agent or built(agent_recipe)
    entries[AGENT] = compress(agent, STAGE / f"{AGENT}.zst", previous.get(AGENT), AGENT)
    stage_worker()

    wanted = {str(e["file"]) for e in entries.values()} | {"manifest.json"}
    for stale in STAGE.iterdir():
        if stale.name not in wanted:
            stale.unlink()
    tmp = manifest.with_name(".manifest.json.tmp")
    tmp.write_text(
        json.dumps({"version": MANIFEST_VERSION, "artefacts": entries}, indent=2, sort_keys=True) + "\n"
    )
    os.replace(tmp, manifest)
    log(f"staged in {STAGE.relative_to(ROOT)} and {WORKER.relative_to(ROOT)}")


def main() -> int:
    try:
        stage()
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"error: {' '.join(map(str, e.cmd))} failed with exit status {e.returncode}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
