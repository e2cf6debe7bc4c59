"""One DICOM Comprehensive SR per input image (TID 1500 Measurement Report, written with highdicom).

The SR belongs to the source image's patient and study (highdicom copies them from the source header)
and references its study, series and SOP instance (evidence sequence and each group's source image).
It holds one measurement group per label: tracking identifier = the label, finding type = the label
(local coding scheme ``99CXRLAB``), numeric measurements "Probability" and "Threshold Value",
a qualitative evaluation Present/Absent (probability >= threshold) and the algorithm identification
(the model's name, version and SHA-256). A TEXT item and the series description carry the research-use
statement, and the SR is flagged PARTIAL / UNVERIFIED: nobody has signed it.

A PNG or JPEG has no UIDs to reference: it is refused unless ``generated_uids`` asks for an SR about a
made-up study (new UIDs, no patient), which must not be mistaken for one about a real examination.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from ...errors import CxrlabError
from . import STATEMENT, Finding, ModelIdentity, require

SCHEME = "99CXRLAB"  # a local coding scheme: the labels have no standard codes (99 = private prefix)
SERIES_DESCRIPTION = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS (cxrlab)"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MADE_UP = "Study, series and instance UIDs made up by cxrlab (--generate-uids) for the non-DICOM file"


def read_source(source) -> object | None:
    """The DICOM header of a file path or its bytes (pixels not read), or None when it is not DICOM."""
    try:
        return pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else str(source),
                               stop_before_pixels=True)
    except pydicom.errors.InvalidDicomError:
        return None


def made_up_source(name: str):
    """A stand-in header for a PNG/JPEG: new study/series/instance UIDs, no patient (asked for only)."""
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SECONDARY_CAPTURE, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "", "", "", ""
    ds.StudyID, ds.AccessionNumber, ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "", "", "", "", ""
    ds.Modality = "OT"
    ds.ImageComments = f"{MADE_UP} {name}"
    return ds


def sources_for(paths, generated_uids: bool, data: list[bytes] | None = None) -> list:
    """The header each input's SR will reference (``data``: the files' bytes, for uploads); a PNG/JPEG
    is an error naming it, unless ``generated_uids``. Checked before any inference."""
    out = []
    for i, path in enumerate(paths):
        ds = read_source(path if data is None else data[i])
        if ds is None:
            if not generated_uids:
                raise CxrlabError(f"{path}: not a DICOM file, so a DICOM SR has no study, series or instance to "
                                  "reference; give DICOM images, or pass --generate-uids for an SR with made-up UIDs")
            ds = made_up_source(Path(path).name)
        else:
            missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
                       if not ds.get(k)]
            if missing:
                raise CxrlabError(f"{path}: DICOM header lacks {', '.join(missing)}, which the SR must reference")
        out.append(ds)
    return out


def _label(name: str):
    hd = require("highdicom")
    return hd.sr.CodedConcept(value=name, scheme_designator=SCHEME, meaning=name.replace("_", " "))


def build_sr(source, results: list[Finding], model: ModelIdentity, series_number: int = 1):
    """The SR (a pydicom Dataset, highdicom's ComprehensiveSR) for one image's ``results``."""
    hd = require("highdicom")

    algorithm = hd.sr.AlgorithmIdentification(name=model.name, version=model.version,
                                              parameters=[f"sha256={model.sha256}"], manufacturer="cxrlab")
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[model.sha256]), name=model.name[:64], manufacturer_name="cxrlab",
        model_name=model.name[:64])
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    image = hd.sr.SourceImageForMeasurementGroup(referenced_sop_class_uid=source.SOPClassUID,
                                                 referenced_sop_instance_uid=source.SOPInstanceUID)
    unit = codes.UCUM.NoUnits
    groups = []
    for r in results:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=r.label),
            finding_type=_label(r.label), algorithm_id=algorithm, source_images=[image],
            measurements=[hd.sr.Measurement(name=codes.DCM.Probability, value=r.probability, unit=unit),
                          hd.sr.Measurement(name=codes.DCM.ThresholdValue, value=r.threshold, unit=unit)],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                name=_label(r.label), value=codes.SCT.Present if r.positive else codes.SCT.Absent)]))
    report = hd.sr.MeasurementReport(
        observation_context=context, imaging_measurements=groups,
        procedure_reported=hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray"))
    # TID 1500 is extensible: the research-use statement as a TEXT item of the report's root container
    report[0].ContentSequence.append(hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=STATEMENT, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    if str(source.get("ImageComments", "")).startswith(MADE_UP):  # say so inside the SR too
        report[0].ContentSequence.append(hd.sr.TextContentItem(
            name=codes.DCM.Comment, value=source.ImageComments,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    with warnings.catch_warnings():  # the source's patient name is copied as it is, one component or not
        warnings.filterwarnings("ignore", message=".*intended person name")
        return hd.sr.ComprehensiveSR(
            evidence=[source], content=report[0], series_instance_uid=generate_uid(), series_number=series_number,
            sop_instance_uid=generate_uid(), instance_number=1, manufacturer="cxrlab", is_complete=True,
            is_final=False, is_verified=False, series_description=SERIES_DESCRIPTION)


def write_sr(sr, path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        sr.save_as(str(tmp), enforce_file_format=True)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def sr_bytes(sr) -> bytes:
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
