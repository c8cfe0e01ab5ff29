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
    d = tmp_path / "s"
    d.mkdir()
    meta = base_meta(created=1_700_000_000.123456)
    metadata.save(d, meta)
    assert metadata.load(d) == meta
    assert metadata.load(d).created == 1_700_000_000.123456
    assert [p.name for p in d.iterdir()] == ["metadata.json"]  # no temp file left behind


def test_the_metadata_records_nothing_the_vmm_owns(tmp_path: Path) -> None:
    # The RAM identity, the base and its identity are in vmstate.bin only.
    d = write_snapshot(tmp_path, "s1", b"x" * 8192)
    data = json.loads((d / "metadata.json").read_text())
    assert not {"ram", "base", "base_blake3"} & set(data)
    assert data["version"] == metadata.VERSION == 2


def test_save_refuses_invalid_metadata(tmp_path: Path) -> None:
    with pytest.raises(SnapshotMetadataError, match="field 'vcpus' must be between"):
        metadata.save(tmp_path, base_meta(vcpus=0))
    assert list(tmp_path.iterdir()) == []


def test_metadata_of_an_older_version_must_be_baked_again(tmp_path: Path) -> None:
    # What version 1 wrote: the RAM's blake3, the base and its blake3 beside the VM state's record.
    old = {
        **base_meta().to_json(),
        "version": 1,
        "ram": {"size": 4096, "blake3": "blake3:" + "ef" * 32},
        "base": None,
        "base_blake3": None,
    }
    with pytest.raises(SnapshotMetadataError) as err:
        metadata.load(_write_json(tmp_path, old))
    assert str(err.value) == (
        f"{tmp_path / 'metadata.json'}: unsupported metadata version 1 (this supermachine reads 2);"
        " the snapshot must be baked again"
    )


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
    return base_meta().to_json()


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (lambda d: d.update(version=7), "unsupported metadata version 7"),
        (lambda d: d.pop("format"), "not supermachine snapshot metadata"),
        (lambda d: d.pop("memory_mib"), "field 'memory_mib' is missing"),
        (lambda d: d.update(memory_mib="64"), "field 'memory_mib' must be an integer"),
        (lambda d: d.update(vcpus=0), "field 'vcpus' must be between 1 and 32"),
        (lambda d: d["kernel"].pop("sha256"), "field 'kernel.sha256' is missing"),
        (lambda d: d["agent"].update(sha256="md5:00"), "field 'agent.sha256' must be 'sha256:'"),
        (lambda d: d.update(created="yesterday"), "field 'created' must be a finite number"),
        (lambda d: d.update(image=[]), "field 'image' must be an object"),
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
    metadata.save(tmp_path, base_meta(vcpus=1))
    metadata.save(tmp_path, base_meta(vcpus=4))
    assert metadata.load(tmp_path).vcpus == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.json"]
