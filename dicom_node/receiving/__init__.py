"""Receiving: the DICOM network service (C-ECHO, C-STORE), who may associate, TLS, durable storage and indexing.

An instance enters at :mod:`.scp`, is checked by :mod:`.access`, written by :mod:`.storage` and
indexed by :mod:`.ingest`; :mod:`.status` names the DIMSE statuses the node answers with.
"""
