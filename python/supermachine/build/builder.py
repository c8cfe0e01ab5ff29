"""Dockerfile builds whose RUN steps run in a microVM.

Each stage starts from its FROM image (a registry or local image, ``scratch`` or an earlier
stage). Instructions that only describe the image (ENV, CMD, LABEL, ...) change its config.
Instructions that change files run in one build VM per stage, booted on the stage's file system
as it stands when the first of them comes:

- RUN executes in the VM (``/bin/sh -c`` or the exec form, the stage's Env, build arguments,
  WorkingDir and User, with the VM's network);
- COPY and ADD select files on the host (context or an earlier stage, ``.dockerignore`` applied)
  and unpack them into the VM (``put_archive``); ADD unpacks local tar archives;
- WORKDIR makes its directory when it is missing.

After each such step the VM's changes since the previous step are exported as the step's layer
(:meth:`Vm.export_layer <supermachine.vm.Vm.export_layer>` with a mark), so consecutive steps share
one VM and each gets its own layer. Every step has a cache key chained from the base image (see
:mod:`supermachine.build.cache`); a step whose key is cached takes its layer from the cache and
runs nothing, and a VM is booted only when a step must run. A rebuild with nothing changed does
no VM work at all.

The VM's ``/run`` and ``/tmp`` are the root's own directories (``sm.tmpfs=none``), as in a
container build, so what a step writes there is part of its layer.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from supermachine import oci
from supermachine.build.cache import BuildCache, CacheEntry, LayerRef, StepSnapshot, chain, file_stamp
from supermachine.build.dockerfile import (
    Dockerfile,
    DockerfileError,
    Instruction,
    Stage,
    arg_declarations,
    exec_form,
    expand,
    key_values,
    parse,
    words,
)
from supermachine.build.ignore import IgnoreRules
from supermachine.build.sources import CopyItem, CopyPlan, SourceError, SourceTree, plan_copy
from supermachine.errors import (
    AgentRequestError,
    CommandFailedError,
    ImageNotFoundError,
    InputError,
    SupermachineError,
)
from supermachine.oci.commit import ConfigChanges, apply_changes, check_new_ref, exposed_port, store_image
from supermachine.oci.manifest import OCI_CONFIG, OCI_MANIFEST, Descriptor, ImageConfig, Manifest
from supermachine.oci.store import ImageRecord, ImageStore

__all__ = ["BuildError", "BuildOptions", "BuildResult", "Reporter", "build"]

#: The shell of shell-form RUN, CMD and ENTRYPOINT until a SHELL instruction.
DEFAULT_SHELL = ("/bin/sh", "-c")
#: PATH of RUN steps when the image sets none (docker's default).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Guest RAM of a build VM: file changes live in it (tmpfs) until exported.
DEFAULT_BUILD_MEMORY_MIB = 1024
#: Kernel parameters of a build VM (see the module docstring).
BUILD_KERNEL_ARGS = "sm.tmpfs=none"
_PLATFORM = "linux/amd64"


class BuildError(SupermachineError):
    """A build step failed (a RUN that exited non-zero, a bad instruction, a missing source)."""


class Reporter(Protocol):
    """Where a build reports its progress (the CLI prints it like buildah)."""

    def step(self, number: int, total: int, text: str) -> None: ...

    def note(self, text: str) -> None: ...

    def output(self, data: bytes, stderr: bool) -> None: ...


class _Quiet:
    def step(self, number: int, total: int, text: str) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def output(self, data: bytes, stderr: bool) -> None:
        pass


@dataclass(frozen=True)
class BuildOptions:
    """What to build and how (``supermachine build`` flags)."""

    context: Path
    dockerfile: Path | None = None
    """Default: ``Dockerfile`` in the context."""
    tags: tuple[str, ...] = ()
    build_args: Mapping[str, str] = field(default_factory=dict)
    target: str | None = None
    no_cache: bool = False
    platform: str | None = None
    memory_mib: int = DEFAULT_BUILD_MEMORY_MIB
    vcpus: int = 1
    network: Any = "egress"
    """The build VMs' network (as :attr:`VmConfig.network <supermachine.vm.VmConfig.network>`)."""
    insecure: bool | None = None
    step_snapshots: bool = True
    """Snapshot the build VM after each step that ran, so changing the next step restores it."""
    secrets: Mapping[str, bytes] = field(default_factory=dict)
    """Build secrets by id (``--secret``), for ``RUN --mount=type=secret``; never in a layer or
    a cache key."""


@dataclass(frozen=True)
class BuildResult:
    """A finished build: the stored image and what the steps did."""

    image: oci.Image
    refs: tuple[str, ...]
    steps: int
    cached: int
    """Steps taken from the cache."""
    ran: int
    """Steps that ran in a build VM."""
    built_layers: tuple[LayerRef, ...] = ()
    """The layers the target stage's own steps (and the stages it starts from) made, above the
    image it pulled: what the Dockerfile added."""
    snapshot: Path | None = None
    """The snapshot of the build VM after the target stage's last file-changing step, if that
    step has one and it and the root file system it ran on are still as they were."""
    snapshot_rootfs: Path | None = None
    """The root file system :attr:`snapshot` restores with."""


@dataclass
class _BuildVm:
    vm: Any  # supermachine.vm.Vm, imported lazily
    mark: int
    layers: int
    """How many of the stage's layers its file system holds."""
    rootfs: Path
    snapshot: Path | None = None
    """The snapshot of this VM's latest step, the base of the next step's (a diff)."""


@dataclass
class _StageState:
    index: int
    layers: list[LayerRef]
    config: dict[str, Any]
    key: str
    args: dict[str, str | None] = field(default_factory=dict)
    shell: tuple[str, ...] = DEFAULT_SHELL
    vm: _BuildVm | None = None
    snapshot: StepSnapshot | None = None
    """The snapshot of the VM after the last step, when that step's entry has one."""
    base_layers: int = 0
    """How many of ``layers`` come from a pulled image rather than from this build's steps."""

    @property
    def section(self) -> dict[str, Any]:
        section = self.config.setdefault("config", {})
        if not isinstance(section, dict):
            section = self.config["config"] = {}
        return section

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in self.section.get("Env") or ():
            key, _, value = str(item).partition("=")
            out[key] = value
        return out

    def substitution(self) -> dict[str, str]:
        """What ``$VAR`` means in an instruction: build arguments, then the image's Env."""
        values = {k: v for k, v in self.args.items() if v is not None}
        return {**values, **self.env()}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _scratch_config() -> dict[str, Any]:
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": []},
    }


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000}
_UNIT_NS["h"] = 3_600_000_000_000


def _duration_ns(text: str, ins: Instruction) -> int:
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_NS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ins.error(f"bad duration {text!r} (e.g. 30s, 1m30s)")
    return int(total)


class _Builder:
    def __init__(self, options: BuildOptions, reporter: Reporter) -> None:
        self.options = options
        self.reporter = reporter
        context = options.context
        if not context.is_dir():
            raise InputError(f"build context {context} is not a directory")
        dockerfile = options.dockerfile or context / "Dockerfile"
        try:
            fd = os.open(dockerfile, os.O_RDONLY | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                raw = f.read(4 << 20 + 1)
        except OSError as exc:
            raise InputError(f"cannot read {dockerfile}: {exc.strerror}") from None
        if len(raw) > 4 << 20:
            raise InputError(f"{dockerfile} is larger than 4 MiB")
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise InputError(f"{dockerfile} is not UTF-8 text") from None
        self.dockerfile: Dockerfile = parse(text, dockerfile.name)
        self.ignore = IgnoreRules.load(context, dockerfile.name)
        self.context = SourceTree(context, "the build context", self.ignore)
        self.store = ImageStore()
        self.cache = BuildCache(self.store.blobs)
        self.results: dict[int, _StageState] = {}
        self.trees: dict[int, SourceTree] = {}
        # Stage trees and copy archives: in the store's private tmp/, which `prune` clears of what a
        # killed build left.
        self.store.tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="build-", dir=self.store.tmp_dir))
        self.number = 0
        self.total = 0
        self.cached = 0
        self.ran = 0
        if options.platform not in (None, "", _PLATFORM, "linux/x86_64"):
            raise InputError(f"--platform {options.platform}: this host builds only {_PLATFORM}")
        for tag in options.tags:
            check_new_ref(tag)

    # -- the plan ------------------------------------------------------------------------------

    def global_args(self) -> dict[str, str | None]:
        values: dict[str, str | None] = {}
        for ins in self.dockerfile.global_args:
            known = {k: v for k, v in values.items() if v is not None}
            for name, default in arg_declarations(ins.args, known, ins.where, self.dockerfile.escape):
                values[name] = self.options.build_args.get(name, default)
        return values

    def _stage_named(self, name: str, before: int) -> int | None:
        for stage in self.dockerfile.stages[:before]:
            if stage.name == name.lower() or str(stage.index) == name:
                return stage.index
        return None

    def needed(self, target: int) -> list[int]:
        """The stages the target depends on (through FROM and COPY --from), in file order."""
        known = {k: v for k, v in self.global_args().items() if v is not None}
        need: set[int] = set()
        todo = [target]
        while todo:
            index = todo.pop()
            if index in need:
                continue
            need.add(index)
            stage = self.dockerfile.stages[index]
            base = expand(stage.base, known, stage.from_instruction.where, self.dockerfile.escape)
            refs = [base] + [ins.flags["from"] for ins in stage.instructions if "from" in ins.flags]
            for ref in refs:
                found = self._stage_named(expand(ref, known, stage.from_instruction.where), index)
                if found is not None:
                    todo.append(found)
        return sorted(need)

    # -- running -------------------------------------------------------------------------------

    def run(self) -> BuildResult:
        target = self.dockerfile.stage_index(self.options.target)
        stages = self.needed(target)
        self.total = sum(1 + len(self.dockerfile.stages[i].instructions) for i in stages)
        try:
            with self.store.using():
                for index in stages:
                    self.results[index] = self.stage(self.dockerfile.stages[index])
                return self.finish(self.results[target])
        finally:
            for state in self.results.values():
                self.stop_vm(state)
            shutil.rmtree(self.work, ignore_errors=True)

    def stop_vm(self, state: _StageState) -> None:
        if state.vm is not None:
            state.vm.vm.stop()
            state.vm = None

    def say(self, ins: Instruction | None, text: str) -> None:
        self.number += 1
        self.reporter.step(self.number, self.total, text)

    def stage(self, stage: Stage) -> _StageState:
        state = self.start_stage(stage)
        for ins in stage.instructions:
            flags = "".join(f"--{k}={v} " for k, v in ins.flags.items())
            self.say(ins, f"{ins.name} {flags}{ins.args}".strip())
            handler = getattr(self, f"do_{ins.name.lower()}", None)
            if handler is None:
                raise ins.error("is not supported by this builder")
            try:
                handler(state, ins)
            except (DockerfileError, BuildError):
                raise
            except SourceError as exc:
                raise BuildError(str(exc)) from None
        # Later stages that copy from this one need no VM of it.
        self.stop_vm(state)
        return state

    def start_stage(self, stage: Stage) -> _StageState:
        ins = stage.from_instruction
        global_values = self.global_args()
        known = {k: v for k, v in global_values.items() if v is not None}
        base = expand(stage.base, known, ins.where, self.dockerfile.escape)
        self.say(ins, f"FROM {base}" + (f" AS {stage.name}" if stage.name else ""))
        platform = stage.platform and expand(stage.platform, known, ins.where)
        if platform not in (None, "", _PLATFORM, "linux/x86_64", "$BUILDPLATFORM", "$TARGETPLATFORM"):
            raise ins.error(f"--platform={platform}: this host builds only {_PLATFORM}")
        earlier = self._stage_named(base, stage.index)
        if base.lower() == "scratch":
            state = _StageState(stage.index, [], _scratch_config(), chain("", "scratch"))
        elif earlier is not None:
            parent = self.results[earlier]
            state = _StageState(stage.index, list(parent.layers), copy.deepcopy(parent.config), parent.key)
            state.shell = parent.shell
            state.base_layers = parent.base_layers
        else:
            image = self.pull(base, ins)
            raw = json.loads(self.store.blobs.read_bytes(image.config_digest))
            layers = [
                LayerRef(d.media_type, d.digest, d.size, diff)
                for d, diff in zip(image.layers, image.config.diff_ids, strict=True)
            ]
            state = _StageState(stage.index, layers, raw, chain("", ["FROM", image.config_digest]))
            state.base_layers = len(layers)
        # Build arguments declared before the first FROM are visible to FROM only; a stage sees
        # them again when it declares them (docker's scoping).
        state.args = {}
        state.config.pop("created", None)
        if "PATH" not in state.env():
            # Docker and buildah give an image without PATH the default one.
            state.section["Env"] = [f"PATH={DEFAULT_PATH}", *(state.section.get("Env") or [])]
        return state

    def pull(self, ref: str, ins: Instruction) -> oci.Image:
        try:
            return oci.load_image(ref, self.store)
        except ImageNotFoundError:
            pass
        try:
            return oci.pull(ref, insecure=self.options.insecure)
        except SupermachineError as exc:
            raise ins.error(f"cannot get {ref}: {exc}") from None

    # -- instructions that change the config ---------------------------------------------------

    def history(self, state: _StageState, text: str, *, empty: bool) -> None:
        entry: dict[str, Any] = {"created": _now(), "created_by": text}
        if empty:
            entry["empty_layer"] = True
        state.config["history"] = [*(state.config.get("history") or []), entry]

    def meta(self, state: _StageState, ins: Instruction, value: object) -> None:
        """Records a config-only step: in the cache key chain (later steps depend on it) and the
        history."""
        state.key = chain(state.key, [ins.name, value])
        self.history(state, f"/bin/sh -c #(nop) {ins.name} {json.dumps(value)}", empty=True)

    def do_arg(self, state: _StageState, ins: Instruction) -> None:
        global_values = self.global_args()
        for name, default in arg_declarations(
            ins.args, state.substitution(), ins.where, self.dockerfile.escape
        ):
            value = self.options.build_args.get(
                name, default if default is not None else global_values.get(name)
            )
            state.args[name] = value
            state.key = chain(state.key, ["ARG", name, value])

    # Config changes go through apply_changes, which vm.commit uses too: one owner of the rules
    # (Env and Labels merged, ports and volumes added, an ENTRYPOINT resetting CMD).

    def do_env(self, state: _StageState, ins: Instruction) -> None:
        pairs = key_values(ins.args, state.substitution(), ins.where, self.dockerfile.escape)
        apply_changes(state.config, ConfigChanges(env=dict(pairs)))
        self.meta(state, ins, pairs)

    def do_label(self, state: _StageState, ins: Instruction) -> None:
        pairs = key_values(ins.args, state.substitution(), ins.where, self.dockerfile.escape)
        apply_changes(state.config, ConfigChanges(labels=dict(pairs)))
        self.meta(state, ins, pairs)

    def do_maintainer(self, state: _StageState, ins: Instruction) -> None:
        state.config["author"] = expand(ins.args, state.substitution(), ins.where, self.dockerfile.escape)
        self.meta(state, ins, state.config["author"])

    def do_user(self, state: _StageState, ins: Instruction) -> None:
        user = expand(ins.args, state.substitution(), ins.where, self.dockerfile.escape)
        apply_changes(state.config, ConfigChanges(user=user))
        self.meta(state, ins, user)

    def do_stopsignal(self, state: _StageState, ins: Instruction) -> None:
        signal = expand(ins.args, state.substitution(), ins.where, self.dockerfile.escape)
        apply_changes(state.config, ConfigChanges(stop_signal=signal))
        self.meta(state, ins, signal)

    def do_expose(self, state: _StageState, ins: Instruction) -> None:
        ports = []
        for word in words(ins.args, state.substitution(), ins.where, self.dockerfile.escape):
            try:
                ports.append(exposed_port(word.lower()))  # docker takes TCP as tcp
            except InputError:
                raise ins.error(f"{word!r} is not PORT[/tcp|udp|sctp]") from None
        apply_changes(state.config, ConfigChanges(exposed_ports=tuple(ports)))
        self.meta(state, ins, sorted(set(ports)))

    def do_volume(self, state: _StageState, ins: Instruction) -> None:
        listed = exec_form(ins.args)
        if listed is None:
            listed = words(ins.args, state.substitution(), ins.where, self.dockerfile.escape)
        if not listed:
            raise ins.error("needs at least one path")
        apply_changes(state.config, ConfigChanges(volumes=tuple(listed)))
        self.meta(state, ins, listed)

    def _command(self, state: _StageState, ins: Instruction) -> list[str]:
        listed = exec_form(ins.args)
        return listed if listed is not None else [*state.shell, ins.args]

    def do_cmd(self, state: _StageState, ins: Instruction) -> None:
        command = self._command(state, ins)
        apply_changes(state.config, ConfigChanges(cmd=tuple(command)))
        self.meta(state, ins, command)

    def do_entrypoint(self, state: _StageState, ins: Instruction) -> None:
        command = self._command(state, ins)
        apply_changes(state.config, ConfigChanges(entrypoint=tuple(command)))  # resets CMD, as docker does
        self.meta(state, ins, command)

    def do_shell(self, state: _StageState, ins: Instruction) -> None:
        listed = exec_form(ins.args)
        if not listed:
            raise ins.error('needs the JSON form, e.g. SHELL ["/bin/bash", "-c"]')
        state.shell = tuple(listed)
        self.meta(state, ins, listed)

    def do_healthcheck(self, state: _StageState, ins: Instruction) -> None:
        if ins.args.strip().upper() == "NONE":
            state.section["Healthcheck"] = {"Test": ["NONE"]}
            self.meta(state, ins, "NONE")
            return
        word, _, rest = ins.args.strip().partition(" ")
        if word.upper() != "CMD" or not rest.strip():
            raise ins.error("expected HEALTHCHECK [OPTIONS] CMD command, or HEALTHCHECK NONE")
        listed = exec_form(rest)
        check: dict[str, Any] = {
            "Test": ["CMD", *listed] if listed is not None else ["CMD-SHELL", rest.strip()]
        }
        names = {"interval": "Interval", "timeout": "Timeout", "start-period": "StartPeriod"}
        names["start-interval"] = "StartInterval"
        for flag, value in ins.flags.items():
            if flag in names:
                check[names[flag]] = _duration_ns(value, ins)
            elif flag == "retries" and value.isdigit():
                check["Retries"] = int(value)
            else:
                raise ins.error(f"unknown or bad flag --{flag}={value}")
        state.section["Healthcheck"] = check
        self.meta(state, ins, check)

    # -- instructions that change files ----------------------------------------------------------

    def _image_of(self, state: _StageState) -> oci.Image:
        """The stage's file system so far as an image (in memory; its config names only its
        layers, so every build of the same layers shares one root file system image)."""
        config = {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in state.layers]},
        }
        raw = json.dumps(config, sort_keys=True).encode()
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        manifest = Manifest(
            OCI_MANIFEST,
            Descriptor(OCI_CONFIG, digest, len(raw)),
            tuple(Descriptor(layer.media_type, layer.digest, layer.size) for layer in state.layers),
        )
        record = ImageRecord(
            ref=f"build:{digest[7:19]}",
            manifest_digest=digest,
            config_digest=digest,
            layers=tuple(layer.digest for layer in state.layers),
            size=sum(layer.size for layer in state.layers),
            platform=_PLATFORM,
            source="build",
        )
        return oci.Image(record, manifest, ImageConfig.parse(raw), self.store)

    def vm(self, state: _StageState) -> _BuildVm:
        """The stage's build VM: the one running if it holds the stage's file system, else one
        restored from the last step's snapshot, else one booted on the file system so far."""
        if state.vm is not None and state.vm.layers == len(state.layers):
            return state.vm
        self.stop_vm(state)
        from supermachine.snapshots.metadata import ImageIdentity
        from supermachine.vm import Vm, VmConfig

        image = self._image_of(state)
        usable = self.cache.snapshot_usable(state.snapshot) if state.snapshot is not None else None
        if state.snapshot is not None and usable is not None:
            self.reporter.note(f"--> restoring the build VM of the last step ({usable.name[:12]})")
            try:
                vm = Vm.restore(usable, rootfs=state.snapshot.rootfs, network=self.options.network)
            except SupermachineError as exc:  # a base of its chain went, say: boot instead
                self.reporter.note(f"--> cannot restore it ({exc}); booting instead")
            else:
                rootfs_path = Path(state.snapshot.rootfs)
                state.vm = _BuildVm(vm, state.snapshot.mark, len(state.layers), rootfs_path, usable)
                return state.vm
        rootfs = oci.build_squashfs(image)
        self.reporter.note("--> booting a build VM")
        config = VmConfig(
            rootfs=rootfs,
            memory_mib=self.options.memory_mib,
            vcpus=self.options.vcpus,
            network=self.options.network,
            kernel_args=BUILD_KERNEL_ARGS,
        )
        vm = Vm._boot(config, image=ImageIdentity(image.ref, image.config_digest))
        try:
            state.vm = _BuildVm(vm, vm.mark(), len(state.layers), rootfs)
        except BaseException:
            vm.stop()
            raise
        return state.vm

    def snapshot(self, key: str, build_vm: _BuildVm) -> StepSnapshot | None:
        """Snapshots the build VM after a step (a diff against the previous step's snapshot),
        so a later build that changes the next step restores it instead of booting."""
        if not self.options.step_snapshots:
            return None
        name = key.removeprefix("sha256:")
        directory = self.cache.snapshots / name
        self.cache.snapshots.mkdir(parents=True, exist_ok=True)
        if (directory / "metadata.json").exists():
            shutil.rmtree(directory)  # an earlier run of the same step (--no-cache): replaced
        base = build_vm.snapshot if build_vm.snapshot is not None and build_vm.snapshot.exists() else None
        try:
            build_vm.vm.snapshot(directory, base=base)
        except SupermachineError as exc:
            self.reporter.note(f"--> no snapshot of this step: {exc}")
            return None
        build_vm.snapshot = directory
        return StepSnapshot(name, build_vm.mark, str(build_vm.rootfs), file_stamp(build_vm.rootfs))

    def step_layer(
        self, state: _StageState, ins: Instruction, key: str, make: Callable[[_BuildVm], None], history: str
    ) -> None:
        """Runs a file-changing step unless its key is cached, and appends its layer (if it changed
        anything) and its history entry."""
        entry = None if self.options.no_cache else self.cache.get(key)
        if entry is not None:
            self.cached += 1
            self.reporter.note(f"--> Using cache {key[7:19]}")
        else:
            build_vm = self.vm(state)
            make(build_vm)
            self.ran += 1
            layer = self.export(state, build_vm)
            entry = CacheEntry(layer, self.snapshot(key, build_vm))
            self.cache.put(key, entry)
            self.reporter.note(f"--> {entry.layer.digest[7:19] if entry.layer else 'no changes'}")
        state.key = key
        state.snapshot = entry.snapshot
        if entry.layer is not None:
            state.layers.append(entry.layer)
            state.config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
            state.config["rootfs"]["diff_ids"] = [
                *state.config["rootfs"].get("diff_ids", []),
                entry.layer.diff_id,
            ]
        self.history(state, history, empty=entry.layer is None)

    def export(self, state: _StageState, build_vm: _BuildVm) -> LayerRef | None:
        """The VM's changes since the last step, stored as a layer blob (``None``: no change)."""
        self.store.tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.store.tmp_dir / f"build-layer-{secrets.token_hex(6)}.tar.gz"
        try:
            layer = build_vm.vm.export_layer(path, since=build_vm.mark, keep_mark=True)
            assert layer.mark is not None
            build_vm.mark = layer.mark
            if layer.entries == 0:
                return None
            with open(path, "rb") as f:
                self.store.blobs.put_stream(layer.digest, layer.size, f, "layer")
        finally:
            path.unlink(missing_ok=True)
        build_vm.layers += 1
        return LayerRef(layer.media_type, layer.digest, layer.size, layer.diff_id)

    def run_env(self, state: _StageState) -> dict[str, str]:
        args = {k: v for k, v in state.args.items() if v is not None}
        env = {"PATH": DEFAULT_PATH, **args, **state.env()}
        return env

    def secret_mount(self, ins: Instruction, spec: str) -> tuple[str, str, int, bytes | None]:
        """``--mount=type=secret,id=NAME[,target=PATH][,required=true][,mode=0400]``: the secret's
        id, where the step sees it, its mode, and its content (``None``: not given, not required)."""
        fields: dict[str, str] = {}
        for item in spec.split(","):
            key, _, value = item.partition("=")
            fields[key.strip()] = value.strip()
        if fields.get("type") != "secret":
            raise ins.error(f"RUN --mount={spec} is not supported (only type=secret)")
        unknown = set(fields) - {"type", "id", "target", "dst", "destination", "required", "mode"}
        if unknown or not fields.get("id"):
            raise ins.error(f"RUN --mount={spec}: expected type=secret,id=NAME[,target=PATH][,required=true]")
        secret_id = fields["id"]
        target = (
            fields.get("target")
            or fields.get("dst")
            or fields.get("destination")
            or f"/run/secrets/{secret_id}"
        )
        if not target.startswith("/") or ".." in target.split("/"):
            raise ins.error(f"RUN --mount={spec}: the target must be an absolute path without '..'")
        try:
            mode = int(fields.get("mode", "0400"), 8)
        except ValueError:
            raise ins.error(f"RUN --mount={spec}: mode is not octal") from None
        content = self.options.secrets.get(secret_id)
        if content is None and fields.get("required", "false").lower() == "true":
            raise ins.error(
                f"secret {secret_id!r} is required: give it with --secret id={secret_id},src=FILE"
            )
        return secret_id, target, mode & 0o7777, content

    def do_run(self, state: _StageState, ins: Instruction) -> None:
        mount = None
        for flag, value in ins.flags.items():
            if flag == "mount":
                mount = self.secret_mount(ins, value)
            elif (flag, value) != ("network", "default"):
                raise ins.error(f"RUN --{flag}={value} is not supported")
        argv = self._command(state, ins)
        env = self.run_env(state)
        user = state.section.get("User") or None
        cwd = state.section.get("WorkingDir") or "/"
        args = sorted((k, v) for k, v in state.args.items() if v is not None)
        # A secret's id and place are part of the step; its content is not (docker's rule).
        key = chain(state.key, ["RUN", argv, args] + ([mount[:3]] if mount else []))

        def make(build_vm: _BuildVm) -> None:
            made = self.place_secret(build_vm, mount) if mount is not None and mount[3] is not None else []
            try:
                process = build_vm.vm.spawn(argv, env=env, replace_env=True, cwd=cwd, user=user)
                for event in process:
                    self.reporter.output(event.data, event.stream == "stderr")
                result = process.wait()
            finally:
                for path in reversed(made):  # before the export: a secret never enters a layer
                    build_vm.vm.remove(path, recursive=True)
            if result.returncode != 0:
                shown = " ".join(argv) if len(" ".join(argv)) < 200 else " ".join(argv)[:197] + "..."
                raise BuildError(f"{ins.where}: RUN {shown}: exit status {result.returncode}")

        self.step_layer(state, ins, key, make, " ".join(argv))

    def place_secret(self, build_vm: _BuildVm, mount: tuple[str, str, int, bytes | None]) -> list[str]:
        """Writes a secret where the step expects it; returns what was made (to remove after)."""
        _, target, mode, content = mount
        assert content is not None
        plan = CopyPlan()
        made: list[str] = []
        for prefix in _prefixes(os.path.dirname(target)):
            if not made and self.exists_as_dir(build_vm, prefix):
                continue
            plan.add(_dir_item(prefix, None))
            made.append(prefix)
        secret_file = self.work / f"secret-{secrets.token_hex(6)}"
        secret_file.write_bytes(content)
        os.chmod(secret_file, 0o600)
        try:
            plan.add(
                CopyItem(
                    target.lstrip("/"), "file", mode, 0, 0, int(time.time()), secret_file, size=len(content)
                )
            )
            self.unpack(build_vm, plan)
        finally:
            secret_file.unlink(missing_ok=True)
        return made[:1] if made else [target]

    def do_workdir(self, state: _StageState, ins: Instruction) -> None:
        path = expand(ins.args, state.substitution(), ins.where, self.dockerfile.escape).strip()
        if not path:
            raise ins.error("needs a path")
        if not path.startswith("/"):
            path = os.path.join(state.section.get("WorkingDir") or "/", path)
        path = os.path.normpath(path)
        apply_changes(state.config, ConfigChanges(workdir=path))
        key = chain(state.key, ["WORKDIR", path])

        def make(build_vm: _BuildVm) -> None:
            plan = CopyPlan()
            for prefix in _prefixes(path):
                if not self.exists_as_dir(build_vm, prefix):
                    plan.add(_dir_item(prefix, None))
            self.unpack(build_vm, plan)

        self.step_layer(state, ins, key, make, f"/bin/sh -c #(nop) WORKDIR {path}")

    def exists_as_dir(self, build_vm: _BuildVm, path: str) -> bool:
        try:
            return bool(build_vm.vm.stat(path, follow=True).type == "dir")
        except AgentRequestError:
            return False

    def unpack(self, build_vm: _BuildVm, plan: CopyPlan) -> None:
        if not plan.items:
            return
        tar_path = self.work / f"copy-{secrets.token_hex(6)}.tar"
        try:
            with open(tar_path, "wb") as f:
                plan.write_tar(f)
            with open(tar_path, "rb") as f:
                build_vm.vm.put_archive("/", f, timeout=3600)
        finally:
            tar_path.unlink(missing_ok=True)

    def owner(self, state: _StageState, ins: Instruction, spec: str) -> tuple[int, int]:
        """``--chown=user[:group]``: numbers, or names from the stage's /etc/passwd and /etc/group
        (read in the build VM)."""
        user, _, group = spec.partition(":")
        tables: dict[str, list[list[str]]] = {}

        def rows(db: str) -> list[list[str]]:
            """The image's /etc/passwd or /etc/group as fields, read once per COPY."""
            if db not in tables:
                try:
                    data = self.vm(state).vm.read_file(f"/etc/{db}", max_bytes=4 << 20)
                except AgentRequestError:
                    data = b""
                tables[db] = [line.split(":") for line in data.decode(errors="replace").splitlines()]
            return tables[db]

        def number(name: str, db: str) -> int:
            if name.isdigit():
                return int(name)
            for fields in rows(db):
                if len(fields) > 2 and fields[0] == name and fields[2].isdigit():
                    return int(fields[2])
            raise ins.error(f"--chown: no {'user' if db == 'passwd' else 'group'} {name!r} in the image")

        uid = number(user, "passwd")
        if group:
            return uid, number(group, "group")
        if user.isdigit():
            return uid, uid
        # A user name alone: its primary group, as docker does.
        for fields in rows("passwd"):
            if len(fields) > 3 and fields[0] == user and fields[3].isdigit():
                return uid, int(fields[3])
        return uid, uid
        # A user name alone: its primary group, as docker does.
        build_vm = self.vm(state)
        text = build_vm.vm.read_file("/etc/passwd", max_bytes=4 << 20).decode(errors="replace")
        for line in text.splitlines():
            fields = line.split(":")
            if len(fields) > 3 and fields[0] == user and fields[3].isdigit():
                return uid, int(fields[3])
        return uid, uid

    def source_tree(self, state: _StageState, ins: Instruction, name: str) -> SourceTree:
        """The tree COPY --from reads: an earlier stage's file system, or an image's."""
        index = self._stage_named(name, state.index)
        if index is not None:
            if index not in self.trees:
                self.trees[index] = self.materialise(self._image_of(self.results[index]), f"stage {name}")
            return self.trees[index]
        key = -1 - len(self.trees)
        image = self.pull(name, ins)
        tree = self.materialise(image, name)
        self.trees[key] = tree
        return tree

    def materialise(self, image: oci.Image, what: str) -> SourceTree:
        dest = self.work / f"tree-{secrets.token_hex(6)}"
        oci.build_rootfs(image, dest)
        return SourceTree(dest, what)

    def do_copy(self, state: _StageState, ins: Instruction) -> None:
        self.copy(state, ins, unpack_archives=False)

    def do_add(self, state: _StageState, ins: Instruction) -> None:
        self.copy(state, ins, unpack_archives=True)

    def copy(self, state: _StageState, ins: Instruction, *, unpack_archives: bool) -> None:
        for flag in ins.flags:
            if flag not in ("from", "chown", "chmod", "link"):
                raise ins.error(f"--{flag} is not supported")
        env = state.substitution()
        listed = exec_form(ins.args)
        items = listed if listed is not None else words(ins.args, env, ins.where, self.dockerfile.escape)
        if listed is not None:
            items = [expand(i, env, ins.where, self.dockerfile.escape) for i in items]
        if len(items) < 2:
            raise ins.error("needs at least one source and a destination")
        *sources, dest = items
        for source in sources:
            if re.match(r"^[a-z][a-z0-9+.-]*://", source) or source.startswith("git@"):
                raise ins.error(f"{source}: remote sources are not supported; fetch them in a RUN step")
        if "from" in ins.flags:
            tree = self.source_tree(state, ins, expand(ins.flags["from"], env, ins.where))
        else:
            tree = self.context
        chmod = None
        if "chmod" in ins.flags:
            try:
                chmod = int(ins.flags["chmod"], 8)
            except ValueError:
                raise ins.error(f"--chmod={ins.flags['chmod']} is not an octal mode") from None
            if not 0 <= chmod <= 0o7777:
                raise ins.error(f"--chmod={ins.flags['chmod']} is not a mode")
        workdir = state.section.get("WorkingDir") or "/"
        target = dest if dest.startswith("/") else os.path.join(workdir, dest)
        into_dir = dest.endswith("/") or dest in (".", "./") or len(sources) > 1
        selected = [(rel, st) for pattern in sources for rel, st in _selected(tree, pattern, ins.where)]
        if len(selected) > 1 and not into_dir:
            raise ins.error(
                f"copying more than one source needs a destination directory ending in /, not {dest!r}"
            )
        archives = [
            rel
            for rel, st in selected
            if unpack_archives and "from" not in ins.flags and _is_archive(tree.root / rel)
        ]
        plan_inputs = [rel for rel, _ in selected]
        key_sources = CopyPlan()
        # The cache key: the selected files (content, modes) before any owner or VM question.
        for rel, st in selected:
            plan_copy(key_sources, tree, rel, st, "/" + rel, owner=None, chmod=None, dest_exists_as_dir=True)
        key = chain(
            state.key,
            [ins.name, plan_inputs, target, into_dir, key_sources.digest(), dict(ins.flags), archives],
        )

        def make(build_vm: _BuildVm) -> None:
            owner = (
                self.owner(state, ins, expand(ins.flags["chown"], env, ins.where))
                if "chown" in ins.flags
                else None
            )
            dest_is_dir = self.exists_as_dir(build_vm, target)
            plan = CopyPlan()
            for rel, st in selected:
                if rel in archives:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    where = target
                    exists = dest_is_dir
                elif into_dir or dest_is_dir:
                    where = os.path.join(target, os.path.basename(rel))
                    exists = False
                    if not dest_is_dir:
                        plan.add(_dir_item(target, owner))
                        dest_is_dir = True
                else:
                    where, exists = target, False
                plan_copy(plan, tree, rel, st, where, owner=owner, chmod=chmod, dest_exists_as_dir=exists)
            self.unpack(build_vm, plan)
            for rel in archives:
                if not self.exists_as_dir(build_vm, target):
                    dir_plan = CopyPlan()
                    dir_plan.add(_dir_item(target, owner))
                    self.unpack(build_vm, dir_plan)
                with _open_archive(tree.root / rel) as stream:
                    build_vm.vm.put_archive(target, stream, timeout=3600)

        self.step_layer(state, ins, key, make, f"/bin/sh -c #(nop) {ins.name} {' '.join(items)}")

    # -- the result ----------------------------------------------------------------------------

    def finish(self, state: _StageState) -> BuildResult:
        config = copy.deepcopy(state.config)
        config["created"] = _now()
        config.setdefault("architecture", "amd64")
        config.setdefault("os", "linux")
        refs = tuple(check_new_ref(t) for t in self.options.tags)
        layers = [Descriptor(layer.media_type, layer.digest, layer.size) for layer in state.layers]
        image = store_image(self.store, config, layers, refs or None)
        usable = self.cache.snapshot_usable(state.snapshot) if state.snapshot is not None else None
        return BuildResult(
            image,
            refs,
            self.total,
            self.cached,
            self.ran,
            built_layers=tuple(state.layers[state.base_layers :]),
            snapshot=usable,
            snapshot_rootfs=Path(state.snapshot.rootfs) if usable is not None and state.snapshot else None,
        )


def _dir_item(path: str, owner: tuple[int, int] | None) -> CopyItem:
    uid, gid = owner if owner is not None else (0, 0)
    return CopyItem(path.strip("/"), "dir", 0o755, uid, gid, int(time.time()))


def _prefixes(path: str) -> list[str]:
    parts = [p for p in path.split("/") if p]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def _selected(tree: SourceTree, pattern: str, where: str) -> list[tuple[str, os.stat_result]]:
    """The sources ``pattern`` names and what each is (select gives real paths: no link to follow)."""
    return [(rel, os.lstat(tree.root / rel if rel else tree.root)) for rel in tree.select(pattern, where)]


_ARCHIVE_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


def _is_archive(path: Path) -> bool:
    """A local tar archive ADD unpacks (plain, gzip, bzip2, xz or zstd), by content."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size < 6:
        return False
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(_ARCHIVE_MAGIC):
        return True
    return len(head) >= 262 and head[257:262] == b"ustar"


class _open_archive:
    """The plain tar stream of a (possibly compressed) archive file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stack: list[Any] = []

    def __enter__(self) -> Any:
        import bz2
        import gzip
        import lzma

        import zstandard

        raw = open(self.path, "rb")
        self.stack.append(raw)
        head = raw.read(6)
        raw.seek(0)
        stream: Any
        if head.startswith(b"\x1f\x8b"):
            stream = gzip.GzipFile(fileobj=raw)
        elif head.startswith(b"BZh"):
            stream = bz2.BZ2File(raw)
        elif head.startswith(b"\xfd7zXZ\x00"):
            stream = lzma.LZMAFile(raw)
        elif head.startswith(b"\x28\xb5\x2f\xfd"):
            stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        else:
            stream = raw
        if stream is not raw:
            self.stack.append(stream)
        return stream

    def __exit__(self, *exc: object) -> None:
        for item in reversed(self.stack):
            item.close()


def build(options: BuildOptions, reporter: Reporter | None = None) -> BuildResult:
    """Builds the Dockerfile of ``options`` and stores the image (see the module docstring)."""
    try:
        return _Builder(options, reporter or _Quiet()).run()
    except CommandFailedError as exc:
        raise BuildError(str(exc)) from None
