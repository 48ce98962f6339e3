"""One analysed synthetic diffusion series, for the tests that send its result objects."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom

from dicom_node.analysis.series_analysis import Analysis, analyse
from dicom_node.series.assemble import assemble_dwi
from dicom_node.series.volume import DwiVolume
from dicom_node.synth import write_study


@dataclass
class Source:
    """The source series (files and datasets) with its volume and its analysis."""

    study_uid: str
    series_uid: str
    files: list[Path]
    analysis: Analysis
    dwi: DwiVolume
    datasets: list[pydicom.Dataset]


def analysed_source(folder: Path, seed: int = 9) -> Source:
    """Write the synthetic study under ``folder`` and analyse its DWI series."""
    manifest = write_study(folder, seed=seed)
    files = [folder / f for f in manifest.dwi.files]
    datasets: list[pydicom.Dataset] = [pydicom.dcmread(f) for f in files]
    dwi = assemble_dwi(datasets)
    return Source(
        manifest.study_instance_uid,
        manifest.dwi.series_instance_uid,
        files,
        analyse(dwi),
        dwi,
        datasets,
    )
