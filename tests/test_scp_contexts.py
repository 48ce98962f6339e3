"""The node server's cheap per-association copy of its presentation contexts."""

from __future__ import annotations

import copy
from pathlib import Path

from pydicom.uid import UID

from dicom_node.receiving import scp
from her2low.core.settings import load_settings


def test_each_association_gets_an_independent_equal_copy_of_the_contexts(home: Path) -> None:
    contexts = scp.PresentationContexts(scp.build_ae(load_settings()).supported_contexts)
    copies = copy.deepcopy(contexts)

    assert len(copies) == len(contexts) > 100
    for original, twin in zip(contexts, copies, strict=True):
        assert twin is not original
        assert vars(twin) == vars(original)
        assert twin.transfer_syntax == original.transfer_syntax
        assert all(isinstance(ts, UID) for ts in twin.transfer_syntax)
    # what pynetdicom changes on its copy during negotiation stays on the copy
    copies[0].transfer_syntax.append(UID("1.2.3"))
    copies[0].result = 0
    copies[0].scp_role = True
    assert "1.2.3" not in contexts[0].transfer_syntax
    assert contexts[0].result is None
    assert contexts[0].scp_role is None


def test_the_server_holds_its_contexts_in_the_cheap_copying_list() -> None:
    server = scp.NodeServer.__new__(scp.NodeServer)
    server.contexts = []
    assert isinstance(server.contexts, scp.PresentationContexts)
