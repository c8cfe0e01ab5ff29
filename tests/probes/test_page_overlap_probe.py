"""`supermachine probe page-overlap` on constructed RAM images with known answers."""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

RunCli = Callable[..., subprocess.CompletedProcess[str]]


P = 4096


def write_image(path: Path, layout: list[int | None]) -> Path:
    """Each entry is a page: None for zeros, else a seed for a random page."""
    path.write_bytes(b"".join(bytes(P) if s is None else random.Random(s).randbytes(P) for s in layout))
    return path


def images(tmp_path: Path) -> list[Path]:
    golden = write_image(tmp_path / "golden.ram", [1, 2, None, 3, None, 4, 5, 6, 7, 8])
    # 3 pages changed, 1 page newly zeroed, all else equal to the golden at the same offset.
    child = write_image(tmp_path / "child.ram", [1, 2, None, 3, None, 40, 50, None, 7, 60])
    # Same contents as the golden, but shifted by one page: nothing matches at the same offset.
    shifted = write_image(tmp_path / "shifted.ram", [None, 1, 2, None, 3, None, 4, 5, 6, 7])
    return [golden, child, shifted]


def test_json_report_has_known_answers(run_cli: RunCli, tmp_path: Path) -> None:
    golden, child, shifted = images(tmp_path)
    proc = run_cli("probe", "page-overlap", str(golden), str(child), str(shifted), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["golden"] == str(golden) and report["page_size"] == P
    rows = {Path(r["path"]).name: r for r in report["images"]}
    assert (rows["golden.ram"]["zero_pages"], rows["golden.ram"]["same_as_golden"]) == (2, 10)
    assert (rows["child.ram"]["zero_pages"], rows["child.ram"]["differ_from_golden"]) == (3, 4)
    assert rows["child.ram"]["shared_pct"] == 60.0
    assert rows["child.ram"]["differ_pct"] == 40.0
    assert rows["shifted.ram"]["zero_pct"] == 30.0
    # The shifted image holds the golden's contents one page later: no page lines up.
    assert rows["shifted.ram"]["same_as_golden"] == 0
    # Distinct contents: seeds 1-8, 40, 50, 60, and the zero page.
    assert (report["total_pages"], report["unique_pages"]) == (30, 12)
    assert report["redundant_pct"] == 60.0


def test_blake3_agrees_with_xxh3(run_cli: RunCli, tmp_path: Path) -> None:
    paths = [str(p) for p in images(tmp_path)]
    fast = json.loads(run_cli("probe", "page-overlap", *paths, "--json").stdout)
    strong = json.loads(run_cli("probe", "page-overlap", *paths, "--json", "--hash", "blake3").stdout)
    assert strong["algo"] == "blake3"
    assert strong["images"] == fast["images"] and strong["unique_pages"] == fast["unique_pages"]


def test_table_output(run_cli: RunCli, tmp_path: Path) -> None:
    golden, child, _ = images(tmp_path)
    proc = run_cli("probe", "page-overlap", str(golden), str(child))
    assert proc.returncode == 0, proc.stderr
    assert "golden.ram (golden)" in proc.stdout
    child_line = next(line for line in proc.stdout.splitlines() if "child.ram" in line)
    assert "30.0%" in child_line and "40.0%" in child_line and "60.0%" in child_line
    assert "all images: 20 pages, 12 unique (60.0%), 40.0% redundant" in proc.stdout


def test_missing_file_fails_with_one_line(run_cli: RunCli, tmp_path: Path) -> None:
    golden, *_ = images(tmp_path)
    proc = run_cli("probe", "page-overlap", str(golden), str(tmp_path / "nope.ram"))
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {tmp_path / 'nope.ram'} does not exist"
    proc = run_cli("probe", "page-overlap", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {tmp_path} is not a regular file"
