"""How much of a set of OCI layers is redundant below the layer level.

Each layer blob (gzip, zstd or plain tar) is decompressed and its bytes are chunked twice:
content-defined (FastCDC) and fixed-size. A chunk is unique the first time its digest is seen
across all layers. The unique chunks' size after per-chunk zstd recompression says whether a chunk
store would beat simply storing the compressed layers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from supermachine import _core
from supermachine.cdc import DEFAULT_PARAMS, ChunkParams
from supermachine.errors import InputError
from supermachine.units import percent

FIXED_CHUNK_SIZE = 512 * 1024


@dataclass(frozen=True)
class LayerResult:
    path: str
    format: str
    compressed_bytes: int
    uncompressed_bytes: int
    cdc_chunks: int
    fixed_chunks: int


@dataclass(frozen=True)
class SchemeRow:
    """Totals of one chunking scheme over all layers."""

    name: str
    chunks: int
    bytes: int
    unique_chunks: int
    unique_bytes: int
    unique_zstd_bytes: int

    @property
    def avg_chunk_size(self) -> float:
        return self.bytes / self.chunks if self.chunks else 0.0

    @property
    def unique_share(self) -> float:
        """Unique bytes as a percentage of all uncompressed bytes."""
        return percent(self.unique_bytes, self.bytes)

    @property
    def redundancy(self) -> float:
        """Sub-layer redundancy: the percentage of uncompressed bytes a chunk store need not keep."""
        return 100.0 - self.unique_share if self.bytes else 0.0


@dataclass
class ChunkDedupReport:
    blob_dir: str
    params: ChunkParams
    fixed_size: int
    layers: list[LayerResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """One-line reasons for layers that could not be read (corrupt, truncated, unreadable)."""
    non_layer_blobs: int = 0
    """Blobs that are not layers at all (image configs, manifests)."""
    schemes: list[SchemeRow] = field(default_factory=list)

    @property
    def compressed_bytes(self) -> int:
        return sum(layer.compressed_bytes for layer in self.layers)

    @property
    def uncompressed_bytes(self) -> int:
        return sum(layer.uncompressed_bytes for layer in self.layers)

    def to_json(self) -> dict[str, object]:
        return {
            "blob_dir": self.blob_dir,
            "params": asdict(self.params),
            "fixed_size": self.fixed_size,
            "layers_processed": len(self.layers),
            "layers_skipped": self.skipped,
            "non_layer_blobs": self.non_layer_blobs,
            "compressed_bytes": self.compressed_bytes,
            "uncompressed_bytes": self.uncompressed_bytes,
            "layers": [asdict(layer) for layer in self.layers],
            "schemes": [
                {
                    **asdict(s),
                    "avg_chunk_size": s.avg_chunk_size,
                    "unique_share_pct": s.unique_share,
                    "redundancy_pct": s.redundancy,
                }
                for s in self.schemes
            ],
        }


def find_blobs(blob_dir: Path) -> list[Path]:
    """Every regular file below ``blob_dir``, in a stable order. Hidden files (in-progress
    downloads, lock files) are left out."""
    if not blob_dir.exists():
        raise InputError(f"blob directory {blob_dir} does not exist")
    if not blob_dir.is_dir():
        raise InputError(f"{blob_dir} is not a directory")
    found: list[Path] = []
    for root, dirs, files in os.walk(blob_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root, name)
            if not name.startswith(".") and path.is_file() and not path.is_symlink():
                found.append(path)
    return found


def total_size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def scan(
    blob_dir: Path,
    params: ChunkParams = DEFAULT_PARAMS,
    *,
    fixed_size: int = FIXED_CHUNK_SIZE,
    zstd_level: int = 3,
    threads: int | None = None,
    progress: Callable[[int], object] | None = None,
    blobs: list[Path] | None = None,
) -> ChunkDedupReport:
    """Scans every blob under ``blob_dir`` (or the given ``blobs``) and returns the report.
    ``progress(n)`` receives increments of compressed bytes read."""
    paths = find_blobs(blob_dir) if blobs is None else blobs
    index = _core.LayerDedup(fixed_size=fixed_size, zstd_level=zstd_level, **params.as_kwargs())
    report = ChunkDedupReport(blob_dir=str(blob_dir), params=params, fixed_size=fixed_size)
    for result in index.add_layers(paths, progress=progress, threads=threads):
        if "error" in result:
            if result["not_a_layer"]:
                report.non_layer_blobs += 1
            else:
                report.skipped.append(str(result["error"]))
            continue
        report.layers.append(
            LayerResult(
                path=str(result["path"]),
                format=str(result["format"]),
                compressed_bytes=_int(result["compressed_bytes"]),
                uncompressed_bytes=_int(result["uncompressed_bytes"]),
                cdc_chunks=_int(result["cdc_chunks"]),
                fixed_chunks=_int(result["fixed_chunks"]),
            )
        )
    cdc_name = f"FastCDC {_kib(params.min_size)}/{_kib(params.avg_size)}/{_kib(params.max_size)} KiB"
    report.schemes = [
        SchemeRow(name=cdc_name, **index.cdc_stats()),
        SchemeRow(name=f"fixed {_kib(fixed_size)} KiB", **index.fixed_stats()),
    ]
    return report


def _int(value: object) -> int:
    assert isinstance(value, int)
    return value


def _kib(n: int) -> str:
    return f"{n // 1024}" if n % 1024 == 0 else f"{n / 1024:.2f}"
