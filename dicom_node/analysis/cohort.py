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
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.analysis.dki import DkiMethod
from dicom_node.analysis.outputs import is_own_object, write_outputs
from dicom_node.analysis.series_analysis import (
    PIPELINE_VERSION,
    AnalysisSettings,
    analyse,
    analysis_settings,
)
from dicom_node.series.assemble import AssemblyError, assemble_dwi
from dicom_node.series.dicomio import DicomReadError, iter_files, read_dataset
from dicom_node.series.headers import text
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
        study_uid = text(ds, "StudyInstanceUID")
        series_uid = text(ds, "SeriesInstanceUID")
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
        if str(ds.get("Modality", "")) == "SEG" and not is_own_object(ds)
    ]
    if roi is not None:
        segs = [read_dataset(roi)]
    rows: list[dict[str, Any]] = []
    for series_uid, datasets in loaded.items():
        if is_own_object(datasets[0]):  # a previous run's DIR/dicom/ output: never re-analysed
            continue
        verdict = classify_series(datasets)
        if not verdict.role.is_fit_input:
            continue
        row: dict[str, Any] = {
            "study_instance_uid": study.study_uid,
            "series_instance_uid": series_uid,
            "patient_id": text(datasets[0], "PatientID"),
            "accession_number": text(datasets[0], "AccessionNumber"),
            "pipeline_version": PIPELINE_VERSION,
            "method": settings.method.value,
            "denoise": settings.denoise,
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
            "provenance": result.provenance.model_dump(mode="json"),
            "laterality": result.laterality.value if result.laterality else None,
            "problems": result.problems,
        }
        (folder / "features.json").write_text(json.dumps(document, indent=2))
        dicom_dir = out / "dicom" / study.study_uid / series_uid
        try:  # SR, SEG, Parametric Maps, as the node sends them (DIR/dicom/<study>/<series>/)
            dicom_objects: int | str = len(
                write_outputs(result, dwi, datasets, dicom_dir, segs=segs)
            )
        except (ValueError, OSError) as exc:
            dicom_objects = f"not written: {exc}"[:300]
        rows.append(
            {
                **row,
                # what ran: the requested fit, or the fallback where it could not (no sigma)
                "method": result.settings.method.value,
                "denoise": result.settings.denoise,
                "fit_fallback": result.fit_fallback or "",
                "status": "ok",
                "laterality": result.laterality.value if result.laterality else "",
                "roi_source": result.provenance.roi.source.value,
                "roi_confirmed": result.provenance.roi.confirmed,
                "roi_voxels": result.provenance.roi.voxels,
                "b_values": " ".join(format(b, "g") for b in dwi.bvals),
                "dicom_objects": dicom_objects,
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


SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage SOP Class (PS3.4 B.5)


def _error(message: str) -> None:
    print(f"her2low fit: error: {' '.join(message.split())}", file=sys.stderr)


def _check_roi(roi: Path) -> str | None:
    """Why ``--roi`` cannot be used (a SEG given by hand must never be silently replaced)."""
    if not roi.is_file():
        return f"--roi {roi} is not a file"
    try:
        ds = read_dataset(roi, stop_before_pixels=True)
    except DicomReadError as exc:
        return f"--roi {roi} is not a DICOM file ({exc.reason})"
    modality = text(ds, "Modality")
    if modality != "SEG" or str(ds.get("SOPClassUID", "")) != SEG_STORAGE:
        return f"--roi {roi} is a {modality or 'non-SEG'} object, not a DICOM Segmentation (SEG)"
    return None


def _check_out(out: Path) -> tuple[str, int] | None:
    """Why ``--out`` cannot take the results, with the exit code (2 usage, 1 not writable).

    Checked before any work, without creating anything (an error leaves no empty folder).
    """
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder", 2
    existing = next((p for p in (out, *out.absolute().parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"cannot create --out {out}: {existing} is a file, not a folder", 1
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot create --out {out}: {existing} is not writable", 1
    return None


def _why_nothing(rows: list[dict[str, Any]], studies: dict[str, StudyFiles]) -> str:
    """One line saying why no series was analysed (the CSV alone is easy to miss)."""
    n_series = sum(len(s.series) for s in studies.values())
    failed = [r for r in rows if r["status"] != "ok"]
    if not failed:
        return (
            f"no diffusion series among {n_series} series in {len(studies)} studies "
            "(see `her2low inspect PATH`)"
        )
    return (
        f"none of the {len(failed)} diffusion series could be analysed; first: "
        f"{failed[0]['series_instance_uid']}: {failed[0].get('problem', '')}"
    )


def cmd_fit(args: argparse.Namespace) -> int:
    """Entry point of ``her2low fit``: 0 when a series was analysed, 1 when none, 2 bad usage."""
    missing = [str(p) for p in args.paths if not Path(p).exists()]
    if missing:
        _error(f"no such file or folder: {', '.join(missing)}")
        return 2
    if args.roi is not None and (problem := _check_roi(Path(args.roi))) is not None:
        _error(problem)
        return 2
    out = Path(args.out)
    if (refusal := _check_out(out)) is not None:
        _error(refusal[0])
        return refusal[1]
    settings = analysis_settings(args.method, args.denoise)
    studies, problems = index_files(args.paths)
    if not studies:
        first = f"; first: {problems[0]}" if problems else ""
        _error(f"no DICOM studies found ({len(problems)} unreadable file(s){first})")
        return 1
    for problem in problems:
        print(f"her2low fit: skipped {problem}", file=sys.stderr)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _error(f"cannot create --out {out}: {exc.strerror or type(exc).__name__}")
        return 1
    rows: list[dict[str, Any]] = []
    ordered = sorted(studies.values(), key=lambda s: s.study_uid)
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(analyse_study, s, out, settings, args.roi) for s in ordered]
            for done, (study, future) in enumerate(zip(ordered, futures, strict=True), 1):
                rows.extend(future.result())
                _progress(done, len(ordered), study.study_uid)
    else:
        for done, study in enumerate(ordered, 1):
            rows.extend(analyse_study(study, out, settings, args.roi))
            _progress(done, len(ordered), study.study_uid)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    write_table(rows, out)
    for row in rows:
        if row["status"] != "ok":
            print(
                f"her2low fit: series {row['series_instance_uid']} failed: {row.get('problem')}",
                file=sys.stderr,
            )
        elif args.roi is not None and row.get("roi_source") != "seg":
            print(
                f"her2low fit: --roi {args.roi} does not cover series "
                f"{row['series_instance_uid']}; an automatic ROI was used",
                file=sys.stderr,
            )
    ok = sum(1 for row in rows if row["status"] == "ok")
    if args.json:
        print(json.dumps({"out": str(out), "series": rows}, indent=2, default=str))
    else:
        print(
            f"analysed {ok} diffusion series in {len(ordered)} studies; table: {out / 'features.csv'}"
        )
    if not ok:
        _error(_why_nothing(rows, studies))
        return 1
    return 0


HELP = "offline DKI analysis of studies or a research cohort folder (maps, features table)"
DESCRIPTION = (
    "Run the node's analysis offline: every diffusion series under PATH is fitted (DKI), its "
    "tumour ROI taken from a DICOM SEG (--roi, or a SEG found beside the series, else an "
    "automatic candidate), and maps, previews and features are written under "
    "OUT/<study>/<series>/ with one cohort table OUT/features.csv (and .json). --out is "
    "required: fit always writes files, and --json also prints the table on stdout."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fit`` (defined here only; ``her2low`` composes them)."""
    from her2low.core.commands import positive_int

    parser.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="DICOM file or folder (recursive)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder for maps, previews and features.csv",
    )
    parser.add_argument(
        "--roi",
        type=Path,
        default=None,
        metavar="SEG",
        help="DICOM SEG of the tumour, used for every series",
    )
    parser.add_argument(
        "--method",
        choices=[m.value for m in DkiMethod],
        default=None,
        help="DKI fit: weighted linear, non-linear, or non-linear with a Rician noise floor "
        f"(default {AnalysisSettings().method.value}; nls where the noise sigma is unknown)",
    )
    parser.add_argument(
        "--denoise",
        choices=["none", "mppca"],
        default=None,
        help=f"denoising of the DWI before the fit (default {AnalysisSettings().denoise})",
    )
    parser.add_argument(
        "--json", action="store_true", help="also print the cohort table as JSON on stdout"
    )
    parser.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        metavar="N",
        help="studies analysed in parallel (processes)",
    )


def run(args: argparse.Namespace) -> int:
    """Handler of the parser :func:`add_arguments` filled."""
    return cmd_fit(args)


COMMANDS = {"fit": (HELP, DESCRIPTION, add_arguments, run)}
