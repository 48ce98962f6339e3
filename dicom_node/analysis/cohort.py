"""``her2low fit``: the node's analysis, offline, for one study or a whole research cohort.

Headers are read first (no pixels) to group files by study and series; each study is then
analysed on its own (in parallel with ``--jobs``), so memory stays bounded by one study. For each
diffusion series the maps, ROI, previews and features are written under ``OUT/<study>/<series>/``,
and one cohort table (``features.csv``, ``features.json``) collects a row per series with the
settings that produced it.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.analysis.dki import DkiMethod
from dicom_node.analysis.series_analysis import PIPELINE_VERSION, AnalysisSettings, analyse
from dicom_node.series.assemble import AssemblyError, assemble_dwi
from dicom_node.series.dicomio import DicomReadError, iter_files, read_dataset
from dicom_node.series.roles import classify_series


@dataclass
class StudyFiles:
    study_uid: str
    series: dict[str, list[Path]] = field(default_factory=lambda: defaultdict(list))


def index_files(paths: Sequence[Path]) -> tuple[dict[str, StudyFiles], list[str]]:
    """Group files by study and series from their headers; unreadable files are reported."""
    studies: dict[str, StudyFiles] = {}
    problems: list[str] = []
    for path in iter_files(paths):
        try:
            ds = read_dataset(path, stop_before_pixels=True)
        except DicomReadError as exc:
            problems.append(f"{path}: {exc.reason}")
            continue
        study_uid = str(ds.get("StudyInstanceUID", "") or "")
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not study_uid or not series_uid:
            problems.append(f"{path}: no study or series UID")
            continue
        studies.setdefault(study_uid, StudyFiles(study_uid)).series[series_uid].append(path)
    return studies, problems


def analyse_study(
    study: StudyFiles, out: Path, settings: AnalysisSettings, roi: Path | None
) -> list[dict[str, Any]]:
    """Analyse every diffusion series of one study; one row per series (or per refusal)."""
    loaded = {uid: [read_dataset(p) for p in files] for uid, files in study.series.items()}
    segs = [
        ds
        for datasets in loaded.values()
        for ds in datasets
        if str(ds.get("Modality", "")) == "SEG"
    ]
    if roi is not None:
        segs = [read_dataset(roi)]
    rows: list[dict[str, Any]] = []
    for series_uid, datasets in loaded.items():
        verdict = classify_series(datasets)
        if not verdict.role.is_fit_input:
            continue
        row: dict[str, Any] = {
            "study_instance_uid": study.study_uid,
            "series_instance_uid": series_uid,
            "patient_id": str(datasets[0].get("PatientID", "") or ""),
            "accession_number": str(datasets[0].get("AccessionNumber", "") or ""),
            "pipeline_version": PIPELINE_VERSION,
            "method": settings.method.value,
        }
        try:
            dwi = assemble_dwi(datasets)
            result = analyse(dwi, segs=segs, settings=settings)
        except (AssemblyError, ValueError) as exc:
            rows.append({**row, "status": "failed", "problem": str(exc)[:500]})
            continue
        folder = out / study.study_uid / series_uid
        folder.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = {
            name: np.asarray(values, dtype=np.float32) for name, values in result.maps.items()
        }
        arrays.update(roi=result.roi.mask, bvals=dwi.bvals, affine=dwi.geometry.affine)
        np.savez_compressed(folder / "maps.npz", **arrays)
        for name, png in result.previews.items():
            (folder / (name if name.endswith(".png") else f"{name}.png")).write_bytes(png)
        document = {
            "features": result.features,
            "provenance": result.provenance,
            "laterality": result.laterality,
            "problems": result.problems,
        }
        (folder / "features.json").write_text(json.dumps(document, indent=2))
        rows.append(
            {
                **row,
                "status": "ok",
                "laterality": result.laterality or "",
                "roi_source": result.provenance["roi"]["source"],
                "roi_confirmed": result.provenance["roi"]["confirmed"],
                "roi_voxels": result.provenance["roi"]["voxels"],
                "b_values": " ".join(format(b, "g") for b in dwi.bvals),
                **result.features,
            }
        )
    return rows


def _progress(done: int, total: int, label: str) -> None:
    if sys.stderr.isatty():
        print(f"\r[{done}/{total}] {label[:60]:60s}", end="", file=sys.stderr, flush=True)
    else:
        print(f"[{done}/{total}] {label}", file=sys.stderr, flush=True)


def write_table(rows: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    with open(out / "features.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (out / "features.json").write_text(json.dumps(rows, indent=2))


def cmd_fit(args: argparse.Namespace) -> int:
    """Entry point of ``her2low fit`` (arguments defined in :mod:`her2low.cli`)."""
    missing = [str(p) for p in args.paths if not Path(p).exists()]
    if missing:
        print(f"her2low fit: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.roi is not None and not Path(args.roi).is_file():
        print(f"her2low fit: --roi {args.roi} is not a file", file=sys.stderr)
        return 2
    settings = AnalysisSettings(method=DkiMethod(args.method))
    studies, problems = index_files(args.paths)
    for problem in problems:
        print(f"her2low fit: skipped {problem}", file=sys.stderr)
    if not studies:
        print("her2low fit: no DICOM studies found", file=sys.stderr)
        return 1
    rows: list[dict[str, Any]] = []
    ordered = sorted(studies.values(), key=lambda s: s.study_uid)
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(analyse_study, s, args.out, settings, args.roi) for s in ordered]
            for done, (study, future) in enumerate(zip(ordered, futures, strict=True), 1):
                rows.extend(future.result())
                _progress(done, len(ordered), study.study_uid)
    else:
        for done, study in enumerate(ordered, 1):
            rows.extend(analyse_study(study, args.out, settings, args.roi))
            _progress(done, len(ordered), study.study_uid)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    write_table(rows, args.out)
    ok = sum(1 for row in rows if row["status"] == "ok")
    if args.json:
        print(json.dumps({"out": str(args.out), "series": rows}, indent=2, default=str))
    else:
        print(
            f"analysed {ok} diffusion series in {len(ordered)} studies; table: {args.out / 'features.csv'}"
        )
    return 0 if ok else 1
