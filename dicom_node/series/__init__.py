"""Series: from stored DICOM headers to an understood series.

What a series is for (:mod:`.roles`), its diffusion b-values on every vendor's export and the one
b-value grouping rule (:mod:`.bvalues`, :mod:`.csa`), whether it has fully arrived
(:mod:`.completeness`), and the volume with its geometry: every 2-D image as a frame
(:mod:`.frames`), their slices and volumes (:mod:`.layout`), the decoded trace-weighted volume
(:mod:`.assemble`, :mod:`.volume`). :mod:`.headers` reads plain values the same way everywhere;
:mod:`.inspection` is ``her2low inspect``.
"""
