"""``supermachine doctor``: which protections VM workers get on this host, and why others are missing."""

from __future__ import annotations

import json

import click
from rich.markup import escape
from rich.table import Table

from supermachine import _core, ui, worker
from supermachine.errors import KvmUnavailableError, WorkerStartError

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
    protections = _core.host_protections()
    jail = _core.host_jail_level()
    kvm = protections["kvm"]
    try:
        program: _core.HostProtection = {"available": True, "detail": str(worker.program_path())}
    except WorkerStartError as exc:
        program = {"available": False, "detail": str(exc)}
    can_run = kvm["available"] and program["available"]
    if as_json:
        print(
            json.dumps(
                {"protections": protections, "jail": jail, "worker": program, "vms_can_run": can_run},
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
        landlock = ", Landlock" if protections["landlock"]["available"] else ""
        ui.stdout.print(f"VMs run in a {escape(JAIL.get(jail, jail))}{landlock}, one worker process per VM.")
    if not kvm["available"]:
        raise KvmUnavailableError(f"VMs cannot run here: {kvm['detail']}")
    if not program["available"]:
        raise WorkerStartError(f"VMs cannot run here: {program['detail']}")


def register(group: click.Group) -> None:
    group.add_command(doctor)
