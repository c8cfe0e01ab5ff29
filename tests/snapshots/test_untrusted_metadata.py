"""metadata.json is untrusted input: whatever a snapshot directory holds, loading it gives one
:class:`SnapshotMetadataError` line in bounded time, and one bad snapshot never takes the store
down (listing, golden selection and bake-time dedup skip it with a warning)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from snapstore_support import DEEP_JSON, base_meta, run_cli, write_snapshot
from supermachine.errors import SnapshotMetadataError
from supermachine.snapshots import bake, golden, metadata

RAM = bytes(range(256)) * 64  # 16 KiB
T0 = 1_700_000_000.0


def _load_error(directory: Path) -> str:
    with pytest.raises(SnapshotMetadataError) as err:
        metadata.load(directory)
    message = str(err.value)
    assert "\n" not in message
    assert str(directory / "metadata.json") in message
    return message


def test_deep_nesting_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "metadata.json").write_bytes(DEEP_JSON)
    assert "nested deeper than" in _load_error(tmp_path)
    (tmp_path / "metadata.json").write_bytes(b'{"a": ' * 5000 + b"1" + b"}" * 5000)
    assert "nested deeper than" in _load_error(tmp_path)


def test_brackets_inside_strings_are_not_nesting(tmp_path: Path) -> None:
    d = write_snapshot(tmp_path, "s", RAM, run=metadata.RunDefaults(cmd=("[" * 4000, '\\"[{')))
    assert metadata.load(d).run == metadata.RunDefaults(cmd=("[" * 4000, '\\"[{'))


def test_oversize_metadata_is_refused_before_reading(tmp_path: Path) -> None:
    good = json.dumps(base_meta().to_json()).encode()
    padded = good + b" " * (metadata.MAX_METADATA_BYTES - len(good) + 1)
    (tmp_path / "metadata.json").write_bytes(padded)
    assert f"larger than {metadata.MAX_METADATA_BYTES} bytes" in _load_error(tmp_path)
    # A sparse file claiming to be huge costs nothing to refuse.
    with open(tmp_path / "metadata.json", "wb") as f:
        f.truncate(1 << 40)
    assert "larger than" in _load_error(tmp_path)


def test_fifo_metadata_does_not_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "metadata.json")
    code = "import sys; from supermachine.snapshots import metadata; metadata.load(sys.argv[1])"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail("loading a FIFO metadata.json blocked (waited for a writer)")
    assert "not a regular file" in proc.stderr.strip().splitlines()[-1]
    assert "not a regular file" in _load_error(tmp_path)


def test_symlinked_metadata_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps(base_meta().to_json()))
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "metadata.json").symlink_to(elsewhere)
    assert "is a symbolic link" in _load_error(snap)


def _good() -> dict[str, object]:
    return base_meta().to_json()


def _run(d: dict[str, object]) -> dict[str, object]:
    d["run"] = metadata.RunDefaults().to_json()
    return d["run"]  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (lambda d: d.update(memory_mib=1 << 40), "field 'memory_mib' must be between 1 and"),
        (lambda d: d.update(vcpus=100_000), "field 'vcpus' must be between 1 and 32"),
        (lambda d: d.update(created=1e300), "field 'created' must be a Unix time between"),
        (lambda d: d.update(created=-5.0), "field 'created' must be a Unix time between"),
        (lambda d: d["image"].update(ref="x" * 5000), "field 'image.ref' is longer than 4096"),
        (lambda d: d["kernel"].update(path="/boot/\0vmlinux"), "field 'kernel.path' must not contain NUL"),
        (lambda d: d["kernel"].update(sha256="md5:1"), "field 'kernel.sha256' must be 'sha256:'"),
        (lambda d: d.update(baked_by_version="v" * 1000), "field 'baked_by_version' is longer than"),
        (lambda d: _run(d).update(cmd=["x"] * 5000), "field 'run.cmd' has more than 4096 entries"),
        (lambda d: _run(d).update(env={f"K{i}": "v" for i in range(5000)}), "field 'run.env' has more"),
        (lambda d: _run(d).update(env={"A=B": "v"}), "field 'run.env' has a name with '='"),
        (lambda d: _run(d).update(env={"A": "\0"}), "field 'run.env' values must be at most"),
        (lambda d: _run(d).update(workdir=""), "field 'run.workdir' must be a non-empty string"),
    ],
)
def test_fields_are_type_and_range_checked(tmp_path: Path, mutate, expect: str) -> None:  # type: ignore[no-untyped-def]
    data = _good()
    mutate(data)
    (tmp_path / "metadata.json").write_text(json.dumps(data))
    assert expect in _load_error(tmp_path)


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        (b'{"format": "supermachine-snapshot", "version": 1, "created": NaN}', "not valid JSON"),
        (b'{"format": "supermachine-snapshot", "version": 1, "created": Infinity}', "not valid JSON"),
        (b'{"format": "supermachine-snapshot", "version": 1, "vcpus": ' + b"9" * 5000 + b"}", "not valid"),
    ],
)
def test_json_oddities_are_one_line(tmp_path: Path, text: bytes, expect: str) -> None:
    (tmp_path / "metadata.json").write_bytes(text)
    assert expect in _load_error(tmp_path)


def _store_with_bad_snapshots(store: Path) -> None:
    write_snapshot(store, "good", RAM, created=T0)
    for name in ("deep", "fifo", "huge"):
        d = write_snapshot(store, name, RAM, created=T0 + 1)
        (d / "metadata.json").unlink()
    (store / "deep" / "metadata.json").write_bytes(DEEP_JSON)
    os.mkfifo(store / "fifo" / "metadata.json")
    with open(store / "huge" / "metadata.json", "wb") as f:
        f.truncate(metadata.MAX_METADATA_BYTES + 1)


def test_snapshots_command_reports_and_skips_bad_snapshots(tmp_path: Path) -> None:
    _store_with_bad_snapshots(tmp_path)
    try:
        proc = run_cli("snapshots", "--json", str(tmp_path), timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("`supermachine snapshots` hung on a FIFO metadata.json")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [row["name"] for row in json.loads(proc.stdout)] == ["good"]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3, proc.stderr
    for name, why in [("deep", "nested deeper"), ("fifo", "not a regular file"), ("huge", "larger than")]:
        assert sum(f"/{name}/metadata.json" in line and why in line for line in lines) == 1, proc.stderr


def test_snapshots_table_lists_the_good_ones(tmp_path: Path) -> None:
    _store_with_bad_snapshots(tmp_path)
    proc = run_cli("snapshots", str(tmp_path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "good" in proc.stdout and "alpine:3.20" in proc.stdout


def test_golden_selection_skips_a_deeply_nested_sibling(tmp_path: Path) -> None:
    write_snapshot(tmp_path, "good", RAM, created=T0)
    deep = write_snapshot(tmp_path, "newer-but-broken", RAM, created=T0 + 1)
    (deep / "metadata.json").write_bytes(DEEP_JSON)
    snaps, problems = golden.list_snapshots(tmp_path)
    assert [s.name for s in snaps] == ["good"]
    assert len(problems) == 1 and "nested deeper than" in problems[0]
    # What vm.snapshot(base="auto") asks before it writes: the golden to store the new one against.
    prospective = base_meta(memory_mib=2)
    chosen = bake.choose_base(tmp_path / "fresh", prospective, "auto")
    assert chosen == tmp_path / "good"


def test_identity_hashes_read_only_regular_files(tmp_path: Path) -> None:
    """A kernel or agent path (which a restored snapshot's metadata names) that is a FIFO or a
    device is refused at once instead of blocking or hashing forever; a symlink to a file is fine."""
    os.mkfifo(tmp_path / "fifo")
    code = "import sys; from supermachine.snapshots import metadata; metadata.sha256_file(sys.argv[1])"
    for path in (tmp_path / "fifo", Path("/dev/zero")):
        try:
            proc = subprocess.run(
                [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"hashing {path} did not return")
        assert "not a regular file" in proc.stderr.strip().splitlines()[-1]
    (tmp_path / "vmlinux").write_bytes(b"kernel")
    (tmp_path / "link").symlink_to(tmp_path / "vmlinux")
    assert metadata.sha256_file(tmp_path / "link") == metadata.sha256_file(tmp_path / "vmlinux")
