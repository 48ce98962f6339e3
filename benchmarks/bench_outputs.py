"""Result objects: what writing them adds to the analysis, and what sending them costs.

One run, on the demo's synthetic study (Siemens, mass, SNR 30, 24 × 96 × 192, 6 b-values):

(a) the analysis alone (automatic ROI, so that a SEG is written too) against building and
    writing the SR, the SEG and the three Parametric Maps (goal: adds at most 1 s), in wall
    clock and in CPU time (the latter barely moves when other processes share the machine);
(b) sending those five files to a loopback Orthanc with the node's SCU
    (:func:`dicom_node.jobs.export_scu.store_files`) against DCMTK ``storescu`` sending the same
    files (goal: ratio ≤ 1). Both on one association each, ``TCP_NODELAY=1`` for DCMTK.

    .venv/bin/python benchmarks/bench_outputs.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _local import free_port

from dicom_node.analysis.outputs import build_outputs
from dicom_node.analysis.series_analysis import analyse
from dicom_node.jobs.export_scu import SendOutcome, store_files
from dicom_node.series.assemble import assemble_dwi
from dicom_node.synth import write_study


def _median(times: list[float]) -> float:
    return statistics.median(times)


def start_orthanc(folder: Path) -> tuple[subprocess.Popen[bytes], str, int]:
    folder.mkdir(parents=True)
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "bench",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
    }
    (folder / "config.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115
    exe = shutil.which("Orthanc") or "Orthanc"
    proc = subprocess.Popen([exe, str(folder / "config.json")], cwd=folder, stdout=log, stderr=log)
    http = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            requests.get(http + "/system", timeout=1)
            return proc, http, dicom_port
        except requests.RequestException:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("Orthanc did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = write_study(root / "study", seed=0, lesion="mass", snr=30.0, vendor="siemens")
        datasets = [pydicom.dcmread(root / "study" / f) for f in manifest.dwi.files]
        dwi = assemble_dwi(datasets)
        analysis = analyse(dwi)  # warm-up (imports, numba/JIT caches)
        build_outputs(analysis, dwi, datasets).write(root / "warm")

        t_analysis: list[float] = []
        t_objects: list[float] = []
        t_build: list[float] = []
        files: list[Path] = []
        cpu_analysis: list[float] = []
        cpu_objects: list[float] = []
        for i in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            analysis = analyse(dwi)
            t1, c1 = time.perf_counter(), time.process_time()
            objects = build_outputs(analysis, dwi, datasets)
            t_build.append(time.perf_counter() - t1)
            files = objects.write(root / f"out{i}")
            t2, c2 = time.perf_counter(), time.process_time()
            t_analysis.append(t1 - t0)
            t_objects.append(t2 - t1)
            cpu_analysis.append(c1 - c0)
            cpu_objects.append(c2 - c1)
        assert len(files) == 5, files
        a, o = _median(t_analysis), _median(t_objects)
        print(f"analysis alone            {a:7.3f} s (median of {args.repeats})")
        print(f"SR + SEG + 3 maps written {o:7.3f} s  -> adds {o:.3f} s, ratio {o / a:.2f}×")
        print(f"  of which built in memory {_median(t_build):7.3f} s, the rest writing files")
        ca, co = _median(cpu_analysis), _median(cpu_objects)
        print(f"  CPU time (robust to other load): analysis {ca:.3f} s, objects {co:.3f} s")
        print(f"  goal: adds ≤ 1 s: {'met' if o <= 1.0 else 'NOT met'} (wall clock)")

        proc, http, port = start_orthanc(root / "orthanc")
        try:
            t_ours: list[float] = []
            t_dcmtk: list[float] = []
            env = {**os.environ, "TCP_NODELAY": "1"}

            def ours() -> float:
                t0 = time.perf_counter()
                result = store_files(
                    files, host="127.0.0.1", port=port, called_aet="ORTHANC", calling_aet="HER2LOW"
                )
                assert result.outcome is SendOutcome.SUCCESS, result.message
                return time.perf_counter() - t0

            def dcmtk() -> float:
                t0 = time.perf_counter()
                subprocess.run(
                    ["storescu", "-R", "-aet", "BENCH", "-aec", "ORTHANC", "127.0.0.1", str(port)]
                    + [str(f) for f in files],
                    check=True,
                    capture_output=True,
                    env=env,
                )
                return time.perf_counter() - t0

            for i in range(2 * args.repeats):  # alternate who goes first (Orthanc warms up)
                if i % 2:
                    t_dcmtk.append(dcmtk())
                    t_ours.append(ours())
                else:
                    t_ours.append(ours())
                    t_dcmtk.append(dcmtk())
            n = len(requests.get(http + "/instances", timeout=10).json())
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        mine, theirs = _median(t_ours), _median(t_dcmtk)
        size = sum(f.stat().st_size for f in files) / 1e6
        print(f"send {len(files)} files ({size:.1f} MB) to loopback Orthanc ({n} instances kept):")
        print(f"  node SCU (pynetdicom)   {mine:7.3f} s (median of {len(t_ours)})")
        print(
            f"  DCMTK storescu          {theirs:7.3f} s  -> ratio node/storescu {mine / theirs:.2f}"
        )
        print(f"  goal: ratio ≤ 1: {'met' if mine <= theirs else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
