"""``python -m her2low``: the same as the ``her2low`` command."""

from her2low.cli import main

raise SystemExit(main())
