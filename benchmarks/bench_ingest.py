"""Ingest throughput: DCMTK storescu sends one 500-image series to three receivers in one run.

(a) DCMTK storescp, (b) a bare pynetdicom SCP that only writes bytes, (b') the same bare SCP
fsyncing each file before answering (the least any durable receiver must do), (c) our node with full
durability (fsync + atomic rename + directory fsync) and indexing (SQLite, synchronous=FULL).
Prints images/s and the ratios the issue sets goals for (node ≥ 0.9× bare, ≥ 0.5× storescp).

    .venv/bin/python benchmarks/bench_ingest.py [--images 500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _local import PY, ROOT, free_port, wait_port


def write_series(folder: Path, n: int) -> None:
    """n MR images, 256x256 16-bit, one series (random pixels: no compression tricks)."""
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    for i in range(n):
        ds = Dataset()
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.Modality = "MR"
        ds.PatientID = "BENCH"
        ds.InstanceNumber = i + 1
        ds.Rows = ds.Columns = 256
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = rng.integers(0, 4000, (256, 256), dtype=np.uint16).tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.save_as(folder / f"{i:04d}.dcm", enforce_file_format=True)


def send(folder: Path, port: int, called: str) -> float:
    env = {**os.environ, "TCP_NODELAY": "1"}
    start = time.perf_counter()
    subprocess.run(
        [
            "storescu",
            "-aet",
            "BENCH",
            "-aec",
            called,
            "-xe",
            "+sd",
            "127.0.0.1",
            str(port),
            str(folder),
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    return time.perf_counter() - start


def run_target(name: str, folder: Path, n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        port = free_port()
        env = dict(os.environ)
        if name == "storescp":
            cmd = [
                "storescp",
                "-aet",
                "STORESCP",
                "--output-directory",
                str(work),
                "+xe",
                str(port),
            ]
            called = "STORESCP"
        elif name.startswith("bare"):
            cmd = [
                PY,
                str(ROOT / "benchmarks" / "bare_pynetdicom_scp.py"),
                str(port),
                str(work),
            ] + (["--fsync"] if name == "bare+fsync" else [])
            called = "BARE"
        else:
            env.update(
                HER2LOW_HOME=str(work),
                HER2LOW_NODE_PORT=str(port),
                HER2LOW_NODE_HOST="127.0.0.1",
                HER2LOW_NODE_QUIET_SECONDS="3600",
                HER2LOW_LOG_LEVEL="WARNING",
            )
            subprocess.run(
                [PY, "-m", "her2low", "db", "upgrade"], env=env, check=True, capture_output=True
            )
            cmd = [PY, "-m", "her2low", "node"]
            called = "HER2LOW"
        env["TCP_NODELAY"] = "1"  # DCMTK's receiver waits on Nagle too without it
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port)
            times.append(send(folder, port, called))
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        stored = [
            p for p in work.rglob("*") if p.is_file() and (p.suffix == ".dcm" or name == "storescp")
        ]
        if name != "node":
            assert len(stored) >= n, f"{name} stored {len(stored)} of {n}"
        else:
            assert len([p for p in (work / "dicom").rglob("*.dcm")]) == n
        shutil.rmtree(work, ignore_errors=True)
    return n / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-series-") as tmp:
        folder = Path(tmp)
        write_series(folder, args.images)
        rates = {
            name: run_target(name, folder, args.images, args.repeats)
            for name in ("storescp", "bare", "bare+fsync", "node")
        }
    print(
        f"images: {args.images} x 256x256x16 bit, median of {args.repeats} runs, storescu with TCP_NODELAY=1"
    )
    for name, rate in rates.items():
        print(f"  {name:9s} {rate:8.1f} images/s")
    print(f"  node / bare pynetdicom : {rates['node'] / rates['bare']:.2f}  (goal >= 0.9)")
    print(
        f"  node / bare + fsync    : {rates['node'] / rates['bare+fsync']:.2f}  (same durability)"
    )
    print(f"  node / DCMTK storescp  : {rates['node'] / rates['storescp']:.2f}  (goal >= 0.5)")


if __name__ == "__main__":
    main()
