"""How much guest RAM several VM images share, page by page.

The first image is the golden. For each image: the share of zero pages, of pages that differ from
the golden's page at the same offset (what a diff snapshot against the golden stores), and of pages
equal to it (what copy-on-write mapping of the golden shares). Over all images: how many distinct
pages there are, i.e. what perfect content-based page sharing would keep.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from supermachine import pages
from supermachine.errors import InputError
from supermachine.units import percent


class PageShares:
    """One RAM image against the golden: its zero pages, and the pages equal to or differing
    from the golden's page at the same offset."""

    pages: int
    zero_pages: int
    same_as_golden: int
    differ_from_golden: int

    @property
    def zero_pct(self) -> float:
        return percent(self.zero_pages, self.pages)

    @property
    def differ_pct(self) -> float:
        return percent(self.differ_from_golden, self.pages)

    @property
    def shared_pct(self) -> float:
        return percent(self.same_as_golden, self.pages)

    def shares_json(self) -> dict[str, object]:
        return {
            "pages": self.pages,
            "zero_pages": self.zero_pages,
            "same_as_golden": self.same_as_golden,
            "differ_from_golden": self.differ_from_golden,
            "zero_pct": self.zero_pct,
            "differ_pct": self.differ_pct,
            "shared_pct": self.shared_pct,
        }


@dataclass(frozen=True)
class ImageRow(PageShares):
    path: str
    bytes: int
    pages: int
    zero_pages: int
    same_as_golden: int
    differ_from_golden: int


class UniquePages:
    """Over all inputs: how many pages there are and how many are distinct."""

    total_pages: int
    unique_pages: int

    @property
    def unique_pct(self) -> float:
        return percent(self.unique_pages, self.total_pages)

    @property
    def redundant_pct(self) -> float:
        return 100.0 - self.unique_pct if self.total_pages else 0.0

    def unique_json(self) -> dict[str, object]:
        return {
            "total_pages": self.total_pages,
            "unique_pages": self.unique_pages,
            "unique_pct": self.unique_pct,
            "redundant_pct": self.redundant_pct,
        }


@dataclass(frozen=True)
class OverlapReport(UniquePages):
    algo: str
    images: list[ImageRow]
    total_pages: int
    unique_pages: int

    @property
    def golden(self) -> str:
        return self.images[0].path

    def to_json(self) -> dict[str, object]:
        return {
            "algo": self.algo,
            "page_size": pages.PAGE_SIZE,
            "golden": self.golden,
            "images": [{"path": r.path, "bytes": r.bytes, **r.shares_json()} for r in self.images],
            **self.unique_json(),
        }


def _digest_file(path: Path, algo: pages.HashAlgo, threads: int | None) -> pages.PageDigests:
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if not path.is_file():
        raise InputError(f"{path} is not a regular file")
    try:
        return pages.digest_pages(path, algo, threads=threads)
    except OSError as exc:
        raise InputError(str(exc)) from None


def compare_images(
    paths: Sequence[Path],
    *,
    algo: pages.HashAlgo = "xxh3",
    threads: int | None = None,
    progress: Callable[[Path], object] | None = None,
) -> OverlapReport:
    """Hashes each image (the first is the golden) and compares them. ``progress(path)`` is
    called after each image."""
    if not paths:
        raise InputError("no images given: pass the golden image first, then the others")
    digests: list[pages.PageDigests] = []
    for path in paths:
        digests.append(_digest_file(path, algo, threads))
        if progress is not None:
            progress(path)
    golden = digests[0]
    rows = []
    for path, d in zip(paths, digests, strict=True):
        cmp = pages.compare(d, golden)
        rows.append(ImageRow(str(path), d.byte_len, d.page_count, d.zero_pages, cmp.same, cmp.differ))
    total, unique = pages.unique_pages(digests)
    return OverlapReport(algo=algo, images=rows, total_pages=total, unique_pages=unique)
