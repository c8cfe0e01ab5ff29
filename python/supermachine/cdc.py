"""Content-defined chunking (FastCDC-style normalized chunking), computed by the Rust core.

A chunk may end after a byte when the hash of the 32 bytes ending there has its top bits zero:
the digest ``sum((b ^ CDC_BYTE_KEY) << k)`` of the window's bytes (``k`` counts back from the last
byte), times ``CDC_MULTIPLIER``, modulo 2**32; :func:`masks` gives the bits tested below and above
``avg_size``. Every position's hash depends on its window alone, so the core scans for them in SIMD
lanes (AVX-512 or AVX2, chosen at run time).

Inputs are any bytes-like object (bytes, bytearray, memoryview, mmap, NumPy array), read in place
without copying, or a path, which is streamed in bounded memory whatever its size. The GIL is
released while chunking, and :func:`chunk_many` chunks many inputs in parallel.

Do not mutate a buffer while it is being chunked.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import TypedDict

from typing_extensions import Buffer

from supermachine import _core

Input = Buffer | str | os.PathLike[str]


class ChunkKwargs(TypedDict):
    min_size: int
    avg_size: int
    max_size: int
    normalization: int


@dataclass(frozen=True)
class ChunkParams:
    """Chunk size bounds. Every chunk but the last is longer than ``min_size`` and at most
    ``max_size``; sizes cluster around ``avg_size``. ``normalization`` (0-3) narrows the spread."""

    min_size: int = 2 * 1024
    avg_size: int = 16 * 1024
    max_size: int = 64 * 1024
    normalization: int = 1

    def as_kwargs(self) -> ChunkKwargs:
        return {
            "min_size": self.min_size,
            "avg_size": self.avg_size,
            "max_size": self.max_size,
            "normalization": self.normalization,
        }


DEFAULT_PARAMS = ChunkParams()


@dataclass(frozen=True)
class Chunk:
    offset: int
    length: int
    digest: bytes
    """128-bit XXH3 of the chunk's bytes, big-endian."""


def lengths(data: Input, params: ChunkParams = DEFAULT_PARAMS) -> list[int]:
    """The chunk lengths of ``data``, in order."""
    return _core.cdc_lengths(data, **params.as_kwargs())


def boundaries(data: Input, params: ChunkParams = DEFAULT_PARAMS) -> list[int]:
    """The end offset of every chunk of ``data`` (the last equals the input length)."""
    return list(accumulate(lengths(data, params)))


def chunks(data: Input, params: ChunkParams = DEFAULT_PARAMS) -> list[Chunk]:
    """The chunks of ``data`` with offsets and digests."""
    return [Chunk(o, n, d) for o, n, d in _core.cdc_chunks(data, **params.as_kwargs())]


def chunk_many(
    inputs: Sequence[Input], params: ChunkParams = DEFAULT_PARAMS, *, threads: int | None = None
) -> list[list[int]]:
    """Chunk lengths of each input, computed in parallel (``threads=None``: one per core)."""
    return _core.cdc_lengths_many(inputs, threads=threads, **params.as_kwargs())


def masks(params: ChunkParams = DEFAULT_PARAMS) -> tuple[int, int]:
    """The (strict, loose) masks of the 32-bit hash, used below and above ``avg_size``: a chunk
    may end where the hash ANDed with the mask is zero."""
    return _core.cdc_masks(**params.as_kwargs())
