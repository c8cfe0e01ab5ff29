"""Images a microVM starts from. ``Image.from_oci`` takes any OCI/Docker image::

from supermachine import Image

image = Image.from_oci("127.0.0.1:5000/busybox:latest")   # pulled once, cached, verified
with image.start() as vm:                                 # a microVM on the image's rootfs
    vm.exec(["echo", "hi"])                               # Env, WorkingDir, User applied
image.run().stdout                                        # Entrypoint + Cmd, like docker run
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from supermachine import oci
from supermachine.agent import ExecResult
from supermachine.errors import ImageNotFoundError, InputError
from supermachine.oci.progress import ProgressReporter
from supermachine.vm import Vm, VmConfig

PullPolicy = Literal["missing", "always", "never"]


@dataclass(frozen=True)
class Image:
    """An OCI image ready to boot: its config and its read-only squashfs root filesystem."""

    ref: str
    config: oci.ImageConfig
    rootfs: Path
    """The squashfs image given to the guest as its root disk."""
    oci_image: oci.Image

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
        and User unless the call says otherwise."""
        if config is not None and overrides:
            raise TypeError("pass either a VmConfig or keyword arguments, not both")
        base = config if config is not None else VmConfig(**overrides)  # type: ignore[arg-type]
        return Vm.start(self.vm_config(base))

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
