"""Results for clinical systems, on the real DICOM fixture: ``predict --format dicom-sr`` writes an SR that
pydicom and highdicom read back with the source's patient, study, series and instance, and one group per
label (probability, threshold, Present/Absent, algorithm name/version/SHA-256); ``--format fhir`` writes
an R4B Bundle that fhir.resources validates on reading; ``serve`` answers both for ``/predict?format=``."""
from __future__ import annotations

import io
import json
import sys

import pytest
from test_export import LABELS, one_thread, tiny_checkpoint  # noqa: F401 (autouse)

from cxrlab.cli import main
from cxrlab.errors import CxrlabError

hd = pytest.importorskip("highdicom")
pytest.importorskip("fhir.resources")
import pydicom  # noqa: E402

from cxrlab.inference.interop import STATEMENT  # noqa: E402
from cxrlab.inference.interop import fhir as fhir_io  # noqa: E402

THRESHOLDS = (0.3, 0.5, 0.6)
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
MODEL_NAME = "recipe test_resnet linear"  # recipe name (from_dict's default), backbone, head


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("interop") / "ckpt", thresholds=THRESHOLDS)


@pytest.fixture(scope="module")
def dcm(shared_data):
    return shared_data / "dicom" / "siim_pneumothorax_example.dcm"


def weights_sha(ckpt) -> str:
    return json.loads((ckpt / "checkpoint.json").read_text())["files"]["model.safetensors"]["sha256"]


def probabilities(ckpt, files, tmp_path) -> dict:
    """label -> probability per file, from the CSV path (the reference every format must repeat)."""
    from cxrlab.workflows.predict import predict_files

    table = predict_files(ckpt, files, tmp_path / "ref.csv")
    return {row["path"]: {n: float(row[n]) for n in LABELS} for _, row in table.iterrows()}


def content_text(items, meaning: str) -> list[str]:
    """Values of the content items (recursively) whose concept name has ``meaning``."""
    out = []
    for item in items:
        if item.ConceptNameCodeSequence[0].CodeMeaning == meaning:
            out.append(str(getattr(item, "TextValue", "")))
        out += content_text(getattr(item, "ContentSequence", []), meaning)
    return out


def check_sr(ds, source, probs: dict, sha: str) -> None:
    """Every field the SR promises, against the source header, the CSV probabilities and the checkpoint."""
    assert ds.SOPClassUID == COMPREHENSIVE_SR
    for key in ("PatientID", "StudyInstanceUID", "StudyDate"):  # the source's patient and study
        assert ds[key].value == source[key].value
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID  # its own series in that study
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    series = evidence.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPClassUID == source.SOPClassUID
    assert "RESEARCH USE ONLY" in ds.SeriesDescription
    assert (ds.CompletionFlag, ds.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert STATEMENT in content_text(ds.ContentSequence, "Comment")
    assert content_text(ds.ContentSequence, "Algorithm Name") == [MODEL_NAME] * len(LABELS)
    assert set(content_text(ds.ContentSequence, "Algorithm Parameters")) == {f"sha256={sha}"}

    report = hd.sr.srread(io.BytesIO(_bytes(ds))) if not isinstance(ds, hd.sr.ComprehensiveSR) else ds
    groups = report.content.get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == list(LABELS)
    for group, label, threshold in zip(groups, LABELS, THRESHOLDS):
        assert group.finding_type.value == label and group.finding_type.scheme_designator == "99CXRLAB"
        values = {m.name.meaning: m.value for m in group.get_measurements()}
        assert values["Probability"] == pytest.approx(probs[label], abs=1e-6)
        assert values["Threshold Value"] == pytest.approx(threshold)
        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.value.meaning == ("Present" if probs[label] >= threshold else "Absent")
        assert [s.referenced_sop_instance_uid for s in group.source_images] == [source.SOPInstanceUID]


def _bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def test_dicom_sr_from_a_real_dicom(ckpt, dcm, tmp_path):
    probs = probabilities(ckpt, [dcm], tmp_path)[str(dcm)]
    assert main(["predict", str(ckpt), str(dcm), "--out", str(tmp_path / "sr"), "--format", "dicom-sr"]) == 0
    (written,) = (tmp_path / "sr").iterdir()
    assert written.name == "siim_pneumothorax_example_sr.dcm"
    ds = pydicom.dcmread(written)
    check_sr(ds, pydicom.dcmread(dcm, stop_before_pixels=True), probs, weights_sha(ckpt))


def test_dicom_sr_refuses_a_png_unless_uids_are_generated(ckpt, shared_data, tmp_path, capsys):
    png = shared_data / "nih" / "00000001_000.png"
    out = tmp_path / "sr"
    assert main(["predict", str(ckpt), str(png), "--out", str(out), "--format", "dicom-sr"]) == 2
    err = capsys.readouterr().err
    assert "00000001_000.png: not a DICOM file" in err and "--generate-uids" in err
    assert not list(out.glob("*.dcm"))

    assert main(["predict", str(ckpt), str(png), "--out", str(out), "--format", "dicom-sr", "--generate-uids"]) == 0
    ds = pydicom.dcmread(out / "00000001_000_sr.dcm")
    assert pydicom.uid.UID(ds.StudyInstanceUID).is_valid and ds.PatientID == ""
    assert any("made up by cxrlab" in t and "00000001_000.png" in t for t in content_text(ds.ContentSequence, "Comment"))


def test_fhir_bundle_validated_and_read_back(ckpt, dcm, shared_data, tmp_path):
    png = shared_data / "nih" / "00000001_000.png"
    probs = probabilities(ckpt, [dcm, png], tmp_path)
    out = tmp_path / "results.json"
    assert main(["predict", str(ckpt), str(dcm), str(png), "--out", str(out), "--format", "fhir"]) == 0
    bundle = fhir_io.read_bundle(out)  # fhir.resources' R4B models validate while reading
    assert type(bundle).__module__ == "fhir.resources.R4B.bundle"
    check_bundle(bundle, {dcm.name: probs[str(dcm)], png.name: probs[str(png)]},
                 pydicom.dcmread(dcm, stop_before_pixels=True), weights_sha(ckpt))

    broken = json.loads(out.read_text())  # an Observation without its required status fails validation
    next(e for e in broken["entry"] if e["resource"]["resourceType"] == "Observation")["resource"].pop("status")
    with pytest.raises(Exception, match="status"):
        fhir_io.read_bundle(json.dumps(broken))


def check_bundle(bundle, probs: dict, source, sha: str) -> None:
    by_url = {e.fullUrl: e.resource for e in bundle.entry}
    kinds = [r.__resource_type__ for r in by_url.values()]
    assert bundle.type == "collection" and kinds.count("Device") == 1
    device_url = next(u for u, r in by_url.items() if r.__resource_type__ == "Device")
    device = by_url[device_url]
    assert device.identifier[0].value == sha and device.deviceName[0].name == MODEL_NAME
    assert STATEMENT in device.note[0].text
    reports = [r for r in by_url.values() if r.__resource_type__ == "DiagnosticReport"]
    assert sorted(r.identifier[0].value for r in reports) == sorted(probs)
    for report in reports:
        name = report.identifier[0].value
        observations = [by_url[ref.reference] for ref in report.result]
        assert [o.code.text for o in observations] == list(LABELS)
        for obs, label, threshold in zip(observations, LABELS, THRESHOLDS):
            p = probs[name][label]
            assert float(obs.valueQuantity.value) == pytest.approx(p, abs=1e-6)
            assert (obs.valueQuantity.system, obs.valueQuantity.code) == ("http://unitsofmeasure.org", "1")
            assert obs.interpretation[0].coding[0].code == ("POS" if p >= threshold else "NEG")
            assert obs.device.reference == device_url
            assert f">= {threshold:.6f}" in obs.method.text and sha in obs.method.text
        assert STATEMENT in report.conclusion
        if name.endswith(".dcm"):  # the DICOM study, series and instance the report is about
            study = by_url[report.imagingStudy[0].reference]
            assert study.identifier[0].value == f"urn:oid:{source.StudyInstanceUID}"
            assert study.series[0].uid == source.SeriesInstanceUID
            assert study.series[0].instance[0].uid == source.SOPInstanceUID
            assert study.subject.identifier.value == source.PatientID
            assert all(o.derivedFrom[0].reference == report.imagingStudy[0].reference for o in observations)
        else:
            assert report.imagingStudy is None


def test_serve_answers_dicom_sr_and_fhir(ckpt, dcm, shared_data, tmp_path):
    from fastapi.testclient import TestClient

    from cxrlab.inference.server import create_app

    probs = probabilities(ckpt, [dcm], tmp_path)[str(dcm)]
    source = pydicom.dcmread(dcm, stop_before_pixels=True)
    upload = {"files": ("scan.dcm", dcm.read_bytes(), "application/dicom")}
    with TestClient(create_app(ckpt, workers=1, threads=1)) as client:
        r = client.post("/predict?format=dicom-sr", files=upload)
        assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
        check_sr(pydicom.dcmread(io.BytesIO(r.content)), source, probs, weights_sha(ckpt))

        r = client.post("/predict?format=fhir", files=upload)
        assert r.status_code == 200 and r.headers["content-type"] == "application/fhir+json"
        check_bundle(fhir_io.read_bundle(r.text), {"scan.dcm": probs}, source, weights_sha(ckpt))

        png = shared_data / "nih" / "00000001_000.png"
        r = client.post("/predict?format=dicom-sr", files={"files": ("a.png", png.read_bytes(), "image/png")})
        assert r.status_code == 422 and "a.png: not a DICOM file" in r.json()["detail"]
        r = client.post("/predict?format=dicom-sr&generate_uids=true",
                        files={"files": ("a.png", png.read_bytes(), "image/png")})
        assert r.status_code == 200 and pydicom.dcmread(io.BytesIO(r.content)).SOPClassUID == COMPREHENSIVE_SR
        r = client.post("/predict?format=csv", files=upload)
        assert r.status_code == 422 and "dicom-sr" in r.json()["detail"]


def test_without_the_extra_a_clear_message(ckpt, dcm, tmp_path, monkeypatch):
    from cxrlab.workflows.predict import predict_files

    monkeypatch.setitem(sys.modules, "highdicom", None)  # as if not installed: importing it fails
    with pytest.raises(CxrlabError, match=r"highdicom, which is not installed: pip install 'cxrlab\[interop\]'"):
        predict_files(ckpt, [dcm], tmp_path / "sr", format="dicom-sr")


def test_json_format_from_python_repeats_the_csv(ckpt, dcm, shared_data, tmp_path):
    import cxrlab

    png = shared_data / "nih" / "00000001_000.png"
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    probs = probabilities(ckpt, [dcm, png], tmp_path)
    result = cxrlab.predict(ckpt, [dcm, png, bad], tmp_path / "out.json", format="json")
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["model"]["sha256"] == weights_sha(ckpt) and data["statement"] == STATEMENT
    assert [r["file"] for r in data["results"]] == [str(dcm), str(png), str(bad)]
    for entry in data["results"][:2]:
        for item, threshold in zip(entry["labels"], THRESHOLDS):
            p = probs[entry["file"]][item["label"]]
            assert item["probability"] == pytest.approx(p, abs=1e-6) and item["threshold"] == pytest.approx(threshold)
            assert item["positive"] == (item["probability"] >= threshold)
    assert data["results"][2]["labels"] is None and data["results"][2]["error"]  # unreadable: its reason, no labels
    assert len(result.table) == 3
