"""Glue shared by node and service: settings, logging and the ``her2low`` command line."""

__version__ = "0.1.0"
