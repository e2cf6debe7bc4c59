"""``predict --format csv|json|dicom-sr|fhir`` and ``serve``'s ``/predict?format=``: what each format needs
before inference (the DICOM headers an SR references; the optional packages) and how it is written.

csv: the predictions table (``inference.predictions``); json: the same results as ``serve`` answers
them; dicom-sr: a folder with one SR per image (``dicom_sr``); fhir: one R4B Bundle file (``fhir``).
An image that could not be read gets no SR and no DiagnosticReport; it is named on stderr as for csv.
"""
from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from ...errors import CxrlabError, unknown
from ...paths import check_output_dir, check_output_file
from ..predictions import predictions_table, write_predictions
from . import FORMATS, STATEMENT, findings, model_identity, require
from . import dicom_sr, fhir


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise unknown("output format", fmt, FORMATS)
    return fmt


def check_out(fmt: str, out: Path, overwrite: bool) -> Path:
    """Where ``fmt`` writes: a folder for dicom-sr (one SR per image), a file otherwise."""
    if check_format(fmt) == "dicom-sr":
        return check_output_dir(out, overwrite=overwrite, what="DICOM SR folder")
    return check_output_file(out, overwrite=overwrite, what="predictions file" if fmt == "csv" else f"{fmt} file")


def sources(fmt: str, files, generate_uids: bool = False, data: list[bytes] | None = None) -> list | None:
    """Before inference: the DICOM header each image's report references (None for a PNG/JPEG in FHIR;
    refused in an SR unless ``generate_uids``), with the optional packages checked. None for csv/json."""
    if fmt == "dicom-sr":
        require("highdicom")
        return dicom_sr.sources_for(files, generate_uids, data)
    if fmt == "fhir":
        require("fhir.resources")
        return [_header(f if data is None else data[i]) for i, f in enumerate(files)]
    return None


def _header(source):
    try:
        return dicom_sr.read_source(source)
    except Exception:  # noqa: BLE001 - an unreadable DICOM: its row says why (the predictor fails on it too)
        return None


def results_json(names, probs: np.ndarray, errors: list[str], predictor) -> dict:
    """Per image: every label's probability, threshold and decision (``serve``'s answer, as a file)."""
    model = model_identity(predictor)
    results = []
    for name, row, error in zip(names, probs, errors):
        labels = None if error else [{"label": f.label, "probability": f.probability, "threshold": f.threshold,
                                      "positive": f.positive}
                                     for f in findings(predictor.label_names, row, predictor.thresholds)]
        results.append({"file": str(name), "labels": labels, "error": error or None})
    return {"model": {"name": model.name, "version": model.version, "sha256": model.sha256},
            "threshold_source": predictor.threshold_source, "statement": STATEMENT, "results": results}


def write(fmt: str, out: Path, files, probs: np.ndarray, errors: list[str], predictor, headers=None):
    """Write ``fmt`` at ``out``; returns the predictions table (the csv's rows, whatever the format)."""
    if fmt == "csv":
        return write_predictions(out, files, probs, errors, predictor.label_names, predictor.thresholds)
    table = predictions_table(files, probs, errors, predictor.label_names, predictor.thresholds)
    for path, error in zip(files, errors):
        if error:
            print(f"predict: cannot read {path}: {error}", file=sys.stderr)
    out = Path(out)
    if fmt == "json":
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(results_json(files, probs, errors, predictor), indent=1) + "\n")
        os.replace(tmp, out)
    elif fmt == "dicom-sr":
        for path, sr in _srs(files, probs, errors, predictor, headers):
            dicom_sr.write_sr(sr, out / _sr_name(Path(path), out))
    elif fmt == "fhir":
        fhir.write_bundle(_bundle(files, probs, errors, predictor, headers), out)
    return table


def _srs(names, probs, errors, predictor, headers):
    model = model_identity(predictor)
    for name, row, error, header in zip(names, probs, errors, headers):
        if not error:
            yield name, dicom_sr.build_sr(header, findings(predictor.label_names, row, predictor.thresholds), model)


def _sr_name(path: Path, folder: Path) -> str:
    """``<stem>_sr.dcm``, numbered when two inputs share a stem."""
    name, k = f"{path.stem}_sr.dcm", 1
    while (folder / name).exists():
        k += 1
        name = f"{path.stem}_{k}_sr.dcm"
    return name


def _bundle(names, probs, errors, predictor, headers):
    images = [(Path(str(n)).name, h, findings(predictor.label_names, row, predictor.thresholds))
              for n, row, e, h in zip(names, probs, errors, headers) if not e]
    return fhir.build_bundle(images, model_identity(predictor), predictor.threshold_source)


HTTP_FORMATS = ("json", "dicom-sr", "fhir")


def http_sources(fmt: str, names, data: list[bytes], generate_uids: bool = False) -> list | None:
    """``serve``: the format checked and the uploads' DICOM headers (see :func:`sources`)."""
    if fmt not in HTTP_FORMATS:
        raise unknown("format", fmt, HTTP_FORMATS)
    return sources(fmt, names, generate_uids, data)


def http_body(fmt: str, names, probs: np.ndarray, errors: list[str], predictor, headers) -> tuple[bytes, str]:
    """``serve``'s answer in ``fmt`` (dicom-sr or fhir): the body and its media type. Several SRs come as
    one ZIP; an image that could not be read is left out (its error is in the JSON format's answer)."""
    if fmt == "fhir":
        return fhir.bundle_json(_bundle(names, probs, errors, predictor, headers)).encode(), "application/fhir+json"
    srs = list(_srs(names, probs, errors, predictor, headers))
    if not srs:
        raise CxrlabError("no image could be read, so there is no SR to return")
    if len(srs) == 1:
        return dicom_sr.sr_bytes(srs[0][1]), "application/dicom"
    buffer, used = io.BytesIO(), set()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, sr in srs:
            stem, k = Path(str(name)).stem, 1
            entry = f"{stem}_sr.dcm"
            while entry in used:
                k += 1
                entry = f"{stem}_{k}_sr.dcm"
            used.add(entry)
            archive.writestr(entry, dicom_sr.sr_bytes(sr))
    return buffer.getvalue(), "application/zip"
