"""Pull throughput and squashfs build time, each against a reference tool in the same run.

* pulling from a local ``docker-registry``: the whole ``supermachine pull`` command vs the whole
  ``skopeo copy docker://… oci:…`` command, interleaved round by round (see interleave.py), for
  three image sizes (start-up weighs most on the smallest). Each peer's span is one process from
  start to exit plus removing what it wrote: it pulls into a fresh directory (supermachine's cache,
  skopeo's OCI layout) that is deleted inside the span, so both pay for their start-up, their
  writes and their teardown alike;
* building the root filesystem: our builder (apply layers + ``mksquashfs``) vs plain ``mksquashfs``
  on the already-unpacked tree.

``benchmark.extra_info`` carries MB/s (compressed bytes for pulls, unpacked tree bytes for builds)
and, for pulls, supermachine's time over skopeo's per round (median and spread).
"""

from __future__ import annotations

import gzip
import io
import itertools
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "oci"))
from _support import LayoutWriter, Registry, missing_tools, skopeo_copy, start_registry
from interleave import interleave
from supermachine.oci import ImageStore, build_rootfs, build_squashfs, load_image, pull
from supermachine.oci.rootfs import mksquashfs

SIZES = {"small": (1, 2), "medium": (4, 16), "large": (4, 96)}
"""Images pulled: (layers, MiB per layer before compression). small is alpine-sized, large is near
a language runtime image."""
ROUNDS = 3
PULL_ROUNDS = 8  # every order of the two peers, four times
SUPERMACHINE = Path(sys.executable).with_name("supermachine")
"""The installed console script, next to this interpreter."""
_counter = itertools.count()


def _layer(seed: int, mib: int) -> bytes:
    """A gzip layer: half random bytes, half text-like data, in a few files (compresses ~2:1)."""
    rnd = os.urandom(mib << 19)
    words = b" ".join(b"word%d" % (i * 7919 % 5000) for i in range(200_000))
    text = (words * (1 + (mib << 19) // len(words)))[: mib << 19]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((f"l{seed}/random.bin", rnd), (f"l{seed}/text.txt", text)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), compresslevel=1, mtime=0)


@dataclass
class BenchImage:
    registry: Registry
    ref: str
    layers: int
    compressed_bytes: int


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    missing = missing_tools()
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")
    registry = start_registry(tmp_path_factory.mktemp("bench-pull") / "registry")
    yield registry
    registry.stop()


def _push(registry: Registry, root: Path, name: str) -> BenchImage:
    count, mib = SIZES[name]
    layout = LayoutWriter(root / f"layout-{name}")
    layers = [(_layer(i, mib), "gzip") for i in range(count)]
    layout.tag(layout.image(layers, config={"Cmd": ["/bin/true"]}), "bench")
    ref = f"{registry.host}/bench/{name}:v1"
    skopeo_copy(f"oci:{layout.path}:bench", f"docker://{ref}")
    return BenchImage(registry, ref, count, sum(len(b) for b, _ in layers))


@pytest.fixture(scope="module")
def bench_image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> BenchImage:
    """The medium image, which the squashfs benchmarks build from."""
    return _push(registry, tmp_path_factory.mktemp("bench-image"), "medium")


def _fresh(base: Path) -> Path:
    path = base / f"round-{next(_counter)}"
    path.mkdir(parents=True)
    return path


def _mb_per_s(nbytes: int, seconds: float) -> float:
    return round(nbytes / 1e6 / seconds, 1)


def _supermachine_pull(ref: str, base: Path) -> str:
    """``supermachine pull -q REF`` into a fresh cache, removed again; the image id it printed."""
    cache = _fresh(base)
    proc = subprocess.run(
        [str(SUPERMACHINE), "pull", "-q", ref],
        env={**os.environ, "SUPERMACHINE_CACHE_DIR": str(cache)},
        capture_output=True,
        text=True,
        check=True,
    )
    shutil.rmtree(cache)
    return proc.stdout.strip()


def _skopeo_copy(ref: str, base: Path) -> str:
    """``skopeo copy -q docker://REF oci:DIR`` into a fresh directory, removed again."""
    target = _fresh(base)
    skopeo_copy(f"docker://{ref}", f"oci:{target / 'oci'}:v1")
    shutil.rmtree(target)
    return "copied"


@pytest.mark.benchmark(group="pull: whole commands, interleaved")
@pytest.mark.parametrize("size", list(SIZES))
def test_pull_commands(
    benchmark: object,
    size: str,
    registry: Registry,
    bench_image: BenchImage,
    tmp_path: Path,
    installed_bytecode: None,
) -> None:
    if not SUPERMACHINE.is_file():
        pytest.skip(f"no installed supermachine console script at {SUPERMACHINE}")
    image = bench_image if size == "medium" else _push(registry, tmp_path / "source", size)
    work = tmp_path / "work"
    ref = image.ref
    peers = {
        "skopeo copy": lambda: _skopeo_copy(ref, work),
        "supermachine pull": lambda: _supermachine_pull(ref, work),
    }
    title = (
        f"pull {size}: {image.layers} layers, {image.compressed_bytes / 1e6:.1f} MB, from a loopback registry"
    )
    run = interleave(benchmark, title, peers, rounds=PULL_ROUNDS, nbytes=image.compressed_bytes)
    assert run.results["supermachine pull"], "supermachine pull printed no image id"
    assert list(work.iterdir()) == [], "a peer left files behind"


@pytest.fixture(scope="module")
def pulled(bench_image: BenchImage, tmp_path_factory: pytest.TempPathFactory) -> tuple[ImageStore, int]:
    store = ImageStore(tmp_path_factory.mktemp("bench-store"))
    image = pull(bench_image.ref, store=store)
    tree = build_rootfs(image, store.root / "reference-tree")
    size = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
    return store, size


def test_squashfs_supermachine(benchmark, bench_image: BenchImage, pulled: tuple[ImageStore, int]) -> None:  # type: ignore[no-untyped-def]
    store, size = pulled
    image = load_image(bench_image.ref, store)

    def build() -> Path:
        return build_squashfs(image, force=True, processors=1)

    out = benchmark.pedantic(build, rounds=ROUNDS)
    assert out.is_file()
    benchmark.extra_info["tree MB"] = round(size / 1e6, 1)
    benchmark.extra_info["MB/s"] = _mb_per_s(size, benchmark.stats.stats.median)


def test_squashfs_plain_mksquashfs(benchmark, pulled: tuple[ImageStore, int], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, size = pulled
    tree = store.root / "reference-tree"

    def setup() -> tuple[tuple[Path], dict[str, object]]:
        return (_fresh(tmp_path) / "plain.squashfs",), {}

    benchmark.pedantic(lambda out: mksquashfs(tree, out, processors=1), setup=setup, rounds=ROUNDS)
    benchmark.extra_info["tree MB"] = round(size / 1e6, 1)
    benchmark.extra_info["MB/s"] = _mb_per_s(size, benchmark.stats.stats.median)
