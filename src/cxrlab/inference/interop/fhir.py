"""FHIR results: a Bundle (type collection) holding one Device (the model) and, per image, a
DiagnosticReport with one Observation per label, built and validated with fhir.resources.

FHIR version: R4B (4.3.0; ``fhir.resources.R4B``). fhir.resources 8 defaults to R5, which few EHRs
accept; its R4B models are R4's for every resource used here (Bundle, Device, DiagnosticReport,
Observation, ImagingStudy), so a FHIR R4 server reads these resources as they are.

Per label, an Observation: ``code.text`` = the label, ``valueQuantity`` = the probability (UCUM ``1``),
``interpretation`` POS/NEG (v3 ObservationInterpretation) from the threshold, ``method.text`` naming the
model and the threshold with its source, ``device`` = the model's Device, a note with the research-use
statement. A DICOM input adds an ImagingStudy (study, series and instance UIDs, patient by identifier)
that the report and its observations point to; a PNG/JPEG input is named by an identifier instead.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

from . import STATEMENT, Finding, ModelIdentity, require

FHIR_VERSION = "4.3.0"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DICOM_UID = "urn:dicom:uid"
FILE_SYSTEM = "urn:cxrlab:input-file"
SHA256_SYSTEM = "urn:cxrlab:model-sha256"


def _urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def _device(model: ModelIdentity) -> dict:
    return {"resourceType": "Device", "status": "active", "manufacturer": "cxrlab",
            "deviceName": [{"name": model.name, "type": "model-name"}],
            "version": [{"value": model.version}],
            "identifier": [{"system": SHA256_SYSTEM, "value": model.sha256}],
            "type": {"text": "software: chest X-ray multi-label classifier"},
            "note": [{"text": STATEMENT}]}


def _imaging_study(source) -> dict:
    """The DICOM study an input belongs to, by its UIDs (``urn:oid:`` form as FHIR writes them)."""
    patient = {"type": "Patient", "identifier": {"value": str(source.get("PatientID") or "unknown")}}
    instance = {"uid": str(source.SOPInstanceUID), "number": int(source.get("InstanceNumber") or 1),
                "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{source.SOPClassUID}"}}
    series = {"uid": str(source.SeriesInstanceUID), "instance": [instance],
              "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM",
                           "code": str(source.get("Modality") or "OT")}}
    return {"resourceType": "ImagingStudy", "status": "available", "subject": patient,
            "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{source.StudyInstanceUID}"}],
            "series": [series]}


def _observation(r: Finding, model: ModelIdentity, device_ref: str, threshold_source: str, study_ref,
                 subject) -> dict:
    code = "POS" if r.positive else "NEG"
    obs = {"resourceType": "Observation", "status": "preliminary",
           "category": [{"coding": [{"system": CATEGORY, "code": "imaging", "display": "Imaging"}]}],
           "code": {"text": r.label},
           "valueQuantity": {"value": round(r.probability, 6), "unit": "probability",
                             "system": "http://unitsofmeasure.org", "code": "1"},
           "interpretation": [{"coding": [{"system": INTERPRETATION, "code": code,
                                           "display": "Positive" if r.positive else "Negative"}],
                               "text": f"{'positive' if r.positive else 'negative'}: probability "
                                       f"{'>=' if r.positive else '<'} threshold {r.threshold:.6f}"}],
           "method": {"text": f"{model.name} (cxrlab {model.version}, sha256 {model.sha256}): sigmoid probability, "
                              f"positive at >= {r.threshold:.6f} (threshold {threshold_source})"},
           "device": {"reference": device_ref},
           "note": [{"text": STATEMENT}]}
    if study_ref:
        obs["derivedFrom"] = [{"reference": study_ref}]
    if subject:
        obs["subject"] = subject
    return obs


def build_bundle(images: list[tuple[str, object, list[Finding]]], model: ModelIdentity, threshold_source: str):
    """A validated R4B Bundle for ``images``: (file name, DICOM header or None, findings) each."""
    Bundle = require("fhir.resources.R4B.bundle").Bundle
    device_ref = _urn()
    entries = [(device_ref, _device(model))]
    for name, source, results in images:
        study_ref, subject = None, None
        if source is not None:
            study = _imaging_study(source)
            study_ref, subject = _urn(), study["subject"]
            entries.append((study_ref, study))
        observations = [(_urn(), _observation(r, model, device_ref, threshold_source, study_ref, subject))
                        for r in results]
        positives = [r.label for r in results if r.positive] or ["none"]
        report = {"resourceType": "DiagnosticReport", "status": "preliminary",
                  "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                                            "code": "RAD", "display": "Radiology"}]}],
                  "code": {"text": "cxrlab chest X-ray multi-label classification"},
                  "identifier": [{"system": FILE_SYSTEM, "value": name}],
                  "result": [{"reference": ref} for ref, _ in observations],
                  "conclusion": f"Positive at the model's thresholds: {', '.join(positives)}. {STATEMENT}"}
        if study_ref:
            report["imagingStudy"] = [{"reference": study_ref}]
            report["subject"] = subject
        entries += observations + [(_urn(), report)]
    return Bundle.model_validate({"resourceType": "Bundle", "type": "collection",
                                  "entry": [{"fullUrl": ref, "resource": res} for ref, res in entries]})


def bundle_json(bundle) -> str:
    return json.dumps(json.loads(bundle.model_dump_json(exclude_none=True)), indent=1)


def write_bundle(bundle, path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(bundle_json(bundle) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_bundle(path_or_text):
    """A Bundle file (or its JSON text) read back through the R4B models, which validate it."""
    Bundle = require("fhir.resources.R4B.bundle").Bundle
    text = path_or_text if isinstance(path_or_text, str) and path_or_text.lstrip().startswith("{") \
        else Path(path_or_text).read_text()
    return Bundle.model_validate_json(text)
