"""``python -m dicom_node [node|worker]``: the DICOM node or a worker (``her2low node|worker``)."""

from dicom_node.processes import main

raise SystemExit(main())
