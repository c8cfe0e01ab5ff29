"""metadata.json: round trip, atomic save, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import blake3
import pytest
from snapstore_support import base_meta, write_snapshot
from supermachine.errors import SnapshotMetadataError
from supermachine.snapshots import metadata


def test_round_trip_keeps_sub_second_created(tmp_path: Path) -> None:
    d = write_snapshot(tmp_path, "s1", b"x" * 8192, created=1_700_000_000.123456)
    meta = metadata.load(d)
    assert meta.created == 1_700_000_000.123456
    assert meta.ram_size == 8192
    assert meta.ram_blake3 == "blake3:" + blake3.blake3(b"x" * 8192).hexdigest()
    assert meta.base is None and meta.base_blake3 is None


def test_save_refuses_invalid_metadata(tmp_path: Path) -> None:
    with pytest.raises(SnapshotMetadataError, match="must be set together"):
        metadata.save(tmp_path, base_meta(ram_size=1, base="s0"))
    assert list(tmp_path.iterdir()) == []


def test_round_trip_with_base(tmp_path: Path) -> None:
    d = tmp_path / "s"
    d.mkdir()
    meta = base_meta(ram_size=4096, base="golden", base_blake3="blake3:" + "cd" * 32)
    metadata.save(d, meta)
    assert metadata.load(d) == meta
    assert [p.name for p in d.iterdir()] == ["metadata.json"]  # no temp file left behind


def test_blake3_file_matches_reference(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40_000
    (tmp_path / "f").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    assert metadata.blake3_file(tmp_path / "f") == "blake3:" + blake3.blake3(data).hexdigest()
    assert metadata.blake3_file(tmp_path / "empty") == "blake3:" + blake3.blake3(b"").hexdigest()


def _write_json(tmp_path: Path, data: object) -> Path:
    (tmp_path / "metadata.json").write_text(json.dumps(data))
    return tmp_path


def _good() -> dict[str, object]:
    return base_meta(ram_size=4096, ram_blake3="blake3:" + "ef" * 32).to_json()


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (lambda d: d.update(version=7), "unsupported metadata version 7"),
        (lambda d: d.pop("format"), "not supermachine snapshot metadata"),
        (lambda d: d.pop("memory_mib"), "field 'memory_mib' is missing"),
        (lambda d: d.update(memory_mib="64"), "field 'memory_mib' must be an integer"),
        (lambda d: d.update(vcpus=0), "field 'vcpus' must be between 1 and 32"),
        (lambda d: d["ram"].pop("blake3"), "field 'ram.blake3' is missing"),
        (lambda d: d["ram"].update(blake3="md5:00"), "field 'ram.blake3' must be 'blake3:'"),
        (lambda d: d.update(created="yesterday"), "field 'created' must be a finite number"),
        (lambda d: d.update(image=[]), "field 'image' must be an object"),
        (lambda d: d.update(base="golden"), "'base' and 'base_blake3' must be set together"),
    ],
)
def test_malformed_metadata_is_one_line(tmp_path: Path, mutate, expect: str) -> None:  # type: ignore[no-untyped-def]
    data = _good()
    mutate(data)
    with pytest.raises(SnapshotMetadataError) as err:
        metadata.load(_write_json(tmp_path, data))
    assert expect in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        (None, "missing"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
    ],
)
def test_missing_or_garbage_metadata_is_one_line(tmp_path: Path, content: bytes | None, expect: str) -> None:
    if content is not None:
        (tmp_path / "metadata.json").write_bytes(content)
    with pytest.raises(SnapshotMetadataError) as err:
        metadata.load(tmp_path)
    assert expect in str(err.value)
    assert str(tmp_path / "metadata.json") in str(err.value)
    assert "\n" not in str(err.value)


def test_save_replaces_atomically(tmp_path: Path) -> None:
    metadata.save(tmp_path, base_meta(ram_size=1, vcpus=1))
    metadata.save(tmp_path, base_meta(ram_size=2, vcpus=4))
    assert metadata.load(tmp_path).vcpus == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.json"]


def test_describe_hashes_ram_and_takes_base_hash(tmp_path: Path) -> None:
    base = write_snapshot(tmp_path, "base", b"b" * 8192)
    diff = tmp_path / "diff"
    diff.mkdir()
    (diff / "memory.bin").write_bytes(b"d" * 4096)
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"kernel")
    tmpl = base_meta()
    meta = metadata.describe(
        diff,
        image=tmpl.image,
        memory_mib=64,
        vcpus=2,
        kernel=metadata.FileIdentity.of(kernel),
        agent=tmpl.agent,
        base="base",
    )
    assert meta.ram_size == 4096 and meta.ram_blake3 == metadata.blake3_file(diff / "memory.bin")
    assert meta.base_blake3 == metadata.load(base).ram_blake3
    assert meta.kernel.sha256.startswith("sha256:") and len(meta.kernel.sha256) == 71
    metadata.save(diff, meta)
    assert metadata.load(diff) == meta
