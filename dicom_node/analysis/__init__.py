"""Analysis: the science. DKI and ADC fits, the tumour ROI, IBSI histogram features and previews.

:mod:`.series_analysis` runs them for one DWI series; :mod:`.cohort` is the offline ``her2low fit``.
"""
