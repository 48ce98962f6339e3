"""Jobs: stability timers, the queue, one analysis job from claim to publication.

:mod:`.scheduler` turns quiet series into jobs, :mod:`.taskqueue` wakes workers, :mod:`.runner`
claims and runs a job through :mod:`.pipeline`, and :mod:`.publish` sends the result to the CDS service.
"""
