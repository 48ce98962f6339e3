"""Result objects: what writing them adds to the analysis, and what sending them costs.

One run, on the demo's synthetic study (Siemens, mass, SNR 30, 24 × 96 × 192, 6 b-values):

(a) the analysis alone (automatic ROI, so that a SEG is written too) against building and
    writing the SR, the SEG, the three Parametric Maps and the Key Object Selection (goal: adds
    at most 1 s), in wall clock and in CPU time (the latter barely moves when other processes
    share the machine);
(b) sending those six files to a loopback Orthanc with the node's SCU
    (:func:`dicom_node.jobs.export_scu.store_files`) against DCMTK ``storescu`` sending the same
    files (goal: ratio ≤ 1). Both on one association each, ``TCP_NODELAY=1`` for DCMTK.

    .venv/bin/python benchmarks/bench_outputs.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom

# the checkout (for the tests' Orthanc peer, as bench_scaled does) and this folder (_local)
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from dicom_node.analysis.outputs import build_outputs  # noqa: E402
from dicom_node.analysis.series_analysis import analyse  # noqa: E402
from dicom_node.jobs.export_scu import SendOutcome, store_files  # noqa: E402
from dicom_node.series.assemble import assemble_dwi  # noqa: E402
from dicom_node.synth import write_study  # noqa: E402
from tests.orthanc_peer import orthanc_server  # noqa: E402


def _median(times: list[float]) -> float:
    return statistics.median(times)


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
        assert len(files) == 6, files  # SR, SEG, 3 maps, KOS
        a, o = _median(t_analysis), _median(t_objects)
        print(f"analysis alone            {a:7.3f} s (median of {args.repeats})")
        print(f"SR+SEG+3 maps+KOS written {o:7.3f} s  -> adds {o:.3f} s, ratio {o / a:.2f}×")
        print(f"  of which built in memory {_median(t_build):7.3f} s, the rest writing files")
        ca, co = _median(cpu_analysis), _median(cpu_objects)
        print(f"  CPU time (robust to other load): analysis {ca:.3f} s, objects {co:.3f} s")
        print(f"  goal: adds ≤ 1 s: {'met' if o <= 1.0 else 'NOT met'} (wall clock)")

        with orthanc_server(root / "orthanc", name="bench") as orthanc:
            port = orthanc.dicom_port
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
            n = len(orthanc.get("/instances"))
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
