"""Ingest throughput: DCMTK storescu sends one 500-image series to three receivers in one run.

(a) DCMTK storescp, (b) a bare pynetdicom SCP that only writes bytes, (b') the same bare SCP
fsyncing each file before answering (the least any durable receiver must do), (c) our node with its
default durability (``node_durability=file``: fsync + atomic rename, lost renames recovered at
start) and indexing (SQLite in WAL mode, ``synchronous=NORMAL``).
Prints images/s and the ratios the issue sets goals for (node ≥ 0.9× bare, ≥ 0.5× storescp).

Scaled mode: ``--associations 4`` splits the series over 4 storescu processes sending at once
(storescp then runs with ``--fork``, one process per association); ``--node-processes N`` adds
(d) N node processes sharing the port (HER2LOW_NODE_REUSE_PORT, SO_REUSEPORT) and one database.

    .venv/bin/python benchmarks/bench_ingest.py [--images 500] [--repeats 3]
    .venv/bin/python benchmarks/bench_ingest.py --images 200 --repeats 1 \
        --associations 4 --node-processes 2
    .venv/bin/python benchmarks/bench_ingest.py --images 200 --associations 40 --one-after-another

``--one-after-another`` sends the parts one association after the other (a PACS routing series
by series), so each receiver's association set-up cost is part of the rate.
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


def split(folder: Path, parts: int) -> list[Path]:
    """Hard-link the series' files round-robin into ``parts`` folders, one per association."""
    files = sorted(folder.glob("*.dcm"))
    if parts == 1:
        return [folder]
    out = [folder.parent / f"{folder.name}-part{k}" for k in range(parts)]
    for part in out:
        part.mkdir()
    for i, path in enumerate(files):
        os.link(path, out[i % parts] / path.name)
    return out


def send(folders: list[Path], port: int, called: str, one_after_another: bool = False) -> float:
    """storescu, one process (one association) per folder, all at once; wall time of all.

    ``one_after_another``: each association starts when the previous one ended, as a PACS
    routing series by series does; then the association set-up cost shows.
    """
    if one_after_another:
        return sum(send([folder], port, called) for folder in folders)
    env = {**os.environ, "TCP_NODELAY": "1"}
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
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
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for folder in folders
    ]
    failed = []
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failed.append(err.decode()[-500:])
    if failed:
        raise RuntimeError(f"storescu failed: {failed[0]}")
    return time.perf_counter() - start


def _listening(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a listening TCP socket on ``port`` (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            inodes.add(os.readlink(fd).removeprefix("socket:[").rstrip("]"))
        except OSError:
            continue
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A" and fields[9] in inodes:
            return True
    return False


def run_target(
    name: str,
    folders: list[Path],
    n: int,
    repeats: int,
    processes: int = 1,
    one_after_another: bool = False,
) -> float:
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
            ] + (["--fork"] if len(folders) > 1 else [])
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
                HER2LOW_NODE_METRICS_PORT="0",
                HER2LOW_NODE_REUSE_PORT="true" if processes > 1 else "false",
            )
            subprocess.run(
                [PY, "-m", "her2low", "db", "upgrade"], env=env, check=True, capture_output=True
            )
            cmd = [PY, "-m", "her2low", "node"]
            called = "HER2LOW"
        env["TCP_NODELAY"] = "1"  # DCMTK's receiver waits on Nagle too without it
        procs = [
            subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(processes)
        ]
        try:
            wait_port(port)
            deadline = time.monotonic() + 60
            while processes > 1 and not all(_listening(p.pid, port) for p in procs):
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"{name}: not every node process listens on {port}")
                time.sleep(0.1)
            times.append(send(folders, port, called, one_after_another))
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=10)
        stored = [
            p for p in work.rglob("*") if p.is_file() and (p.suffix == ".dcm" or name == "storescp")
        ]
        if not name.startswith("node"):
            assert len(stored) >= n, f"{name} stored {len(stored)} of {n}"
        else:
            assert len([p for p in (work / "dicom").rglob("*.dcm")]) == n
        shutil.rmtree(work, ignore_errors=True)
    return n / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--associations", type=int, default=1, help="concurrent storescu associations"
    )
    parser.add_argument(
        "--node-processes",
        type=int,
        default=1,
        help="also measure this many node processes sharing the port (SO_REUSEPORT)",
    )
    parser.add_argument(
        "--one-after-another",
        action="store_true",
        help="send the --associations parts one after another instead of at once",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-series-") as tmp:
        folder = Path(tmp) / "series"
        folder.mkdir()
        write_series(folder, args.images)
        folders = split(folder, args.associations)
        rates = {
            name: run_target(
                name, folders, args.images, args.repeats, one_after_another=args.one_after_another
            )
            for name in ("storescp", "bare", "bare+fsync", "node")
        }
        if args.node_processes > 1:
            scaled = f"node x{args.node_processes}"
            rates[scaled] = run_target(
                scaled, folders, args.images, args.repeats, args.node_processes
            )
    print(
        f"images: {args.images} x 256x256x16 bit, median of {args.repeats} runs, "
        f"{args.associations} {'successive' if args.one_after_another else 'concurrent'} "
        "storescu association(s) with TCP_NODELAY=1; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    for name, rate in rates.items():
        print(f"  {name:10s} {rate:8.1f} images/s")
    print(f"  node / bare pynetdicom : {rates['node'] / rates['bare']:.2f}  (goal >= 0.9)")
    print(
        f"  node / bare + fsync    : {rates['node'] / rates['bare+fsync']:.2f}  (same durability)"
    )
    print(f"  node / DCMTK storescp  : {rates['node'] / rates['storescp']:.2f}  (goal >= 0.5)")
    if args.node_processes > 1:
        several = rates[f"node x{args.node_processes}"]
        print(f"  node x{args.node_processes} / node        : {several / rates['node']:.2f}")
        print(f"  node x{args.node_processes} / storescp    : {several / rates['storescp']:.2f}")


if __name__ == "__main__":
    main()
