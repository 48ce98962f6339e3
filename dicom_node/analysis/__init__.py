"""Analysis: the science. DKI and ADC fits, the tumour ROI, IBSI histogram features and previews.

The DKI fit (:mod:`.dki`) keeps its numeric kernels in :mod:`.dki_kernels` and the noise σ and
background mask in :mod:`.noise`. :mod:`.series_analysis` runs them for one DWI series;
:mod:`.cohort` is the offline ``her2low fit``.
"""
