"""``her2low fit``: offline analysis of a cohort folder writes maps, previews and one table."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dicom_node.synth import write_study

pytestmark = pytest.mark.slow


def _fit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "her2low", "fit", *args], capture_output=True, text=True, timeout=300
    )


def test_cohort_table_matches_truth(tmp_path: Path) -> None:
    cohort = tmp_path / "cohort"
    manifests = [
        write_study(cohort / "a", seed=31, lesion="mass", vendor="siemens", snr=60),
        write_study(cohort / "b", seed=32, lesion="nme", vendor="philips", snr=60),
    ]
    out = tmp_path / "out"
    result = _fit(str(cohort), "--out", str(out), "--jobs", "2", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["study_instance_uid"]: row for row in json.loads(result.stdout)["series"]}
    with open(out / "features.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 2 and all(row["status"] == "ok" for row in table)
    for manifest in manifests:
        row = rows[manifest.study_instance_uid]
        truth = manifest.truth_summary
        assert row["roi_source"] == "seg" and row["laterality"] == manifest.laterality
        assert row["dapp_median"] == pytest.approx(truth["tumour_dapp_mean"], rel=0.08)
        assert row["kapp_median"] == pytest.approx(truth["tumour_kapp_mean"], abs=0.12)
        folder = out / manifest.study_instance_uid / row["series_instance_uid"]
        maps = np.load(folder / "maps.npz")
        assert maps["roi"].sum() == row["roi_voxels"]
        assert (folder / "dapp_histogram.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_paths_are_refused_with_a_message(tmp_path: Path) -> None:
    result = _fit(str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "no such file" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not DICOM")
    result = _fit(str(empty), "--out", str(tmp_path / "o"))
    assert result.returncode == 1 and "no DICOM studies" in result.stderr
