"""The ``her2low`` command line, ``up`` and ``demo``: the roof, the only code importing both the
node and the service. What both components import lives in :mod:`her2low.core`."""

__version__ = "0.1.0"
