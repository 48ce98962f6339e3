"""Compressed and uncompressed transfer syntaxes in, decodable pixels out (PS3.5 Section 8, 10).

A small DWI series is encoded with DCMTK (or pydicom/pylibjpeg for JPEG 2000), sent by
``storescu`` proposing that syntax (pynetdicom where storescu has no option for it), and must be
stored in the syntax received and decode, through pydicom and ``assemble_dwi``, to the original
pixels (lossless) or close to them (lossy).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE
from sqlalchemy import select

from dicom_node.db import Instance
from dicom_node.series.assemble import assemble_dwi
from her2low.core.database import make_engine, session_factory
from her2low.core.settings import load_settings
from tests import dicom_builders as b
from tests.conftest import require_tool
from tests.test_node_security import running_scp

pytestmark = pytest.mark.integration

_ENV = {**os.environ, "TCP_NODELAY": "1"}
GRID = b.Grid(rows=32, cols=64, n_slices=4)  # OpenJPEG needs >= 32 pixels a side


@dataclass(frozen=True)
class Case:
    name: str
    syntax: UID
    #: DCMTK command converting ``in out`` (None: keep / use ``encode``); lossy ones keep the
    #: SOPInstanceUID (``+un``) so that stored images can be matched to their originals
    convert: tuple[str, ...] | None = None
    #: storescu proposal option; None sends with pynetdicom, proposing exactly ``syntax``
    propose: str | None = None
    encode: Callable[[Dataset], None] | None = None
    #: largest allowed pixel difference (0: lossless)
    tolerance: int = 0
    eight_bit: bool = False


CASES = [
    Case("implicit-vr", ImplicitVRLittleEndian, ("dcmconv", "+ti"), "-xi"),
    Case("explicit-vr", ExplicitVRLittleEndian, None, "-xe"),
    Case("deflate", DeflatedExplicitVRLittleEndian, ("dcmconv", "+td"), "-xd"),
    Case("jpeg-lossless-sv1", JPEGLosslessSV1, ("dcmcjpeg", "+e1"), "-xs"),
    Case("jpeg-lossless", JPEGLossless, ("dcmcjpeg", "+el")),
    Case("jpeg-ls-lossless", JPEGLSLossless, ("dcmcjpls", "+el"), "-xt"),
    Case(
        "jpeg-ls-near-lossless", JPEGLSNearLossless, ("dcmcjpls", "+en", "+un"), "-xu", tolerance=2
    ),
    Case("rle", RLELossless, ("dcmcrle",), "-xr"),
    Case(
        "jpeg2000-lossless",
        JPEG2000Lossless,
        propose="-xv",
        encode=lambda ds: ds.compress(JPEG2000Lossless, generate_instance_uid=False),
    ),
    Case(
        "jpeg2000-lossy",
        JPEG2000,
        propose="-xw",
        encode=lambda ds: ds.compress(JPEG2000, j2k_psnr=[90.0], generate_instance_uid=False),
        tolerance=16,
    ),
    Case(
        "jpeg-baseline",
        JPEGBaseline8Bit,
        ("dcmcjpeg", "+eb", "+q", "95", "+sr", "+un"),
        "-xy",
        tolerance=16,
        eight_bit=True,
    ),
]


def _series(eight_bit: bool) -> list[Dataset]:
    vols = b.volumes(GRID, [(0.0, [None]), (500.0, [None]), (1000.0, [None])])
    series = b.classic_series(GRID, vols, manufacturer="SIEMENS")
    if eight_bit:  # JPEG baseline carries 8-bit samples only (PS3.5 A.4.1)
        for ds in series:
            ds.PixelData = (ds.pixel_array // 8).astype(np.uint8).tobytes()
            ds.BitsAllocated = ds.BitsStored = 8
            ds.HighBit = 7
    return series


def _run(*args: str) -> None:
    require_tool(args[0])
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, env=_ENV)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout}\n{result.stderr}"


def _prepare(case: Case, originals: list[Dataset], folder: Path) -> list[Path]:
    plain, encoded = folder / "plain", folder / "encoded"
    encoded.mkdir(parents=True)
    paths = []
    for ds in originals:
        name = f"{ds.SOPInstanceUID}.dcm"
        source = b.write(ds, plain / name)
        target = encoded / name
        if case.encode is not None:
            copy = pydicom.dcmread(source)
            case.encode(copy)
            copy.save_as(target, enforce_file_format=True)
        elif case.convert is not None:
            _run(*case.convert, str(source), str(target))
        else:
            target.write_bytes(source.read_bytes())
        assert pydicom.dcmread(target).file_meta.TransferSyntaxUID == case.syntax
        paths.append(target)
    return paths


def _send_storescu(port: int, option: str, folder: Path) -> None:
    _run("storescu", "-aet", "PEER", "-aec", "HER2LOW", option, "+sd", "127.0.0.1", str(port),
         str(folder))  # fmt: skip


def _send_pynetdicom(port: int, syntax: UID, paths: list[Path]) -> None:
    from pynetdicom import _config

    ae = AE(ae_title="PEER")
    ae.add_requested_context(b.MR_IMAGE_STORAGE, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="HER2LOW")
    assert assoc.is_established
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # the file's bytes as they are
    try:
        for path in paths:
            assert int(assoc.send_c_store(path).Status) == 0x0000
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        assoc.release()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_syntax_is_stored_as_received_and_decodes(case: Case, home: Path, tmp_path: Path) -> None:
    originals = _series(case.eight_bit)
    paths = _prepare(case, originals, tmp_path)
    with running_scp(home) as port:
        if case.propose is None:
            _send_pynetdicom(port, case.syntax, paths)
        else:
            _send_storescu(port, case.propose, paths[0].parent)

    settings = load_settings()
    with session_factory(make_engine(settings.node_database_url))() as session:
        rows = session.scalars(select(Instance)).all()
    assert len(rows) == len(originals)
    assert {r.transfer_syntax_uid for r in rows} == {case.syntax}

    expected = {str(ds.SOPInstanceUID): ds.pixel_array.astype(np.int32) for ds in originals}
    stored = [pydicom.dcmread(r.path) for r in rows]
    for ds in stored:
        assert ds.file_meta.TransferSyntaxUID == case.syntax
        diff = np.abs(ds.pixel_array.astype(np.int32) - expected[str(ds.SOPInstanceUID)])
        assert int(diff.max()) <= case.tolerance

    volume = assemble_dwi(stored)
    reference = assemble_dwi(originals)
    np.testing.assert_array_equal(volume.bvals, reference.bvals)
    assert volume.data.shape == reference.data.shape == (GRID.n_slices, GRID.rows, GRID.cols, 3)
    np.testing.assert_allclose(volume.data, reference.data, rtol=0, atol=case.tolerance)
