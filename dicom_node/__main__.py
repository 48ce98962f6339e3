"""``python -m dicom_node``: the DICOM node (same as ``her2low node``)."""

from her2low.cli import main

raise SystemExit(main(["node"]))
