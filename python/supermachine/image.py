"""Images a microVM starts from. ``Image.from_oci`` takes any OCI/Docker image::

from supermachine import Image

image = Image.from_oci("127.0.0.1:5000/busybox:latest")   # pulled once, cached, verified
with image.start() as vm:                                 # a microVM on the image's rootfs
    vm.exec(["echo", "hi"])                               # Env, WorkingDir, User applied
image.run().stdout                                        # Entrypoint + Cmd, like docker run

A running VM can be snapshotted; the snapshot is an image too, and starting it restores the VM in
milliseconds, copy-on-write, with its agent already waiting::

    with image.start() as vm:
        vm.exec(["sh", "-c", "echo warm > /tmp/state"])
        baked = vm.snapshot(store / "warm")               # diff against a golden if one exists
    with baked.start() as clone:                          # == Image.from_snapshot(store / "warm")
        clone.exec(["cat", "/tmp/state"]).stdout          # b"warm\n"
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from supermachine import oci
from supermachine.agent import ExecResult
from supermachine.errors import ImageNotFoundError, InputError, SnapshotError
from supermachine.oci.progress import ProgressReporter
from supermachine.pool import Pool
from supermachine.snapshots import metadata as snapshot_metadata
from supermachine.snapshots.metadata import ImageIdentity, SnapshotMetadata
from supermachine.vm import Vm, VmConfig
from supermachine.worker import VmmMode

PullPolicy = Literal["missing", "always", "never"]


@dataclass(frozen=True)
class Image:
    """What a microVM starts from: an OCI image (its config and read-only squashfs root
    filesystem), or a VM snapshot (:meth:`from_snapshot`), which starts by restoring."""

    ref: str
    config: oci.ImageConfig
    rootfs: Path | None
    """The squashfs image given to the guest as its root disk."""
    oci_image: oci.Image | None = None
    snapshot: Path | None = None
    """The snapshot directory, for an image made by :meth:`from_snapshot`."""
    snapshot_meta: SnapshotMetadata | None = None
    """What only the snapshot's ``metadata.json`` records (image, kernel, agent, run defaults)."""

    @property
    def snapshot_base(self) -> str | None:
        """For a diff snapshot, the base its VM state records (a sibling by its directory name);
        ``None`` for a full snapshot or an image that is not a snapshot."""
        if self.snapshot is None:
            return None
        from supermachine.snapshots import attach, verify

        return attach.base_name(verify.snapshot_info(self.snapshot))

    @property
    def identity(self) -> ImageIdentity:
        """What snapshots of VMs started from this image record as their image."""
        if self.snapshot_meta is not None:
            return self.snapshot_meta.image
        digest = self.oci_image.config_digest if self.oci_image is not None else "none"
        return ImageIdentity(self.ref, digest)

    @classmethod
    def from_snapshot(
        cls, directory: str | os.PathLike[str], *, rootfs: str | os.PathLike[str] | None = None
    ) -> Image:
        """The snapshot in ``directory`` (written by :meth:`Vm.snapshot <supermachine.vm.Vm.snapshot>`).
        Its metadata and state file are checked now. Its root filesystem is the image cache's for
        the snapshot's image, or ``rootfs`` (needed for a snapshot of a VM booted on a bare root
        filesystem image in another process; its content must match). :meth:`start` restores it."""
        from supermachine import _core
        from supermachine.snapshots import attach

        path = Path(directory)
        meta = snapshot_metadata.load(path)
        try:
            info = _core.snapshot_info(str(path))
        except (OSError, ValueError) as exc:
            raise SnapshotError(str(exc)) from None
        attach.check_state_matches(path, meta, info)
        run = meta.run or snapshot_metadata.RunDefaults()
        config = oci.ImageConfig(
            architecture="amd64",
            os="linux",
            env=tuple(f"{k}={v}" for k, v in run.env.items()),
            entrypoint=run.entrypoint,
            cmd=run.cmd,
            working_dir=run.workdir or "",
            user=run.user or "",
        )
        try:
            root = attach.snapshot_rootfs(path, meta, rootfs)
        except SnapshotError:
            if rootfs is not None:
                raise
            root = None  # not found yet: start() says what is missing
        return cls(ref=meta.image.ref, config=config, rootfs=root, snapshot=path, snapshot_meta=meta)

    @classmethod
    def from_oci(
        cls,
        ref: str,
        *,
        platform: str | None = None,
        insecure: bool | None = None,
        pull: PullPolicy = "missing",
        progress: ProgressReporter | None = None,
    ) -> Image:
        """The image ``ref`` (a registry reference, ``oci:DIR[:TAG]`` or ``docker-archive:FILE``).

        ``pull="missing"`` (default) downloads it only when it is not cached; ``"always"`` checks
        the registry again; ``"never"`` fails if it is not cached. Its root filesystem is built
        once and cached by the image's config digest.
        """
        if pull not in ("missing", "always", "never"):
            raise InputError(f"pull must be 'missing', 'always' or 'never', got {pull!r}")
        stored: oci.Image | None = None
        if pull != "always":
            try:
                stored = oci.load_image(ref)
            except ImageNotFoundError:
                if pull == "never":
                    raise
        if stored is None:
            stored = oci.pull(ref, platform=platform, insecure=insecure, progress=progress)
        if stored.config.os and stored.config.os != "linux":
            raise InputError(f"{ref} is a {stored.config.os} image; only Linux images can run")
        if stored.config.architecture and stored.config.architecture != "amd64":
            raise InputError(f"{ref} is built for {stored.config.architecture}; this host runs amd64")
        rootfs = oci.build_squashfs(stored)
        return cls(ref=ref, config=stored.config, rootfs=rootfs, oci_image=stored)

    @classmethod
    def build(
        cls,
        context: str | os.PathLike[str],
        *,
        tag: str | None = None,
        dockerfile: str | os.PathLike[str] | None = None,
        build_args: Mapping[str, str] | None = None,
        target: str | None = None,
        no_cache: bool = False,
        secrets: Mapping[str, bytes] | None = None,
        memory_mib: int | None = None,
        network: object = "egress",
    ) -> Image:
        """Builds the Dockerfile in ``context`` (``supermachine build``: each RUN in a microVM,
        every step cached) and returns the stored image, tagged ``tag`` if given."""
        from supermachine.build.builder import DEFAULT_BUILD_MEMORY_MIB, BuildOptions, build

        options = BuildOptions(
            context=Path(context),
            dockerfile=Path(dockerfile) if dockerfile is not None else None,
            tags=(tag,) if tag else (),
            build_args=dict(build_args or {}),
            target=target,
            no_cache=no_cache,
            secrets=dict(secrets or {}),
            memory_mib=memory_mib or DEFAULT_BUILD_MEMORY_MIB,
            network=network,
        )
        result = build(options)
        stored = result.image
        rootfs = oci.build_squashfs(stored)
        return cls(ref=stored.ref, config=stored.config, rootfs=rootfs, oci_image=stored)

    def vm_config(self, base: VmConfig | None = None) -> VmConfig:
        """``base`` (or the defaults) with this image's root filesystem, Env, WorkingDir and User."""
        base = base or VmConfig()
        return replace(
            base,
            rootfs=self.rootfs,
            env={**self.config.environment(), **base.env},
            workdir=base.workdir or self.config.working_dir or None,
            user=base.user or self.config.user or None,
        )

    def start(self, config: VmConfig | None = None, **overrides: object) -> Vm:
        """Boots a microVM on this image; every command in it gets the image's Env, WorkingDir
        and User unless the call says otherwise.

        For a snapshot image this restores the snapshot instead: the VM's shape is fixed by the
        snapshot, so only ``console_log``, ``boot_timeout``, ``env``, ``workdir``, ``user``,
        ``vmm``, ``network``, ``mounts`` and ``volumes`` (one per shared folder and volume the
        snapshot's VM had) may be given."""
        if config is not None and overrides:
            raise TypeError("pass either a VmConfig or keyword arguments, not both")
        if self.snapshot is not None:
            return self._restore(config, overrides)
        base = config if config is not None else VmConfig(**overrides)  # type: ignore[arg-type]
        return Vm._boot(
            self.vm_config(base),
            image=self.identity,
            run_defaults=(self.config.entrypoint, self.config.cmd),
        )

    def pool(self, min: int = 1, max: int = 4, *, vmm: VmmMode = "worker") -> Pool:
        """A warm pool of VMs restored from this snapshot image: ``min`` kept idle, at most ``max``
        alive; ``pool.acquire()`` hands one out in milliseconds (see :mod:`supermachine.pool`).
        Only snapshot images can be pooled. ``vmm`` is as in :class:`~supermachine.vm.VmConfig`."""
        return Pool(self, min=min, max=max, vmm=vmm)

    def _restore(self, config: VmConfig | None, overrides: dict[str, object]) -> Vm:
        assert self.snapshot is not None
        given = config if config is not None else VmConfig(**overrides)  # type: ignore[arg-type]
        defaults = VmConfig()
        allowed = {
            "console_log",
            "boot_timeout",
            "env",
            "workdir",
            "user",
            "vmm",
            "network",
            "mounts",
            "volumes",
        }
        fixed = sorted(
            name
            for name in VmConfig.__dataclass_fields__
            if name not in allowed and getattr(given, name) != getattr(defaults, name)
        )
        if fixed:
            raise InputError(
                f"a snapshot fixes the VM's shape; cannot set {', '.join(fixed)} "
                f"when starting {self.snapshot}"
            )
        return Vm.restore(
            self.snapshot,
            rootfs=self.rootfs,
            console_log=given.console_log,
            boot_timeout=given.boot_timeout if given.boot_timeout != defaults.boot_timeout else 120.0,
            env={**self.config.environment(), **given.env} if given.env else None,
            workdir=given.workdir,
            user=given.user,
            vmm=given.vmm,
            network=None if given.network == defaults.network else given.network,
            mounts=given.mounts,
            volumes=given.volumes,
        )

    def argv(self, command: Sequence[str] | None = None) -> list[str]:
        """What ``run`` executes: Entrypoint + (``command`` or the image's Cmd), as docker run does."""
        argv = self.config.argv(list(command) if command else None)
        if not argv:
            raise InputError(f"{self.ref} has no Entrypoint or Cmd: give a command to run")
        return argv

    def run(
        self,
        command: Sequence[str] | None = None,
        *,
        config: VmConfig | None = None,
        env: Mapping[str, str] | None = None,
        input: bytes | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Boots a VM, runs the image's command (or ``command``) to completion, stops the VM."""
        argv = self.argv(command)
        base = config or VmConfig()
        if env:
            base = replace(base, env={**base.env, **env})
        with self.start(base) as vm:
            return vm.exec(argv, input=input, timeout=timeout)
