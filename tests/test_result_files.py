"""Result objects reach the disk whole and private, even when two workers write the same one.

An SR revision keeps its SOPInstanceUID, so two workers revising a series at the same moment
write the same file name: each must rename only its own complete temporary file. Small
hand-made datasets stand in for the SR and a map (the writing, not the content, is tested).
"""

from __future__ import annotations

import copy
import stat
import threading
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.analysis.outputs import ResultObjects
from tests.dicom_builders import base_dataset, set_pixels

WORKERS = 8
ROUNDS = 15


def _objects() -> ResultObjects:
    """An "SR" and a ~1 MB "map" of one series: big enough for writes to overlap."""
    study, series = generate_uid(), generate_uid()
    sr = base_dataset(study_uid=study, series_uid=series, instance=1)
    sr.Modality = "SR"
    pm = base_dataset(study_uid=study, series_uid=generate_uid(), instance=1)
    pm.Modality = "MR"
    set_pixels(pm, np.arange(32 * 128 * 128).reshape(32, 128, 128) % 4000, frames=32)
    return ResultObjects(sr=sr, maps={"ADC": pm})


def _temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.endswith(".dcm"))


def test_concurrent_writers_of_the_same_objects_all_succeed(tmp_path: Path) -> None:
    """Each worker has its own copy of the same objects, as separate workers would."""
    objects = _objects()
    copies = [copy.deepcopy(objects) for _ in range(WORKERS)]
    start = threading.Barrier(WORKERS)
    failures: list[BaseException] = []
    written: list[list[Path]] = []

    def work(mine: ResultObjects) -> None:
        start.wait()
        try:
            for _ in range(ROUNDS):
                written.append(mine.write(tmp_path))
        except BaseException as exc:  # collected: an assertion in a thread would be lost
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(c,)) for c in copies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert failures == []
    assert len(written) == WORKERS * ROUNDS
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {
        f"SR_{objects.sr.SOPInstanceUID}.dcm",
        f"MR_{objects.maps['ADC'].SOPInstanceUID}.dcm",
    }
    for path in tmp_path.iterdir():
        ds = pydicom.dcmread(path)
        assert ds.SOPInstanceUID in {objects.sr.SOPInstanceUID, objects.maps["ADC"].SOPInstanceUID}
    pm = pydicom.dcmread(tmp_path / f"MR_{objects.maps['ADC'].SOPInstanceUID}.dcm")
    assert pm.PixelData == objects.maps["ADC"].PixelData  # complete, not a torn copy


def test_written_files_are_not_readable_by_others(tmp_path: Path) -> None:
    folder = tmp_path / "outputs" / "study" / "series"
    paths = _objects().write(folder)
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & stat.S_IRWXO == 0, oct(mode)
        assert mode & stat.S_IRUSR
    assert stat.S_IMODE(folder.stat().st_mode) & stat.S_IRWXO == 0


def test_a_failing_save_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = _objects()
    objects.write(tmp_path)  # a previous, complete version stays in place
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk(self: Dataset, target: str | Path | BinaryIO, *a: object, **k: object) -> None:
        """What a full disk does to ``save_as``: part of the object written, then an error."""
        if isinstance(target, str | Path):
            Path(target).write_bytes(b"DICM half an object")
        else:
            target.write(b"DICM half an object")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Dataset, "save_as", full_disk)
    with pytest.raises(OSError, match="No space left"):
        objects.write(tmp_path)
    assert _temporaries(tmp_path) == []
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
