"""Named DIMSE statuses the node answers with (PS3.4 Annex B.2.3, PS3.7 Annex C).

Handlers return these members, never bare hex, so a reader sees why a C-STORE failed.
"""

from __future__ import annotations

from enum import IntEnum


class StoreStatus(IntEnum):
    """C-STORE response statuses used by the node."""

    SUCCESS = 0x0000
    #: Refused: Out of Resources (disk full, database unavailable). PS3.4 B.2.3.
    OUT_OF_RESOURCES = 0xA700
    #: Error: Data Set does not match SOP Class.
    DATASET_MISMATCH = 0xA900
    #: Error: Cannot understand.
    CANNOT_UNDERSTAND = 0xC000


class EchoStatus(IntEnum):
    """C-ECHO response statuses."""

    SUCCESS = 0x0000
