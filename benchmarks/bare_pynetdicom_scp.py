"""The peer for the ingest benchmark: a bare pynetdicom SCP that only writes the bytes it gets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.events import Event


def main() -> None:
    port, out = int(sys.argv[1]), Path(sys.argv[2])
    durable = "--fsync" in sys.argv[3:]
    out.mkdir(parents=True, exist_ok=True)

    def handle_store(event: Event) -> int:
        uid = event.request.AffectedSOPInstanceUID
        with open(out / f"{uid}.dcm", "wb") as fh:
            fh.write(event.encoded_dataset(include_meta=True))
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        return 0x0000

    ae = AE(ae_title="BARE")
    ae.maximum_pdu_size = 0
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context("1.2.840.10008.1.1")
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, handle_store)])


if __name__ == "__main__":
    main()
