"""The content-defined chunker: invariants, and agreement with an independent slow reference."""

from __future__ import annotations

import array
import math
import mmap
import os
import random
from pathlib import Path

import pytest
from supermachine import _core, cdc

MASK32 = (1 << 32) - 1
WINDOW, MULTIPLIER, BYTE_KEY = _core.CDC_WINDOW, _core.CDC_MULTIPLIER, _core.CDC_BYTE_KEY


def top_mask(bits: int) -> int:
    """The documented mask rule: the top ``bits`` bits of the 32-bit hash."""
    return (MASK32 << (32 - bits)) & MASK32


def window_hash(data: bytes, index: int) -> int:
    """The hash of the 32 bytes ending at ``data[index]``, straight from its definition."""
    digest = sum((data[index - k] ^ BYTE_KEY) << k for k in range(WINDOW)) & MASK32
    return (digest * MULTIPLIER) & MASK32


def reference_lengths(data: bytes, p: cdc.ChunkParams) -> list[int]:
    """Normalized chunking on the window hash, one byte at a time, as the algorithm is specified."""
    bits = round(math.log2(p.avg_size))
    mask_small, mask_large = top_mask(bits + p.normalization), top_mask(bits - p.normalization)
    out, start = [], 0
    while start < len(data):
        remaining = len(data) - start
        cut = min(remaining, p.max_size)
        if remaining > p.min_size:
            digest = 0
            for i in range(p.min_size - WINDOW, cut):
                digest = ((digest << 1) + (data[start + i] ^ BYTE_KEY)) & MASK32
                h = (digest * MULTIPLIER) & MASK32
                if i >= p.min_size and h & (mask_small if i < p.avg_size else mask_large) == 0:
                    cut = i + 1
                    break
        out.append(cut)
        start += cut
    return out


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


SMALL = cdc.ChunkParams(min_size=256, avg_size=1024, max_size=4096)


def test_the_rolling_digest_is_the_window_hash() -> None:
    """The reference rolls its digest; the definition sums the window. They agree once 32 bytes
    are in, and the first cut of a chunk is where the defined hash first passes."""
    data = random_bytes(5000, seed=1)
    params = cdc.ChunkParams(min_size=64, avg_size=128, max_size=4096, normalization=0)
    first = cdc.lengths(data, params)[0]
    mask = top_mask(7)
    passing = [i for i in range(64, 4096) if window_hash(data, i) & mask == 0]
    assert first == passing[0] + 1


def test_every_scan_kernel_cuts_the_same_through_the_binding(tmp_path: Path) -> None:
    """The fastest kernel the CPU has is the default; every one gives the same cuts, for buffers
    and for streamed paths."""
    data = random_bytes(3_000_000, seed=9)
    path = tmp_path / "data"
    path.write_bytes(data)
    kernels = _core.cdc_kernels()
    assert kernels[-1] == "portable"
    want = cdc.lengths(data)
    assert len(want) > 100
    for kernel in kernels:
        assert _core.cdc_lengths(data, kernel=kernel) == want, kernel
        assert _core.cdc_lengths(path, kernel=kernel) == want, kernel
    unknown = r"^no chunking kernel is called 'sse9' \(avx512, avx2 or portable\)$"
    with pytest.raises(ValueError, match=unknown):
        _core.cdc_lengths(data, kernel="sse9")


def test_masks_follow_the_documented_rule() -> None:
    assert cdc.masks() == (top_mask(15), top_mask(13))
    assert cdc.masks(SMALL) == (top_mask(11), top_mask(9))


def test_runs_of_one_byte_are_cut_at_max_size() -> None:
    """Zero pages, padding and blank space are never cut points (the byte key sees to it)."""
    for byte in (0x00, 0xFF, 0x20):
        assert cdc.lengths(bytes([byte]) * 150_000) == [65536, 65536, 18928]


@pytest.mark.parametrize(
    ("params", "size"),
    [(SMALL, 200_000), (cdc.DEFAULT_PARAMS, 600_000), (cdc.ChunkParams(1000, 3000, 9000, 2), 200_000)],
)
def test_cut_points_agree_with_independent_reference(params: cdc.ChunkParams, size: int) -> None:
    data = random_bytes(size, seed=size)
    got = cdc.lengths(data, params)
    assert got == reference_lengths(data, params)
    assert len(got) > 10


def test_bounds_and_coverage() -> None:
    data = random_bytes(8 << 20, seed=1)
    lengths = cdc.lengths(data)
    assert sum(lengths) == len(data)
    assert all(2048 < n <= 65536 for n in lengths[:-1])
    assert 0 < lengths[-1] <= 65536
    assert 12_000 < len(data) / len(lengths) < 24_000  # clusters around the 16 KiB average


def test_deterministic_across_buffer_kinds(tmp_path: Path) -> None:
    data = random_bytes(3 << 20, seed=2)
    want = cdc.lengths(data)
    path = tmp_path / "blob"
    path.write_bytes(data)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        assert cdc.lengths(mm) == want
    assert cdc.lengths(bytearray(data)) == want
    assert cdc.lengths(memoryview(data)) == want
    assert cdc.lengths(array.array("Q", data[: len(data) // 8 * 8])) == cdc.lengths(
        data[: len(data) // 8 * 8]
    )
    assert cdc.lengths(data) == want


def test_whole_and_streamed_give_identical_cut_points(tmp_path: Path) -> None:
    # Larger than the 4 MiB stream buffer, so the streamed path refills many times.
    data = random_bytes(11 << 20, seed=3)
    path = tmp_path / "big"
    path.write_bytes(data)
    assert cdc.lengths(path) == cdc.lengths(data)
    assert cdc.lengths(str(path), SMALL) == cdc.lengths(data, SMALL)


def test_insertion_near_start_changes_only_nearby_chunks() -> None:
    data = random_bytes(4 << 20, seed=4)
    edited = data[:1000] + b"inserted!!" + data[1000:]
    before = cdc.boundaries(data)
    after = cdc.boundaries(edited)
    shifted = {b + 10 for b in before}
    changed = [b for b in after if b not in shifted]
    assert len(changed) <= 2, changed
    assert len(set(after) & shifted) >= len(before) - 2


def test_empty_and_tiny_inputs() -> None:
    assert cdc.lengths(b"") == []
    assert cdc.lengths(b"x") == [1]
    assert cdc.lengths(b"y" * 2048) == [2048]
    assert cdc.lengths(b"\0" * 200_000) == [65536, 65536, 65536, 3392]


def test_chunks_carry_offsets_and_content_digests() -> None:
    block = random_bytes(200_000, seed=5)
    data = block + random_bytes(50_000, seed=6) + block
    chunks = cdc.chunks(data)
    assert [c.offset for c in chunks] == [0, *cdc.boundaries(data)[:-1]]
    by_digest: dict[bytes, bytes] = {}
    for c in chunks:
        content = data[c.offset : c.offset + c.length]
        assert by_digest.setdefault(c.digest, content) == content
    assert len(by_digest) < len(chunks)  # the repeated block yields repeated chunks


def test_chunk_many_matches_single_calls_for_any_thread_count(tmp_path: Path) -> None:
    inputs: list[cdc.Input] = [random_bytes(1 << 20, seed=s) for s in range(5)]
    path = tmp_path / "f"
    path.write_bytes(random_bytes(2 << 20, seed=9))
    inputs.append(path)
    want = [cdc.lengths(i) for i in inputs]
    assert cdc.chunk_many(inputs, threads=1) == want
    assert cdc.chunk_many(inputs, threads=2) == want
    assert cdc.chunk_many(inputs) == want


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_size": 16, "avg_size": 256, "max_size": 1024}, "min_size must be at least 64"),
        ({"min_size": 4096, "avg_size": 2048, "max_size": 65536}, "min_size < avg_size < max_size"),
        ({"max_size": 1 << 30}, "max_size must be at most"),
        ({"normalization": 7}, "normalization level must be 0 to 3"),
    ],
)
def test_bad_parameters_are_refused(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _core.cdc_lengths(b"abc", **kwargs)


def test_bad_inputs_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="expected a path or a bytes-like object, got int"):
        _core.cdc_lengths(42)  # type: ignore[arg-type]
    with pytest.raises(OSError, match=r"cannot open .*missing"):
        cdc.lengths(tmp_path / "missing")
    with pytest.raises(ValueError, match="C-contiguous"):
        cdc.lengths(memoryview(b"abcdef")[::2])
    with pytest.raises(ValueError, match="threads must be at least 1"):
        cdc.chunk_many([b"x"], threads=0)


def test_directory_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        cdc.lengths(tmp_path)


def test_file_is_read_not_modified(tmp_path: Path) -> None:
    path = tmp_path / "ro"
    data = os.urandom(100_000)
    path.write_bytes(data)
    path.chmod(0o444)
    cdc.lengths(path)
    assert path.read_bytes() == data
