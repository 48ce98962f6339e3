"""Reading files (plain, gzip, broken) and the ``inspect`` report and command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from dicom_builders import (
    Grid,
    classic_series,
    enhanced_series,
    siemens_mosaic_series,
    tag_none,
    tag_standard,
    volumes,
    write,
    write_gz,
)

from dicom_node.series.dicomio import DicomReadError, iter_files, read_dataset, read_datasets
from dicom_node.series.inspection import add_subcommand, cmd_inspect, format_report, inspect_paths

GRID = Grid(n_slices=3)
DIRS = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0)]
KEYS = {
    "series_instance_uid",
    "vendor",
    "role",
    "storage",
    "b_values",
    "volumes_per_b",
    "slices",
    "rows",
    "columns",
    "problems",
}


def test_read_plain_and_gzip(tmp_path: Path) -> None:
    ds = classic_series(GRID, volumes(GRID, [(0.0, [None])]), shuffle_seed=None)[0]
    plain = write(ds, tmp_path / "a.dcm")
    wrapped = write_gz(ds, tmp_path / "b.dcm.gz")
    for path in (plain, wrapped):
        read = read_dataset(path)
        assert read.SOPInstanceUID == ds.SOPInstanceUID
        assert read.pixel_array.shape == (4, 6)
        assert read.filename == str(path)
    header = read_dataset(wrapped, stop_before_pixels=True)
    assert "PixelData" not in header


def test_robust_reader_reports_bad_files(tmp_path: Path) -> None:
    ds = classic_series(GRID, volumes(GRID, [(0.0, [None])]), shuffle_seed=None)[0]
    write(ds, tmp_path / "sub" / "ok.dcm")
    (tmp_path / "notes.txt").write_text("not dicom")
    (tmp_path / "broken.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    good = (tmp_path / "sub" / "ok.dcm").read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(good[:200])
    (tmp_path / ".hidden").write_text("skipped")
    with pytest.raises(DicomReadError):
        read_dataset(tmp_path / "notes.txt")
    files = list(iter_files([tmp_path]))
    assert tmp_path / ".hidden" not in files and len(files) == 4
    result = read_datasets([tmp_path, tmp_path / "absent"])
    assert len(result.datasets) == 1
    bad = {p.path.name: p.reason for p in result.problems}
    assert set(bad) == {"notes.txt", "broken.gz", "truncated.dcm", "absent"}
    assert "DICM" in bad["notes.txt"]


@pytest.fixture
def study(tmp_path: Path) -> Path:
    """A folder with five series: trace (gzip), mosaic, enhanced, no-b, non-breast."""
    root = tmp_path / "study"
    trace = classic_series(
        GRID, volumes(GRID, [(0.0, [None]), (50.0, [None]), (800.0, [None])]), tag_standard
    )
    for i, ds in enumerate(trace):
        ds.SeriesNumber = 1
        write_gz(ds, root / "trace" / f"{i}.dcm.gz")
    for i, ds in enumerate(
        siemens_mosaic_series(GRID, volumes(GRID, [(0.0, [None]), (1000.0, DIRS)]))
    ):
        ds.SeriesNumber = 2
        write(ds, root / "mosaic" / f"{i}.dcm")
    enhanced = enhanced_series(
        GRID, volumes(GRID, [(0.0, [None]), (0.002, [None]), (1000.0, [None])])
    )
    enhanced.SeriesNumber = 3
    write(enhanced, root / "enhanced.dcm")
    for i, ds in enumerate(
        classic_series(GRID, volumes(GRID, [(0.0, [None]), (800.0, [None])]), tag_none)
    ):
        ds.SeriesNumber = 4
        write(ds, root / "nob" / f"{i}.dcm")
    for i, ds in enumerate(
        classic_series(GRID, volumes(GRID, [(0.0, [None])]), tag_standard, body_part="BRAIN")
    ):
        ds.SeriesNumber = 5
        write(ds, root / "brain" / f"{i}.dcm")
    (root / "README").write_text("not dicom")
    return root


def test_inspect_paths_report(study: Path) -> None:
    report = inspect_paths([study])
    series = report["series"]
    assert [s["series_number"] for s in series] == [1, 2, 3, 4, 5]
    for s in series:
        assert set(s) >= KEYS
    trace, mosaic, enhanced, nob, brain = series
    assert trace["role"] == "dwi_trace" and trace["storage"] == "classic"
    assert trace["b_values"] == [0.0, 50.0, 800.0]
    assert trace["volumes_per_b"] == {"0": 1, "50": 1, "800": 1}
    assert (trace["slices"], trace["rows"], trace["columns"]) == (3, 4, 6)
    assert trace["problems"] == [] and trace["is_breast"] is True
    assert mosaic["storage"] == "mosaic" and mosaic["role"] == "dwi_directional"
    assert mosaic["volumes_per_b"] == {"0": 1, "1000": 2}
    assert (mosaic["slices"], mosaic["rows"], mosaic["columns"]) == (3, 4, 6)
    assert enhanced["storage"] == "enhanced"
    assert enhanced["b_values"] == pytest.approx([0.0, 0.002, 1000.0])
    assert enhanced["volumes_per_b"] == {"0": 1, "0.002": 1, "1000": 1}
    assert any("missing b-values" in p for p in nob["problems"])
    assert brain["is_breast"] is False and any("BRAIN" in r for r in brain["reasons"])
    assert [u["path"] for u in report["unreadable"]] == [str(study / "README")]
    json.dumps(report)  # serialisable as is


def test_format_report_and_command(study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = format_report(inspect_paths([study]))
    assert "dwi_trace" in text and "mosaic" in text and "missing b-values" in text
    assert "1 unreadable file(s)" in text

    parser = argparse.ArgumentParser(prog="her2low")
    add_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["inspect", str(study / "trace"), "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["series"]) == 1 and out["series"][0]["b_values"] == [0.0, 50.0, 800.0]

    assert cmd_inspect([study / "enhanced.dcm"], as_json=False) == 0
    assert "enhanced" in capsys.readouterr().out
    assert cmd_inspect([study / "README"], as_json=False) == 1
    assert cmd_inspect([study / "nowhere"], as_json=True) == 2
    assert "no such file" in capsys.readouterr().err
