"""Shared inputs for the benchmarks. Every benchmark runs its peers on the very same bytes."""

from __future__ import annotations

import contextlib
import importlib.util
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

MiB = 1 << 20
E2E_CONFTEST = Path(__file__).resolve().parents[1] / "tests" / "e2e" / "conftest.py"


def pytest_report_header() -> list[str]:
    return [
        "supermachine benchmarks: host-side throughput (chunking, page hashing, pulling) is meaningful on",
        "any host; guest-side latencies are only meaningful on hardware KVM, not on emulating hosts.",
    ]


@pytest.fixture(scope="session")
def installed_bytecode() -> None:
    """Compile supermachine's Python sources to bytecode before whole commands are timed.

    An installed wheel carries its bytecode (pip compiles it at install time), and an editable
    install writes it on the first import, unless ``PYTHONDONTWRITEBYTECODE`` is set, as it is on
    some development hosts: then every command would compile our modules again, a cost no user of
    an installed package pays."""
    import supermachine

    package = Path(supermachine.__file__).parent
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], env=environ, check=True)


def skip_unless_kvm() -> None:
    """Skips the calling benchmark, with the reason printed, where /dev/kvm cannot be opened."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError as e:
        pytest.skip(f"/dev/kvm is not usable: {e.strerror}")


def _e2e_conftest() -> Any:
    """The e2e suite's conftest module (loaded by path: both directories have a conftest). Skips
    the caller where busybox or mksquashfs, which its root filesystems need, is missing."""
    for tool in ("busybox", "mksquashfs"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is needed to build the benchmark's root filesystem")
    spec = importlib.util.spec_from_file_location("e2e_conftest", E2E_CONFTEST)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def busybox_squashfs(dest: Path) -> Path:
    """The e2e suite's busybox root filesystem, built in ``dest``; its tree stays in ``dest/root``."""
    path: Path = _e2e_conftest().busybox_squashfs(dest)
    return path


def squash(tree: Path, image: Path, compression: str | None = None) -> Path:
    """The e2e suite's squashfs maker: ``tree`` owned by root, compressed as the product does on
    this host unless ``compression`` is given."""
    path: Path = _e2e_conftest().squash(tree, image, compression)
    return path


def timed_exec(vm: Any, command: list[str], expected: bytes) -> float:
    """Seconds of the whole ``vm.exec(command)`` call, which must succeed printing ``expected``."""
    started = time.perf_counter()
    result = vm.exec(command, timeout=900)
    elapsed = time.perf_counter() - started
    assert result.status == 0 and result.stdout == expected, result.stderr
    return elapsed


def skip_unless_binutils() -> None:
    """Skips the calling benchmark where the assembler and linker that build raw guests are missing."""
    for tool in ("as", "ld", "objcopy"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (binutils) is needed to build the benchmark guest")


COUNTER_RESULTS = 0x300100
"""Where the counter guest keeps its counter."""

COUNTER_GUEST = f"""
.intel_syntax noprefix
.code64
.globl _start
.text
_start:
    mov rdi, {COUNTER_RESULTS}
1:  inc qword ptr [rdi]
    jmp 1b
"""
"""A raw 64-bit guest that counts for ever: it runs without a kernel, so its restore measures the
VMM alone."""


def assemble(d: Path, name: str, source: str, flat: bool) -> Path:
    """``source`` (GNU as) linked at 1 MiB: an ELF, or with ``flat`` its bare ``.text``."""
    (d / f"{name}.S").write_text(source)
    subprocess.run(["as", "--64", "-o", str(d / f"{name}.o"), str(d / f"{name}.S")], check=True)
    elf = d / f"{name}.elf"
    link = ["ld", "-m", "elf_x86_64", "-nostdlib", "-Ttext=0x100000", "-e", "_start"]
    subprocess.run([*link, "-o", str(elf), str(d / f"{name}.o")], check=True)
    if not flat:
        return elf
    out = d / f"{name}.bin"
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(elf), str(out)], check=True)
    return out


def counter_value(vm: Any) -> int:
    """The counter guest's counter in ``vm`` (a ``_core.Vm``)."""
    return int.from_bytes(vm.read_memory(COUNTER_RESULTS, 8), "little")


def counter_vm(workdir: Path, memory_mib: int, data_mib: int = 32) -> Any:
    """A running counter guest (an in-process ``_core.Vm``) with ``memory_mib`` of RAM, once it
    counts, holding the same ``data_mib`` MiB of non-zero data spread over its RAM for any size."""
    from supermachine import _core

    guest = assemble(workdir, "counter", COUNTER_GUEST, flat=True)
    vm = _core.Vm.start({"raw": str(guest), "memory_mib": memory_mib})
    deadline = time.monotonic() + 10
    while counter_value(vm) == 0:
        assert time.monotonic() < deadline, "the guest never ran"
        time.sleep(0.001)
    write_data(vm, memory_mib, data_mib)
    return vm


def write_data(vm: Any, memory_mib: int, data_mib: int = 32) -> list[int]:
    """Writes ``data_mib`` MiB of the same non-zero bytes spread over ``vm``'s RAM of
    ``memory_mib``, one MiB at a time, at the same places for the same sizes; returns those
    guest addresses."""
    chunk = bytes(range(256)) * (MiB // 256)
    addresses = [ram_address((4 + i * (memory_mib - 8) // data_mib) * MiB) for i in range(data_mib)]
    for address in addresses:
        vm.write_memory(address, chunk)
    return addresses


def counter_snapshots(workdir: Path, sizes: tuple[int, ...], prefix: str = "snap") -> dict[int, Path]:
    """A snapshot of a running counter guest (:func:`counter_vm`) per RAM size in MiB, written to
    ``workdir/<prefix>-<size>`` in-process (untimed)."""
    out = {}
    for size in sizes:
        vm = counter_vm(workdir, size)
        out[size] = workdir / f"{prefix}-{size}"
        vm.snapshot(str(out[size]))
        vm.stop()
    return out


MMIO_HOLE = (0xC000_0000, 0x1_0000_0000)
"""The 32-bit MMIO hole: guest RAM that would fall in it continues above it (the VMM's layout)."""


def ram_address(offset: int) -> int:
    """The guest physical address of byte ``offset`` of guest RAM."""
    start, end = MMIO_HOLE
    return offset if offset < start else offset + (end - start)


@pytest.fixture(scope="session")
def random_256m() -> bytes:
    """256 MiB of incompressible bytes (random data defeats no chunker and favours none)."""
    return np.random.default_rng(20261122).bytes(256 * MiB)


@pytest.fixture(scope="session")
def random_256m_file(tmp_path_factory: pytest.TempPathFactory, random_256m: bytes) -> Iterator[Path]:
    """``random_256m`` in a file, for the peers that chunk a path. Just written, it sits in the
    page cache, so the peers read memory, not the disk."""
    path = tmp_path_factory.mktemp("random") / "random.bin"
    path.write_bytes(random_256m)
    yield path
    path.unlink()


USR_TAR_LIMIT = 256 * MiB
TAR_OVERHEAD = 2048
"""Bytes charged per member on top of its 512-byte-padded data: its header, and a long name's."""
TAR_END = 10240
"""The end-of-archive blocks, padded to tar's default record size."""


def _files(top: str) -> Iterator[str]:
    """The readable regular files under ``top``, in sorted walk order (the same on every run)."""
    for root, dirs, files in os.walk(top):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            if not os.path.islink(path) and os.path.isfile(path) and os.access(path, os.R_OK):
                yield path


def _usr_sample(limit: int) -> list[str]:
    """Files from /usr/bin, /usr/lib and /usr/share (executables, libraries, shared data), a third
    of ``limit`` of tar each, as paths relative to /."""
    picked: list[str] = []
    for top in ("bin", "lib", "share"):
        left = (limit - TAR_END) // 3
        for path in _files(f"/usr/{top}"):
            cost = -(-os.path.getsize(path) // 512) * 512 + TAR_OVERHEAD
            if cost <= left:
                picked.append(path.removeprefix("/"))
                left -= cost
            if left < 512 + TAR_OVERHEAD:
                break
    return picked


@pytest.fixture(scope="session")
def usr_tar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``tar cf`` of a bounded part of this host's /usr (at most 256 MiB): real data, with the
    structure, repeats and zero padding random bytes lack, as image layers hold. Its bytes differ
    between hosts, so peers are only comparable within one run. In the page cache once written."""
    if shutil.which("tar") is None:
        pytest.skip("tar is needed to build the real-data input")
    directory = tmp_path_factory.mktemp("usr-tar")
    members = directory / "members"
    members.write_bytes(b"\0".join(p.encode() for p in _usr_sample(USR_TAR_LIMIT)))
    path = directory / "usr.tar"
    subprocess.run(
        ["tar", "cf", str(path), "-C", "/", "--null", "--no-recursion", "-T", str(members)], check=True
    )
    assert path.stat().st_size <= USR_TAR_LIMIT
    yield path
    path.unlink()
    members.unlink()


def _ram_like(rng: np.random.Generator, pages: int, zero_share: float) -> np.ndarray:
    data = rng.integers(0, 2**64, size=(pages, 512), dtype=np.uint64)
    data[rng.random(pages) < zero_share] = 0
    return data


@pytest.fixture(scope="session")
def ram_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, mmap.mmap, mmap.mmap]]:
    """Two 256 MiB guest-RAM-like files in tmpfs (page cache, so disk speed is not measured):
    a golden with 30% zero pages, and a child that differs in 10% of its pages. Yields the paths
    and read-only maps of both, which every peer reads."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else None
    directory = (
        Path(tmp_path_factory.mktemp("ram", numbered=True))
        if base is None
        else base / f"sm-bench-{os.getpid()}"
    )
    directory.mkdir(exist_ok=True)
    rng = np.random.default_rng(7)
    pages = 256 * MiB // 4096
    golden = _ram_like(rng, pages, 0.3)
    child = golden.copy()
    changed = rng.random(pages) < 0.1
    child[changed] = rng.integers(0, 2**64, size=(int(changed.sum()), 512), dtype=np.uint64)
    paths = (directory / "golden.ram", directory / "child.ram")
    for path, arr in zip(paths, (golden, child), strict=True):
        path.write_bytes(arr.tobytes())
    files = [p.open("rb") for p in paths]
    maps = [mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) for f in files]
    for m in maps:  # fault the pages in once, outside the timed rounds
        np.frombuffer(m, dtype=np.uint64).sum()
    yield paths[0], paths[1], maps[0], maps[1]
    for m in maps:
        m.close()
    for f in files:
        f.close()
    for p in paths:
        p.unlink()
    if base is not None:
        directory.rmdir()


def throughput(benchmark: object, nbytes: int) -> None:
    """Adds the median throughput to the benchmark's extra_info, in MB/s."""
    stats = benchmark.stats.stats  # type: ignore[attr-defined]
    benchmark.extra_info["MB/s"] = round(nbytes / stats.median / 1e6)  # type: ignore[attr-defined]


@contextlib.contextmanager
def worker_runtime(worker: bool) -> Iterator[Any]:
    """The worker options of a worker-backed VM, with a runtime directory of its own that is
    removed on leaving; ``None`` (an in-process VM) when ``worker`` is false."""
    if not worker:
        yield None
        return
    from supermachine.worker import worker_options

    runtime_dir = Path(tempfile.mkdtemp(prefix="sm-bench-vm-", dir="/tmp"))
    try:
        yield worker_options(runtime_dir, None)
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)


def wait_until_gone(pid: int | None, timeout: float = 30) -> None:
    """Returns once process ``pid`` (a VM's worker; ``None``: an in-process VMM) is gone. A
    worker's ``stop`` returns once its VM is stopped and collects the process beside the caller,
    so a span that includes the teardown waits for this too, as it waits for QEMU to exit."""
    if pid is None:
        return
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, f"worker {pid} did not exit"
        time.sleep(0.0001)
