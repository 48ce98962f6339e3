"""A real Orthanc (Debian package ``orthanc``) as the PACS peer of tests and benchmarks.

One place for the configuration and the wait-until-up that the routing, export and STOW-RS
tests and ``benchmarks/bench_outputs.py`` share. Orthanc runs on free loopback ports in a
folder of its own, in its own process group (:func:`tests.system.popen_group`), and is stopped
when the context exits. ``dicomweb=True`` loads the DICOMweb plugin (Debian package
``orthanc-dicomweb``; ``scripts/system-deps.sh``) so the peer also answers STOW-RS at
:attr:`OrthancPeer.dicomweb`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from her2low.core.ports import free_port
from tests.system import popen_group, stop_group

__all__ = ["DICOMWEB_PLUGIN", "OrthancPeer", "OrthancUnavailable", "orthanc_server"]

#: Where Debian's ``orthanc-dicomweb`` installs the plugin.
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class OrthancUnavailable(RuntimeError):
    """Orthanc (or its DICOMweb plugin) is not installed, or it did not start."""


@dataclass(frozen=True)
class OrthancPeer:
    """A running Orthanc: its REST base URL, DICOM port and AE title, and its folder."""

    http: str
    dicom_port: int
    aet: str
    folder: Path

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root (``…/dicom-web``); STOW-RS is ``POST {dicomweb}/studies``."""
        return self.http + "/dicom-web"

    def get(self, path: str) -> Any:
        response = requests.get(self.http + path, timeout=10)
        response.raise_for_status()
        return response.json()

    def find_instance(self, sop_uid: str) -> list[str]:
        """Orthanc ids of the instances with this SOP Instance UID (one, or none)."""
        response = requests.post(
            self.http + "/tools/find",
            json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}},
            timeout=10,
        )
        response.raise_for_status()
        return list(response.json())

    def store(self, files: Sequence[Path], *, calling_aet: str = "MODALITY") -> None:
        """Send files with DCMTK ``storescu``, as a modality would (one association)."""
        args = ["-aet", calling_aet, "-aec", self.aet, "-xe", "-R", "127.0.0.1"]
        result = subprocess.run(
            ["storescu", *args, str(self.dicom_port), *map(str, files)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        if result.returncode != 0:
            raise AssertionError(f"storescu failed: {result.stderr[-2000:]}")

    def log(self) -> str:
        path = self.folder / "orthanc.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _wait_up(http: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            requests.get(http + "/system", timeout=1).raise_for_status()
            return
        except requests.RequestException:
            if time.monotonic() > deadline or proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise OrthancUnavailable(f"Orthanc did not start: {tail}") from None
            time.sleep(0.2)


@contextmanager
def orthanc_server(
    folder: Path,
    *,
    name: str = "her2low-test-pacs",
    aet: str = "ORTHANC",
    dicomweb: bool = False,
    config: Mapping[str, Any] | None = None,
    timeout: float = 30.0,
) -> Iterator[OrthancPeer]:
    """Orthanc on free loopback ports with its storage under ``folder`` (created).

    ``config`` entries are merged over the defaults (e.g. ``DicomCheckCalledAet``,
    ``DicomModalities``, ``LuaScripts``, ``StableAge``). Orthanc's own HTTPS is not offered:
    the web server of Debian's Orthanc 1.10 crashed (segfault) on the first TLS request here,
    so an HTTPS peer is this one behind an nginx TLS front. Raises :class:`OrthancUnavailable`
    when the program or the plugin is missing or Orthanc does not answer within ``timeout``.
    """
    exe = shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None
    )
    if exe is None:
        raise OrthancUnavailable("Orthanc is not installed (Debian package orthanc)")
    if dicomweb and not DICOMWEB_PLUGIN.exists():
        raise OrthancUnavailable(
            "the Orthanc DICOMweb plugin is not installed (Debian package orthanc-dicomweb)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    settings: dict[str, Any] = {
        "Name": name,
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
    }
    if dicomweb:
        settings["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
    settings.update(config or {})
    (folder / "config.json").write_text(json.dumps(settings, indent=2))
    log_path = folder / "orthanc.log"
    with open(log_path, "wb") as log:
        proc = popen_group([exe, str(folder / "config.json")], cwd=folder, stdout=log, stderr=log)
        try:
            http = f"http://127.0.0.1:{http_port}"
            _wait_up(http, proc, log_path, timeout)
            yield OrthancPeer(http=http, dicom_port=dicom_port, aet=aet, folder=folder)
        finally:
            stop_group(proc, timeout=10)
