"""``supermachine doctor``: which protections VM workers get on this host, and why others are missing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from supermachine import _core
from supermachine.errors import AgentBuildError, KernelError, KvmUnavailableError, WorkerStartError

# What each probe is called in the table, in the order the core reports them.
LABELS = {
    "kvm": "KVM (/dev/kvm)",
    "root": "running as root",
    "mount_namespace": "mount namespace",
    "pid_namespace": "PID namespace",
    "ipc_namespace": "IPC namespace",
    "uts_namespace": "UTS namespace",
    "net_namespace": "network namespace",
    "user_namespace": "user namespace",
    "pivot_root": "pivot_root",
    "seccomp": "seccomp-bpf",
    "landlock": "Landlock",
    "cgroup_memory": "cgroup memory",
    "cgroup_cpu": "cgroup cpu",
    "cgroup_pids": "cgroup pids",
    "no_new_privs": "no_new_privs",
    "kvm_pvm": "emulating host (kvm_pvm)",
}

# What each jail level is made of; ", Landlock" follows where the kernel has it (every level uses it).
JAIL = {
    "full": "full jail: namespaces, pivot_root into a per-VM root, an unprivileged uid, seccomp",
    "unprivileged": "unprivileged jail: namespaces inside a user namespace, pivot_root, seccomp",
    "minimal": "minimal jail (no root, no usable user namespace): no_new_privs, seccomp",
}


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
def doctor(as_json: bool) -> None:
    """Which protections VM workers get on this host, and why the others are not available.

    Exits 1 when VMs cannot run here (KVM is not usable).
    """
    from rich.markup import escape
    from rich.table import Table

    from supermachine import ui, worker

    protections = _core.host_protections()
    jail = _core.host_jail_level()
    kvm = protections["kvm"]
    try:
        program: _core.HostProtection = {"available": True, "detail": str(worker.program_path())}
    except WorkerStartError as exc:
        program = {"available": False, "detail": str(exc)}
    can_run = kvm["available"] and program["available"]
    sources = artefact_sources()
    net = _network_backend()
    compression = _rootfs_compression()
    if as_json:
        print(
            json.dumps(
                {
                    "protections": protections,
                    "jail": jail,
                    "worker": program,
                    "network": net,
                    "rootfs_compression": compression,
                    "artefacts": sources,
                    "vms_can_run": can_run,
                },
                indent=2,
            )
        )
    else:
        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in ("PROTECTION", "STATE", "WHY"):
            table.add_column(column, no_wrap=column != "WHY")
        for name, entry in protections.items():
            if name == "kvm_pvm":
                state = "yes" if entry["available"] else "no"
            else:
                state = "[green]active[/green]" if entry["available"] else "[yellow]not available[/yellow]"
            table.add_row(LABELS.get(name, name), state, escape(entry["detail"]))
        ui.stdout.print(table)
        ui.stdout.print(f"\nVMM worker: {escape(program['detail'])}")
        ui.stdout.print(f"Network backend: {escape(net['detail'])}")
        ui.stdout.print(f"Image root filesystems: {escape(compression['detail'])}")
        landlock = ", Landlock" if protections["landlock"]["available"] else ""
        ui.stdout.print(f"VMs run in a {escape(JAIL.get(jail, jail))}{landlock}, one worker process per VM.")
        _print_artefacts(sources)
    if not kvm["available"]:
        raise KvmUnavailableError(f"VMs cannot run here: {kvm['detail']}")
    if not program["available"]:
        raise WorkerStartError(f"VMs cannot run here: {program['detail']}")


def _rootfs_compression() -> dict[str, str]:
    """How image root filesystems are compressed on this host, and why."""
    from supermachine.oci.rootfs import default_compression

    chosen = default_compression()
    why = "guest kernel code is emulated here" if chosen == "none" else "the guest decompresses cheaply"
    shown = "uncompressed" if chosen == "none" else chosen
    return {"compression": chosen, "detail": f"{shown} squashfs ({why})"}


def _network_backend() -> _core.HostProtection:
    """Whether VMs can have a network here (passt), and where it is or how to get it."""
    from supermachine.errors import NetworkError
    from supermachine.network import passt_path

    try:
        return {"available": True, "detail": f"passt ({passt_path()})"}
    except NetworkError as exc:
        return {"available": False, "detail": str(exc)}


def _identity(path: Path, recipe_key: str | None) -> dict[str, object]:
    from supermachine import artefacts

    found: dict[str, object] = {"path": str(path), "ready": path.is_file()}
    if recipe_key is not None:
        found["recipe_key"] = recipe_key
    if path.is_file():
        found["sha256"] = artefacts.sha256_file(path)
    return found


def artefact_sources() -> dict[str, dict[str, object]]:
    """Where the guest kernels, the agent and the VMM worker come from (``override``: an
    environment variable; ``checkout``: built by the source checkout's recipe into the cache;
    ``packaged``: carried by the installed wheel, unpacked into the cache) and their identities
    (SHA-256 of the file; the recipe's input key). Never builds or unpacks anything."""
    from supermachine import artefacts, initramfs, kernel, worker

    out: dict[str, dict[str, object]] = {}
    source = artefacts.guest_source()
    origin = "none" if source is None else source[0]
    packaged = artefacts.manifest() if origin == "packaged" else {}
    # The profiles VMs of this host boot: one for one vCPU, maybe another for more.
    here = {kernel.default_profile(vcpus=1), kernel.default_profile(vcpus=_core.MAX_VCPUS)}
    for profile in kernel.PROFILES:
        entry: dict[str, object] = {"source": origin, "used_here": profile in here}
        try:
            path = kernel.cached_path(profile)
            if origin == "packaged":
                item = packaged[f"vmlinux-{profile}"]
                entry |= {
                    "path": str(path),
                    "ready": True,
                    "sha256": item.sha256,
                    "recipe_key": item.recipe_key,
                }
            else:
                entry |= _identity(path, path.parent.name)
        except KernelError as exc:
            entry |= {"ready": False, "detail": str(exc)}
        out[f"kernel-{profile}"] = entry
    agent: dict[str, object] = {"source": origin}
    try:
        path = initramfs.cached_agent_path()
        if origin == "packaged":
            item = packaged[initramfs.AGENT]
            agent |= {"path": str(path), "ready": True, "sha256": item.sha256, "recipe_key": item.recipe_key}
        else:
            agent |= _identity(path, path.parent.name)
    except (AgentBuildError, KernelError) as exc:
        agent |= {"ready": False, "detail": str(exc)}
    out["agent"] = agent
    # The worker is installed with the package (by scripts/setup.sh in a checkout, by the wheel
    # otherwise) unless SUPERMACHINE_VMM names another.
    installed = "checkout" if artefacts.checkout_guest_dir() is not None else "packaged"
    vmm: dict[str, object] = {"source": "override" if os.environ.get("SUPERMACHINE_VMM") else installed}
    try:
        vmm |= _identity(worker.program_path(), None)
    except WorkerStartError as exc:
        vmm |= {"ready": False, "detail": str(exc)}
    out["worker"] = vmm
    return out


def _print_artefacts(sources: dict[str, dict[str, object]]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from supermachine import ui

    table = Table(box=None, header_style="bold", pad_edge=False, title_justify="left")
    for column in ("ARTEFACT", "SOURCE", "IDENTITY", "PATH"):
        table.add_column(column, no_wrap=column != "PATH")
    for name, entry in sources.items():
        label = f"{name} (used here)" if entry.get("used_here") else name
        if "sha256" in entry:
            identity = f"sha256 {str(entry['sha256'])[:16]}"
        elif "recipe_key" in entry:
            identity = f"recipe key {entry['recipe_key']} (not built yet)"
        else:
            identity = "-"
        where = entry.get("path", entry.get("detail", ""))
        table.add_row(label, str(entry["source"]), identity, escape(str(where)))
    ui.stdout.print()
    ui.stdout.print(table)
