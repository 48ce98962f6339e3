"""Series: from stored DICOM headers to an understood series.

What a series is for (:mod:`.roles`), its diffusion b-values on every vendor's export
(:mod:`.bvalues`, :mod:`.csa`), whether it has fully arrived (:mod:`.completeness`), and the
volume with its geometry (:mod:`.assemble`, :mod:`.volume`). :mod:`.inspection` is ``her2low inspect``.
"""
