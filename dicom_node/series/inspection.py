"""``her2low inspect PATH... [--json]``: what the node would make of a set of DICOM files.

Reads headers only (pixel data is skipped), groups instances by Series Instance UID
(0020,000E), and for each series reports its role, storage style, b-values and volume counts,
matrix and every problem found — the same analysis the node runs on a received series, so a
PACS administrator can check a routing set-up or a vendor export before sending it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from dicom_node.series.assemble import check_headers
from dicom_node.series.bvalues import SEARCHED_CONVENTIONS, b_label
from dicom_node.series.dicomio import read_datasets
from dicom_node.series.headers import text
from dicom_node.series.layout import plan_layout
from dicom_node.series.roles import BreastRules, SeriesRole, classify_series
from dicom_node.series.vendors import vendor_family

__all__ = [
    "add_arguments",
    "add_subcommand",
    "cmd_inspect",
    "format_report",
    "inspect_paths",
    "inspect_series",
    "run",
]

_DIFFUSION_INPUT = (SeriesRole.DWI_TRACE, SeriesRole.DWI_DIRECTIONAL)


def inspect_series(
    datasets: Sequence[Dataset], rules: BreastRules = BreastRules()
) -> dict[str, Any]:
    """Report entry for the instances of one series (headers only); raises
    :class:`~dicom_node.series.assemble.AssemblyError` for headers pydicom cannot convert."""
    check_headers(datasets)
    ds = datasets[0]
    classification = classify_series(datasets, rules)
    layout = plan_layout(datasets)
    problems = [str(p) for p in layout.problems]
    family = vendor_family(ds)
    if classification.role in _DIFFUSION_INPUT and layout.frames_without_b:
        problems.insert(
            0,
            f"missing b-values: {layout.frames_without_b} of "
            f"{len(layout.frames)} images carry no b-value (searched "
            f"{SEARCHED_CONVENTIONS}; vendor family {family.value})",
        )
    b_values = sorted({f.diffusion.b for f in layout.frames if f.diffusion.b is not None})
    per_b: dict[float, int] = defaultdict(int)
    for vol in layout.volumes:
        if vol.b is not None:
            per_b[vol.b] += 1
    return {
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
        "vendor": text(ds, "Manufacturer"),
        "vendor_family": family.value,
        "role": classification.role.value,
        "storage": layout.storage.value,
        "b_values": [float(b) for b in b_values],
        "volumes_per_b": {b_label(b): n for b, n in sorted(per_b.items())},
        "slices": len(layout.slice_positions),
        "rows": layout.rows,
        "columns": layout.columns,
        "problems": problems,
        "is_breast": classification.is_breast,
        "reasons": classification.reasons,
        "description": text(ds, "SeriesDescription"),
        "modality": text(ds, "Modality"),
        "series_number": _int_or_none(ds.get("SeriesNumber")),
        "instances": len(datasets),
        "b_sources": sorted(
            {f.diffusion.source.value for f in layout.frames if f.diffusion.source is not None}
        ),
    }


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def inspect_paths(paths: Sequence[Path], rules: BreastRules = BreastRules()) -> dict[str, Any]:
    """Inspect files and folders (plain or gzip-wrapped DICOM), one entry per series.

    Returns ``{"series": [...], "unreadable": [{"path", "reason"}]}``; series are ordered by
    Series Number, then UID.
    """
    result = read_datasets(list(paths), stop_before_pixels=True)
    by_series: dict[str, list[Dataset]] = defaultdict(list)
    for ds in result.datasets:
        by_series[str(ds.get("SeriesInstanceUID", ""))].append(ds)
    entries = [inspect_series(group, rules) for group in by_series.values()]
    entries.sort(
        key=lambda e: (
            e["series_number"] is None,
            e["series_number"] or 0,
            e["series_instance_uid"],
        )
    )
    return {
        "series": entries,
        "unreadable": [{"path": str(p.path), "reason": p.reason} for p in result.problems],
    }


def _b_summary(entry: dict[str, Any]) -> str:
    per_b = entry["volumes_per_b"]
    if not per_b:
        return ", ".join(b_label(b) for b in entry["b_values"]) or "-"
    return ", ".join(f"{b}×{n}" if n > 1 else b for b, n in per_b.items())


def format_report(report: dict[str, Any]) -> str:
    """Human-readable table of an :func:`inspect_paths` report, problems listed below it."""
    header = (
        "#",
        "vendor",
        "role",
        "storage",
        "breast",
        "slices",
        "matrix",
        "b (volumes)",
        "description",
    )
    rows = [header]
    for e in report["series"]:
        rows.append(
            (
                "" if e.get("series_number") is None else str(e["series_number"]),
                e["vendor"][:20],
                e["role"],
                e["storage"],
                "yes" if e.get("is_breast") else "no",
                str(e["slices"]),
                f"{e['rows']}x{e['columns']}",
                _b_summary(e),
                e.get("description", "")[:40],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for e in report["series"]:
        notes = [f"problem: {p}" for p in e["problems"]]
        notes += [f"reason: {r}" for r in e.get("reasons", [])]
        if notes:
            lines.append("")
            lines.append(f"series {e.get('series_number', '')} {e['series_instance_uid']}")
            lines.extend(f"  {n}" for n in notes)
    unreadable = report.get("unreadable", [])
    if unreadable:
        lines.append("")
        lines.append(f"{len(unreadable)} unreadable file(s):")
        lines.extend(f"  {u['path']}: {u['reason']}" for u in unreadable)
    if not report["series"]:
        lines.append("no DICOM series found")
    return "\n".join(lines)


def cmd_inspect(paths: Sequence[Path], as_json: bool) -> int:
    """Run ``inspect``: 0 when series were found, 1 when none, 2 for a missing path."""
    missing = [p for p in paths if not Path(p).exists()]
    for p in missing:
        print(f"her2low inspect: error: {p}: no such file or folder", file=sys.stderr)
    if missing:
        return 2
    report = inspect_paths([Path(p) for p in paths])
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    if not report["series"]:
        unreadable = len(report["unreadable"])
        print(
            f"her2low inspect: error: no DICOM series found ({unreadable} unreadable file(s))",
            file=sys.stderr,
        )
        return 1
    return 0


HELP = "describe the DICOM series in files or folders (roles, b-values, problems)"
DESCRIPTION = (
    "Read DICOM headers (plain or gzip-wrapped) under the given paths and report each series as "
    "the node would analyse it: role, storage style, b-values and volumes, matrix and problems. "
    "Exit 0 when a series was found, 1 when none, 2 for a missing path."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``inspect`` (defined here only; ``her2low`` composes them)."""
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="DICOM file or folder (searched recursively)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Handler of the parser :func:`add_arguments` filled."""
    return cmd_inspect(args.paths, args.json)


COMMANDS = {"inspect": (HELP, DESCRIPTION, add_arguments, run)}


def add_subcommand(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``inspect PATH... [--json]``; the handler is ``args.func(args) -> int``."""
    parser = subparsers.add_parser("inspect", help=HELP, description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(func=run)
