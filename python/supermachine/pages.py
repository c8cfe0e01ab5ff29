"""Page hashing of guest-RAM images: per-4-KiB-page digests, zero pages, same-offset comparison with
a golden image, and unique pages across many images. Computed in parallel by the Rust core; a path
is memory-mapped, so multi-GiB RAM files are never copied."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from typing_extensions import Buffer

from supermachine import _core

PAGE_SIZE: int = _core.PAGE_SIZE
PageDigests = _core.PageDigests
HashAlgo = Literal["xxh3", "blake3"]
Input = Buffer | str | os.PathLike[str]


def digest_pages(data: Input, algo: HashAlgo = "xxh3", *, threads: int | None = None) -> PageDigests:
    """Digests of every page of ``data``. ``xxh3`` is fast and fine for statistics; ``blake3`` is
    cryptographic, for decisions where a collision would corrupt data."""
    return _core.page_digests(data, algo=algo, threads=threads)


@dataclass(frozen=True)
class Comparison:
    pages: int
    same: int
    """Pages equal to the golden's page at the same offset: shareable copy-on-write."""
    differ: int
    """Pages a diff snapshot against the golden must store."""


def compare(image: PageDigests, golden: PageDigests) -> Comparison:
    pages, same, differ = image.compare(golden)
    return Comparison(pages, same, differ)


def unique_pages(images: Sequence[PageDigests]) -> tuple[int, int]:
    """``(pages, unique)``: total pages over all images, and how many distinct contents they hold."""
    return _core.unique_pages(images)
