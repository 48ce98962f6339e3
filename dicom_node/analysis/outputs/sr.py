"""The TID 1500 Measurement Report of one analysed lesion, as a Comprehensive 3D SR.

One Volumetric ROI Measurements group (TID 1411) references the ROI's SEG segment (the node's
automatic SEG, or the incoming one) and the source series. It holds the ROI volume and, for each
of ADC, Dapp and Kapp, the seven IBSI histogram statistics (coded in :mod:`.codes`, UCUM units),
under one Algorithm Identification (TID 4019: name, pipeline version, and as Algorithm
Parameters the fit method, b-values, σ, discretisation and kurtosis convention). The source
images, the SEG and the Parametric Maps are the evidence. A TEXT item states "reference model,
not clinically validated". The node does not have the radiologist's BI-RADS descriptors or the
HER2-low likelihood at analysis time: a likelihood is added only when given (``likelihood``).
Both arrive later from the service and go into a *revised* report of the same SR series
(:mod:`.revision`, driven by :mod:`dicom_node.jobs.assessment_sync`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset

from dicom_node.analysis.features import MAPS, STATISTICS, feature_key
from dicom_node.analysis.outputs import codes as c
from dicom_node.analysis.outputs.context import DISCLAIMER, OutputContext
from dicom_node.analysis.outputs.identification import MANUFACTURER, MODEL_NAME
from dicom_node.analysis.outputs.revision import AssessmentContent, assessment_items, lesion_group
from dicom_node.analysis.series_analysis import Analysis

__all__ = ["Likelihood", "algorithm_parameters", "build_measurement_report", "provenance_dict"]

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass(frozen=True)
class Likelihood:
    """A HER2-low likelihood from the service's model, when one is known (private code)."""

    value: float
    model_name: str
    model_version: str


def provenance_dict(analysis: Analysis) -> dict[str, Any]:
    """The analysis' provenance in its wire (results API) form, whatever its Python type."""
    p = analysis.provenance
    dump = getattr(p, "model_dump", None)
    return dict(dump(mode="json")) if callable(dump) else dict(p)


def algorithm_parameters(ctx: OutputContext) -> list[str]:
    """TID 4019 Algorithm Parameters: everything that changes the numbers (provenance)."""
    a = ctx.analysis
    p = provenance_dict(a)
    disc = p["discretisation"]
    widths = ", ".join(f"{k}={v:g}" for k, v in disc["bin_width"].items())
    roi = p["roi"]
    kurtosis = (p.get("statistics") or {}).get("kurtosis") or a.map_features.settings.get(
        "kurtosis", "excess"
    )
    return [
        f"fit method={p['fit']['method']}",
        f"denoising={p['fit'].get('denoise', 'none')}",
        f"dki b_min={p['fit']['dki_bmin']:g} s/mm2",
        "b-values=" + " ".join(f"{b:g}" for b in p["b_values"]) + " s/mm2",
        "adc b-values=" + " ".join(f"{b:g}" for b in p["adc_b_values"]) + " s/mm2",
        "sigma=" + ("unknown" if a.sigma is None else f"{a.sigma:.6g}"),
        f"discretisation=fixed bin size from {disc['bin_min']:g}; width {widths}",
        f"kurtosis convention={kurtosis}",
        "percentiles=numpy linear interpolation; entropy base 2",
        f"roi={roi['source']}, {'confirmed' if roi['confirmed'] else 'unconfirmed'}",
    ]


def _algorithm(ctx: OutputContext) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name="her2low DKI pipeline",
        version=ctx.analysis.pipeline_version,
        parameters=algorithm_parameters(ctx),
    )


def _measurements(ctx: OutputContext) -> list[hd.sr.Measurement]:
    """ROI volume and the 21 statistics; the group's Algorithm Identification covers them all.

    The maps are listed as evidence, not as "Real World Value Map used for measurement" (that
    concept references RWV Mapping objects, not Parametric Maps).
    """
    f = ctx.analysis.features
    out = [
        hd.sr.Measurement(
            name=c.VOLUME,
            value=float(ctx.analysis.roi.volume_ml),  # 1 ml = 1 cm3
            unit=c.VOLUME_UNIT,
        )
    ]
    for name in MAPS:
        for stat in STATISTICS:
            out.append(
                hd.sr.Measurement(
                    name=c.QUANTITY[name],
                    value=float(f[feature_key(name, stat)]),
                    unit=c.STATISTIC_UNIT[stat] or c.UNIT[name],
                    derivation=c.STATISTIC[stat],
                    method=c.DIFFUSION_MODEL[name],
                )
            )
    return out


def build_measurement_report(
    ctx: OutputContext,
    *,
    seg: Dataset,
    segment_number: int,
    maps: Sequence[Dataset],
    likelihood: Likelihood | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR referencing ``seg`` (its segment ``segment_number``), the maps and the sources."""
    algorithm = _algorithm(ctx)
    site = hd.sr.FindingSite(
        anatomic_location=c.BREAST,
        laterality=c.LATERALITY.get(ctx.laterality),
    )
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=ctx.uid("tracking"), identifier="lesion 1"
        ),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID),
            sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=segment_number,
            source_series=hd.sr.SourceSeriesForSegmentation(ctx.dwi.series_instance_uid),
        ),
        finding_type=c.LESION,
        algorithm_id=algorithm,
        finding_sites=[site],
        measurements=_measurements(ctx),
    )
    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=ctx.uid("device"),
            name=MODEL_NAME,
            manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=c.MR_BREAST,
        imaging_measurements=[group],
    )
    root = report[0]
    root.ContentSequence.append(
        hd.sr.TextContentItem(name=c.COMMENT, value=DISCLAIMER, relationship_type="CONTAINS")
    )
    if likelihood is not None:  # as a revision writes it (:mod:`.revision`)
        group_items, root_items = assessment_items(
            AssessmentContent(
                probability=likelihood.value,
                model_name=likelihood.model_name,
                model_version=likelihood.model_version,
            )
        )
        lesion_group(root).ContentSequence.extend(group_items)
        root.ContentSequence.extend(root_items)
    evidence = [*ctx.sources, seg, *maps]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=root,
        series_instance_uid=ctx.uid("sr", "series"),
        series_number=ctx.series_number(95),
        sop_instance_uid=ctx.uid("sr", "instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.ManufacturerModelName = MODEL_NAME
    sr.SeriesDescription = f"HER2low DKI SR ({DISCLAIMER})"
    scheme = Dataset()
    scheme.CodingSchemeDesignator = c.PRIVATE_SCHEME
    scheme.CodingSchemeName = c.PRIVATE_SCHEME_NAME
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr
