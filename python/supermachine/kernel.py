"""The guest kernel: an uncompressed ``vmlinux`` with a PVH entry point, built from ``guest/kernel``.

An installed wheel carries both profiles' kernels instead (:mod:`supermachine.artefacts` says which
source wins). The recipe (``guest/kernel/build.sh``) owns the cache key and the build; this module
only selects the profile, asks the recipe where the kernel for the current inputs lives, and builds
it on demand.

Profiles:

``normal``
    For hardware KVM (Intel VMX / AMD SVM). No workarounds.
``compat``
    For hosts whose KVM emulates guest kernel code, such as the software nested hypervisor
    ``kvm_pvm``: a few kernel patches that avoid instructions those hosts cannot emulate, and one CPU
    (an SMP kernel boots about 1.5x slower there even on one vCPU). Chosen automatically for
    one-vCPU VMs when ``/sys/module/kvm_pvm`` exists.
``compat-smp``
    ``compat`` with SMP: chosen automatically there for VMs of more than one vCPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from supermachine import artefacts, paths
from supermachine.errors import KernelError

__all__ = [
    "PROFILES",
    "PROFILE_CPUS",
    "build_script",
    "cached_path",
    "default_profile",
    "guest_dir",
    "kernel_path",
]

PROFILES: tuple[str, ...] = ("normal", "compat", "compat-smp")
"""The recipe's profiles (``build.sh --profiles``; a test holds the two lists together)."""

PROFILE_CPUS: dict[str, int] = {"normal": 64, "compat": 1, "compat-smp": 64}
"""The most CPUs a guest of each profile brings up: its kernel's ``CONFIG_NR_CPUS`` (the config
fragments in ``guest/kernel/config`` set it; a test holds this table to them)."""

# Under an emulating KVM: the profiles to choose from, fewest CPUs (fastest boot) first.
_EMULATED_PROFILES = ("compat", "compat-smp")

_SYS_MODULE = Path("/sys/module")
# Kernel modules whose presence means guest kernel code is emulated rather than run by the CPU.
_EMULATING_KVM_MODULES = ("kvm_pvm",)


def emulating_host(sys_module: Path | None = None) -> bool:
    """Whether this host's KVM emulates guest kernel code (kvm_pvm) rather than running it on the
    CPU: guest kernel work costs hundreds of times more there."""
    root = _SYS_MODULE if sys_module is None else sys_module
    return any((root / name).exists() for name in _EMULATING_KVM_MODULES)


def default_profile(sys_module: Path | None = None, *, vcpus: int = 1) -> str:
    """The profile for a VM of ``vcpus`` on this host: ``normal`` on hardware KVM; under an
    emulating KVM such as kvm_pvm, ``compat`` for one vCPU and ``compat-smp`` for more."""
    if not emulating_host(sys_module):
        return "normal"
    fitting = [p for p in _EMULATED_PROFILES if PROFILE_CPUS[p] >= vcpus]
    return fitting[0] if fitting else _EMULATED_PROFILES[-1]


def guest_dir() -> Path:
    """The ``guest/`` recipe directory: ``SUPERMACHINE_GUEST_DIR``, else the source checkout's.

    Raises :class:`KernelError` when neither exists (an installed wheel uses its packaged kernels
    instead; see :mod:`supermachine.artefacts`).
    """
    return artefacts.recipe_root("kernel", KernelError, "packaged kernels")


def build_script() -> Path:
    """The kernel build recipe, ``guest/kernel/build.sh``."""
    return guest_dir() / "kernel" / "build.sh"


def _check_profile(profile: str | None) -> str:
    chosen = default_profile() if profile is None else profile
    if chosen not in PROFILES:
        raise KernelError(f"unknown kernel profile {chosen!r} (expected one of: {', '.join(PROFILES)})")
    return chosen


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["SUPERMACHINE_CACHE_DIR"] = str(paths.cache_dir())
    return env


def _command(*args: str) -> list[str]:
    bash = shutil.which("bash")
    if bash is None:
        raise KernelError("bash not found: the guest kernel recipe is a bash script")
    return [bash, str(build_script()), *args]


def _one_line(stderr: str, fallback: str) -> str:
    """The recipe's error message (its last stderr line), without the script's name prefix."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return fallback
    message = lines[-1]
    for prefix in ("build.sh: error: ", "build.sh: "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


def _last_stdout_line(stdout: str) -> Path:
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise KernelError("guest kernel recipe printed no path")
    return Path(lines[-1].strip())


def cached_path(profile: str | None = None) -> Path:
    """Where the kernel for the profile's current inputs is (or would be) cached. Never builds.

    For an installed wheel: where its packaged kernel is (or would be) unpacked.
    """
    chosen = _check_profile(profile)
    if artefacts.is_packaged():
        return artefacts.unpacked_path(f"vmlinux-{chosen}")
    result = subprocess.run(
        _command("--print-path", chosen),
        env=_environment(),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise KernelError(_one_line(result.stderr, f"guest kernel recipe failed for profile {chosen}"))
    return _last_stdout_line(result.stdout)


def kernel_path(profile: str | None = None, build: bool = True) -> Path:
    """The cached ``vmlinux`` for ``profile`` (default: :func:`default_profile` for one vCPU).

    Builds it with ``guest/kernel/build.sh`` when it is not cached and ``build`` is true (about five
    minutes on two cores; progress goes to stderr). Raises :class:`KernelError` otherwise.
    An installed wheel's packaged kernel is unpacked instead (checked against its SHA-256).
    """
    chosen = _check_profile(profile)
    if artefacts.is_packaged():
        return artefacts.unpacked(f"vmlinux-{chosen}")
    path = cached_path(chosen)
    if path.is_file():
        return path
    if not build:
        raise KernelError(
            f"guest kernel for profile {chosen} is not built yet (expected {path}); "
            f"run {build_script()} {chosen}"
        )
    with subprocess.Popen(
        _command(chosen),
        env=_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stderr is not None
        assert proc.stdout is not None
        errors: list[str] = []
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            errors.append(line)
        stdout = proc.stdout.read()
        returncode = proc.wait()
    if returncode != 0:
        raise KernelError(_one_line("".join(errors), f"guest kernel build failed for profile {chosen}"))
    built = _last_stdout_line(stdout)
    if not built.is_file():
        raise KernelError(f"guest kernel recipe reported {built}, which does not exist")
    return built
