"""The QC gate: a result whose image quality cannot carry the features gets no likelihood.

The node measures (``provenance.qc``, ``provenance.roi``, ``provenance.b_values``); the thresholds
are the service's ``cds_qc_*`` settings. Each failed check gives the reason with the measured
value and the threshold, and what to do about it — the card and the review case page show both,
instead of a number built on noise. A metric an older node did not send is not checked.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from her2low.core.settings import Settings
from models.contract import Provenance

__all__ = ["QcFailure", "QcThresholds", "evaluate"]


class QcFailure(BaseModel):
    """One failed check: which, why (measured vs threshold) and what to do."""

    model_config = ConfigDict(frozen=True)

    check: str
    reason: str
    action: str

    @property
    def text(self) -> str:
        return f"{self.reason}: {self.action}"


@dataclass(frozen=True)
class QcThresholds:
    """The ``cds_qc_*`` settings (defaults: those of :class:`Settings`)."""

    min_snr_high_b: float = 3.0
    min_roi_voxels: int = 20
    max_fraction_at_bound: float = 0.25
    min_high_b: float = 1000.0
    min_b_values: int = 4
    max_fit_residual: float = 0.15

    @classmethod
    def from_settings(cls, settings: Settings) -> QcThresholds:
        return cls(
            min_snr_high_b=settings.cds_qc_min_snr_high_b,
            min_roi_voxels=settings.cds_qc_min_roi_voxels,
            max_fraction_at_bound=settings.cds_qc_max_fraction_at_bound,
            min_high_b=settings.cds_qc_min_high_b,
            min_b_values=settings.cds_qc_min_b_values,
            max_fit_residual=settings.cds_qc_max_fit_residual,
        )


def _distinct(b_values: tuple[float, ...]) -> list[float]:
    """b-values grouped within 5 % (b < 5 s/mm² counts as 0), as the node's b levels."""
    levels: list[float] = []
    for b in sorted(0.0 if v < 5 else float(v) for v in b_values):
        if not levels or b > levels[-1] * 1.05 + 1e-9:
            levels.append(b)
    return levels


def evaluate(provenance: Provenance, limits: QcThresholds) -> list[QcFailure]:
    """The failed checks of one result, in a fixed order (empty: it may be scored)."""
    qc = provenance.qc
    out: list[QcFailure] = []
    levels = _distinct(provenance.b_values)
    high_b = qc.high_b if qc.high_b is not None else max(levels)
    if len(levels) < limits.min_b_values:
        shown = ", ".join(f"{b:g}" for b in levels)
        out.append(
            QcFailure(
                check="b_values",
                reason=f"the series has {len(levels)} distinct b-values ({shown} s/mm2), "
                f"fewer than {limits.min_b_values}",
                action="acquire the DWI with the site's DKI protocol (e.g. b = 0, 50, 800, "
                "1000, 1500, 2000 s/mm2) or send the complete series",
            )
        )
    if high_b < limits.min_high_b:
        out.append(
            QcFailure(
                check="high_b",
                reason=f"the highest b-value is {high_b:g} s/mm2, below {limits.min_high_b:g}",
                action="kurtosis needs high b: repeat the DWI with b up to at least "
                f"{limits.min_high_b:g} s/mm2 (protocol: up to 2000)",
            )
        )
    if qc.snr_high_b is not None and qc.snr_high_b < limits.min_snr_high_b:
        out.append(
            QcFailure(
                check="snr_high_b",
                reason=f"SNR at b={high_b:g} is {qc.snr_high_b:.1f}, below "
                f"{limits.min_snr_high_b:g}",
                action="repeat the DWI or check the coil (more averages at high b)",
            )
        )
    voxels = provenance.roi.voxels
    if voxels < limits.min_roi_voxels:
        out.append(
            QcFailure(
                check="roi_voxels",
                reason=f"the tumour ROI has {voxels} voxels, fewer than {limits.min_roi_voxels}",
                action="check the ROI: send a SEG outlining the whole tumour from the viewer",
            )
        )
    fraction = qc.fraction_at_bound
    if fraction is not None and fraction > limits.max_fraction_at_bound:
        out.append(
            QcFailure(
                check="fraction_at_bound",
                reason=f"{fraction:.0%} of the ROI voxels sit on a fit bound, more than "
                f"{limits.max_fraction_at_bound:.0%}",
                action="the DKI fit is dominated by noise: repeat the DWI with more averages, "
                "or check the ROI lies on tumour",
            )
        )
    residual = qc.fit_residual
    if residual is not None and limits.max_fit_residual > 0 and residual > limits.max_fit_residual:
        out.append(
            QcFailure(
                check="fit_residual",
                reason=f"the DKI fit residual is {residual:.1%} of S0, above "
                f"{limits.max_fit_residual:.0%}",
                action="look for motion or misregistration between b-values and repeat the DWI",
            )
        )
    return out
