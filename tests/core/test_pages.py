"""Page hashing on constructed images with known answers, checked against independent hashes."""

from __future__ import annotations

import mmap
import random
from pathlib import Path

import blake3
import pytest
import xxhash
from supermachine import pages

P = pages.PAGE_SIZE


def page(fill: int) -> bytes:
    return bytes([fill]) * P


def noise(seed: int) -> bytes:
    return random.Random(seed).randbytes(P)


def test_page_size_is_4k() -> None:
    assert P == 4096


@pytest.mark.parametrize("algo", ["xxh3", "blake3"])
def test_digests_match_independent_implementations(algo: pages.HashAlgo) -> None:
    data = b"".join([noise(1), page(0), noise(2), b"tail"])
    d = pages.digest_pages(data, algo)
    assert d.page_count == len(d) == 4
    assert d.digest_size == (8 if algo == "xxh3" else 32)
    for i in range(4):
        chunk = data[i * P : (i + 1) * P]
        want = (
            xxhash.xxh3_64(chunk).intdigest().to_bytes(8, "little")
            if algo == "xxh3"
            else blake3.blake3(chunk).digest()
        )
        assert d.digest(i) == want, i
    with pytest.raises(IndexError):
        d.digest(4)


def test_known_answers_zero_differ_shared_unique(tmp_path: Path) -> None:
    golden_pages = [noise(1), page(0), noise(2), page(0), noise(3)]
    other_pages = [noise(1), page(0), noise(9), noise(9), noise(3), page(0), noise(4)]
    golden = pages.digest_pages(b"".join(golden_pages))
    other = pages.digest_pages(b"".join(other_pages))
    assert golden.zero_pages == 2 and other.zero_pages == 2
    assert [other.is_zero_page(i) for i in range(7)] == [False, True, False, False, False, True, False]
    assert pages.compare(other, golden) == pages.Comparison(pages=7, same=3, differ=4)
    assert pages.compare(golden, golden) == pages.Comparison(pages=5, same=5, differ=0)
    # distinct contents: noise 1, 2, 3, 4, 9 and the zero page
    assert pages.unique_pages([golden, other]) == (12, 6)


def test_many_pages_cross_worker_boundaries() -> None:
    rng = random.Random(7)
    layout = [rng.choice([0, 1, 2]) for _ in range(1000)]
    data = b"".join(page(0) if k == 0 else page(k) if k == 1 else noise(i) for i, k in enumerate(layout))
    d = pages.digest_pages(data, threads=2)
    assert d.zero_pages == layout.count(0)
    assert all(d.is_zero_page(i) == (k == 0) for i, k in enumerate(layout))
    total, unique = pages.unique_pages([d])
    assert total == 1000
    assert unique == (0 in layout) + (1 in layout) + layout.count(2)


def test_path_mmap_and_buffer_inputs_agree(tmp_path: Path) -> None:
    data = b"".join(noise(i) if i % 3 else page(0) for i in range(300))
    path = tmp_path / "ram"
    path.write_bytes(data)
    by_buffer = pages.digest_pages(data)
    by_path = pages.digest_pages(path)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        by_mmap = pages.digest_pages(mm)
    for d in (by_path, by_mmap):
        assert pages.compare(d, by_buffer) == pages.Comparison(300, 300, 0)
        assert d.zero_pages == by_buffer.zero_pages == 100


def test_empty_input(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    d = pages.digest_pages(empty)
    assert (d.page_count, d.zero_pages, d.byte_len) == (0, 0, 0)
    assert pages.unique_pages([d]) == (0, 0)
    assert pages.unique_pages([]) == (0, 0)


def test_mixing_algorithms_and_bad_names_are_refused() -> None:
    a = pages.digest_pages(page(1), "xxh3")
    b = pages.digest_pages(page(1), "blake3")
    with pytest.raises(ValueError, match="cannot compare blake3 page digests with xxh3"):
        b.compare(a)
    with pytest.raises(ValueError, match="cannot compare"):
        pages.unique_pages([a, b])
    with pytest.raises(ValueError, match='unknown page hash "md5"'):
        pages.digest_pages(page(1), "md5")  # type: ignore[arg-type]


def test_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="cannot open"):
        pages.digest_pages(tmp_path / "nope")
