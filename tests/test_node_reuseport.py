"""Several `her2low node` processes can share one DICOM port (HER2LOW_NODE_REUSE_PORT).

Scaling ingest past one process's GIL means several node processes on the same port, the
kernel spreading connections between them; without SO_REUSEPORT the second one cannot bind.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE

from her2low.core.ports import free_port

PY = sys.executable
CALLING = "BENCH"


def _env(home: Path, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HER2LOW_HOME=str(home),
        HER2LOW_NODE_HOST="127.0.0.1",
        HER2LOW_NODE_PORT=str(port),
        HER2LOW_NODE_REUSE_PORT="true",
        HER2LOW_NODE_METRICS_PORT="0",
        HER2LOW_NODE_QUIET_SECONDS="3600",
        HER2LOW_LOG_LEVEL="WARNING",
        # limits are per process; raised so the test can hold many associations at once
        HER2LOW_NODE_MAX_ASSOCIATIONS="40",
        HER2LOW_NODE_MAX_ASSOCIATIONS_PER_AET="40",
        HER2LOW_NODE_MAX_ASSOCIATIONS_PER_HOST="40",
    )
    return env


def _instance(study: str, series: str, number: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = "MR"
    ds.PatientID = "REUSEPORT"
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(128)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _wait_echo(port: int, timeout: float = 30) -> None:
    ae = AE(ae_title=CALLING)
    ae.add_requested_context("1.2.840.10008.1.1")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assoc = ae.associate("127.0.0.1", port, ae_title="HER2LOW")
        if assoc.is_established:
            assoc.release()
            return
        time.sleep(0.2)
    raise AssertionError(f"no node answers on {port}")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_reuse_port_off_refuses_a_second_listener(tmp_path: Path) -> None:
    """Control: a plain listener cannot join an SO_REUSEPORT one, so the option is what works."""
    from dicom_node.receiving.scp import NodeServer, SharedPortNodeServer

    assert NodeServer.reuse_port is False
    assert SharedPortNodeServer.reuse_port is True
    port = free_port()
    first = socket.socket()
    first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    first.bind(("127.0.0.1", port))
    first.listen()
    try:
        plain = socket.socket()
        plain.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
        plain.close()
    finally:
        first.close()


def _sockets(pid: int, port: int, state: str = "01") -> int:
    """TCP sockets on local ``port`` held by process ``pid`` (Linux /proc; 01 established,
    0A listening)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, inode = fields[1], fields[9]
        if int(local.split(":")[1], 16) == port and fields[3] == state and inode in inodes:
            count += 1
    return count


def test_two_node_processes_share_one_port_and_lose_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    port = free_port()
    env = _env(home, port)
    subprocess.run([PY, "-m", "her2low", "db", "upgrade"], env=env, check=True, capture_output=True)
    procs: list[subprocess.Popen[bytes]] = []
    sent: list[str] = []
    try:
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [PY, "-m", "her2low", "node"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
            )
        _wait_echo(port)
        deadline = time.monotonic() + 30
        while not all(_sockets(p.pid, port, "0A") for p in procs):
            assert all(p.poll() is None for p in procs), "a node process exited (port in use?)"
            assert time.monotonic() < deadline, "a node process never listened"
            time.sleep(0.2)

        study, series = generate_uid(), generate_uid()
        ae = AE(ae_title=CALLING)
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        open_assocs = []
        try:
            # hold associations open until both processes serve some (the kernel hashes the
            # 4-tuple: 24 connections all on one of two listeners has odds 2**-23)
            for a in range(24):
                assoc = ae.associate("127.0.0.1", port, ae_title="HER2LOW")
                assert assoc.is_established
                open_assocs.append(assoc)
                ds = _instance(study, series, a + 1)
                assert assoc.send_c_store(ds).Status == 0x0000
                sent.append(ds.SOPInstanceUID)
            held = [_sockets(p.pid, port) for p in procs]
        finally:
            for assoc in open_assocs:
                assoc.release()
        assert sum(held) == len(open_assocs), held
        assert all(n > 0 for n in held), f"one process served everything: {held}"
    finally:
        _stop(procs)
    for proc in procs:
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        assert "Traceback" not in stderr, stderr[-2000:]
    stored = sorted(p.name.removesuffix(".dcm") for p in (home / "dicom").rglob("*.dcm"))
    assert stored == sorted(sent)
