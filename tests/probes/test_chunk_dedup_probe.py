"""`supermachine probe chunk-dedup` on layer blobs made by the real tar, gzip and zstd tools."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from supermachine import cdc

RunCli = Callable[..., subprocess.CompletedProcess[str]]


FIXED = 512 * 1024


def make_tree(root: Path, seed: int, extra: bytes = b"") -> None:
    rng = random.Random(seed)
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "bin" / "tool").write_bytes(rng.randbytes(900_000))
    (root / "bin" / "other").write_bytes(rng.randbytes(300_000))
    (root / "etc" / "numbers").write_text("\n".join(str(i) for i in range(60_000)))
    (root / "etc" / "note").write_bytes(b"version 1\n" + extra)


def tar(src: Path, out: Path) -> bytes:
    # Fixed metadata so the same tree always gives the same tar bytes.
    subprocess.run(
        [
            "tar",
            "--sort=name",
            "--mtime=@0",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-cf",
            str(out),
            "-C",
            str(src),
            ".",
        ],
        check=True,
    )
    return out.read_bytes()


def store_blob(blob_dir: Path, data: bytes) -> Path:
    path = blob_dir / "sha256" / hashlib.sha256(data).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def layer_cache(tmp_path: Path) -> dict[str, object]:
    """A content-addressed blob dir holding: layer A (gzip), layer A' = A with one file changed
    (zstd), layer A again as plain tar, an image config, and a truncated gzip layer."""
    for tool in ("tar", "gzip", "zstd"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed; run scripts/setup.sh")
    a, a2 = tmp_path / "a", tmp_path / "a2"
    make_tree(a, seed=1)
    make_tree(a2, seed=1, extra=b"changed\n")
    tar_a = tar(a, tmp_path / "a.tar")
    tar_a2 = tar(a2, tmp_path / "a2.tar")
    subprocess.run(["gzip", "-k", "-6", str(tmp_path / "a.tar")], check=True)
    subprocess.run(["zstd", "-q", "-3", str(tmp_path / "a2.tar")], check=True)
    gz = (tmp_path / "a.tar.gz").read_bytes()
    zst = (tmp_path / "a2.tar.zst").read_bytes()
    blobs = tmp_path / "blobs"
    store_blob(blobs, gz)
    store_blob(blobs, zst)
    store_blob(blobs, tar_a)
    store_blob(blobs, json.dumps({"architecture": "amd64", "os": "linux"}).encode())
    broken = store_blob(blobs, gz[: len(gz) // 2])
    return {
        "dir": blobs,
        "tars": [tar_a, tar_a2, tar_a],
        "compressed": len(gz) + len(zst) + len(tar_a),
        "broken": broken,
    }


def expected_cdc(tars: list[bytes]) -> tuple[int, int, int]:
    """(chunks, unique chunks, unique bytes), from the Python chunk API and a Python set."""
    seen: dict[bytes, int] = {}
    chunks = 0
    for data in tars:
        for c in cdc.chunks(data):
            chunks += 1
            seen.setdefault(c.digest, c.length)
    return chunks, len(seen), sum(seen.values())


def expected_fixed(tars: list[bytes]) -> tuple[int, int, int, int]:
    """(chunks, unique chunks, unique bytes, unique zstd bytes) of fixed 512 KiB chunking, in Python."""
    seen: dict[bytes, bytes] = {}
    chunks = 0
    for data in tars:
        for off in range(0, len(data), FIXED):
            piece = data[off : off + FIXED]
            chunks += 1
            seen.setdefault(hashlib.sha256(piece).digest(), piece)
    zstd = zstandard.ZstdCompressor(level=3)
    zsize = sum(len(zstd.compress(p)) for p in seen.values())
    return chunks, len(seen), sum(len(p) for p in seen.values()), zsize


def test_json_report_matches_independent_computation(run_cli: RunCli, layer_cache: dict[str, object]) -> None:
    tars = layer_cache["tars"]
    assert isinstance(tars, list)
    proc = run_cli("probe", "chunk-dedup", str(layer_cache["dir"]), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["layers_processed"] == 3
    assert report["non_layer_blobs"] == 1
    assert report["compressed_bytes"] == layer_cache["compressed"]
    assert report["uncompressed_bytes"] == sum(len(t) for t in tars)
    assert sorted(layer["format"] for layer in report["layers"]) == ["gzip", "tar", "zstd"]

    # The truncated layer is named, skipped, and does not count.
    [skipped] = report["layers_skipped"]
    assert str(layer_cache["broken"]) in skipped and "gzip" in skipped
    assert f"skipped {layer_cache['broken']}" in proc.stderr

    cdc_row, fixed_row = report["schemes"]
    chunks, unique, unique_bytes = expected_cdc(tars)
    assert (cdc_row["chunks"], cdc_row["unique_chunks"], cdc_row["unique_bytes"]) == (
        chunks,
        unique,
        unique_bytes,
    )
    assert cdc_row["bytes"] == report["uncompressed_bytes"]
    # Three near-identical layers: content-defined chunking keeps little more than one copy.
    assert cdc_row["redundancy_pct"] > 60
    assert unique_bytes < len(tars[0]) * 1.1

    f_chunks, f_unique, f_bytes, f_zstd = expected_fixed(tars)
    assert (fixed_row["chunks"], fixed_row["unique_chunks"], fixed_row["unique_bytes"]) == (
        f_chunks,
        f_unique,
        f_bytes,
    )
    # zstd library versions may differ by a few bytes per frame between the two bindings.
    assert abs(fixed_row["unique_zstd_bytes"] - f_zstd) <= 0.01 * f_zstd
    # Fixed-size chunks see the changed file shift every later byte; CDC does not.
    assert cdc_row["unique_bytes"] < fixed_row["unique_bytes"]


def test_table_output(run_cli: RunCli, layer_cache: dict[str, object]) -> None:
    proc = run_cli("probe", "chunk-dedup", str(layer_cache["dir"]))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "layers processed" in out and "FastCDC 2/16/64 KiB" in out and "fixed 512 KiB" in out
    for header in ("chunks", "avg chunk", "unique bytes", "redundancy", "unique, zstd per chunk"):
        assert header in out


def test_default_blob_dir_is_the_package_cache(
    run_cli: RunCli, layer_cache: dict[str, object], tmp_path: Path
) -> None:
    cache = tmp_path / "othercache"
    shutil.copytree(str(layer_cache["dir"]), cache / "blobs")
    proc = run_cli("probe", "chunk-dedup", "--json", env={"SUPERMACHINE_CACHE_DIR": str(cache)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["layers_processed"] == 3


def test_missing_default_cache_says_what_to_do(run_cli: RunCli, tmp_path: Path) -> None:
    proc = run_cli("probe", "chunk-dedup", env={"SUPERMACHINE_CACHE_DIR": str(tmp_path / "fresh")})
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"error: no layer cache at {tmp_path / 'fresh' / 'blobs'} yet: pull an image first, or pass BLOB_DIR"
    )


def test_missing_and_empty_dirs_fail_with_one_line(run_cli: RunCli, tmp_path: Path) -> None:
    proc = run_cli("probe", "chunk-dedup", str(tmp_path / "nowhere"))
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: blob directory {tmp_path / 'nowhere'} does not exist"
    (tmp_path / "empty").mkdir()
    proc = run_cli("probe", "chunk-dedup", str(tmp_path / "empty"))
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: no readable layer blobs under {tmp_path / 'empty'}"


def test_bad_chunk_sizes_are_a_usage_error(run_cli: RunCli, layer_cache: dict[str, object]) -> None:
    proc = run_cli("probe", "chunk-dedup", str(layer_cache["dir"]), "--min-size", "20000")
    assert proc.returncode == 2
    assert "min_size < avg_size < max_size" in proc.stderr


def test_blobs_are_left_untouched(run_cli: RunCli, layer_cache: dict[str, object]) -> None:
    blob_dir = layer_cache["dir"]
    assert isinstance(blob_dir, Path)
    before = {p: p.read_bytes() for p in blob_dir.rglob("*") if p.is_file()}
    assert run_cli("probe", "chunk-dedup", str(blob_dir), "--json").returncode == 0
    assert {p: p.read_bytes() for p in blob_dir.rglob("*") if p.is_file()} == before
