"""Type stubs for the Rust extension module (rust/src/py)."""

import os
from collections.abc import Callable, Sequence
from typing import TypedDict

from typing_extensions import Buffer

_Input = Buffer | str | os.PathLike[str]

__version__: str
PAGE_SIZE: int
CDC_GEAR_SEED: int

def cdc_lengths(
    data: _Input, *, min_size: int = ..., avg_size: int = ..., max_size: int = ..., normalization: int = ...
) -> list[int]: ...
def cdc_lengths_many(
    inputs: Sequence[_Input],
    *,
    min_size: int = ...,
    avg_size: int = ...,
    max_size: int = ...,
    normalization: int = ...,
    threads: int | None = None,
) -> list[list[int]]: ...
def cdc_chunks(
    data: _Input, *, min_size: int = ..., avg_size: int = ..., max_size: int = ..., normalization: int = ...
) -> list[tuple[int, int, bytes]]: ...
def cdc_gear_table() -> list[int]: ...
def cdc_masks(
    *, min_size: int = ..., avg_size: int = ..., max_size: int = ..., normalization: int = ...
) -> tuple[int, int]: ...

class PageDigests:
    @property
    def algo(self) -> str: ...
    @property
    def digest_size(self) -> int: ...
    @property
    def page_count(self) -> int: ...
    @property
    def zero_pages(self) -> int: ...
    @property
    def byte_len(self) -> int: ...
    def __len__(self) -> int: ...
    def digest(self, index: int) -> bytes: ...
    def is_zero_page(self, index: int) -> bool: ...
    def compare(self, golden: PageDigests) -> tuple[int, int, int]: ...

def page_digests(data: _Input, *, algo: str = "xxh3", threads: int | None = None) -> PageDigests: ...
def unique_pages(inputs: Sequence[PageDigests]) -> tuple[int, int]: ...

class SchemeStats(TypedDict):
    chunks: int
    bytes: int
    unique_chunks: int
    unique_bytes: int
    unique_zstd_bytes: int

class LayerDedup:
    def __init__(
        self,
        *,
        min_size: int = ...,
        avg_size: int = ...,
        max_size: int = ...,
        normalization: int = ...,
        fixed_size: int = ...,
        zstd_level: int = ...,
    ) -> None: ...
    def add_layers(
        self,
        paths: Sequence[str | os.PathLike[str]],
        progress: Callable[[int], object] | None = None,
        threads: int | None = None,
    ) -> list[dict[str, object]]: ...
    def cdc_stats(self) -> SchemeStats: ...
    def fixed_stats(self) -> SchemeStats: ...
    @property
    def fixed_size(self) -> int: ...
