"""Results in the languages clinical systems speak: DICOM Structured Reports (``dicom_sr``, for PACS) and
FHIR R4B resources (``fhir``, for EHRs), from the probabilities ``cxrlab predict`` and ``serve`` compute.

Both need the optional extra ``interop`` (highdicom, fhir.resources); they are imported only when a
writer is used, so ``predict --format csv`` and the rest of cxrlab never need them. This module holds
what both writers share: the model's identity, the per-label findings and the research-only statement.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from ... import __version__
from ...errors import CxrlabError

FORMATS = ("csv", "json", "dicom-sr", "fhir")
STATEMENT = "Research use only, not for diagnosis: output of a research model (cxrlab), not a medical device."
INSTALL = "pip install 'cxrlab[interop]'"


def require(module: str):
    """Import an optional dependency of the interop formats, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CxrlabError(f"this output format needs {module.split('.')[0]}, which is not installed: "
                          f"{INSTALL}") from None


@dataclass(frozen=True)
class ModelIdentity:
    """How a report names the algorithm that produced it: ``name`` (recipe, backbones, head),
    ``version`` (the cxrlab version that trained or exported it) and ``sha256`` (of the weights, or of
    the ONNX file for an export)."""

    name: str
    version: str
    sha256: str


def model_identity(predictor) -> ModelIdentity:
    card, identity = predictor.card, predictor.identity or {}
    parts = [card.training.recipe or "model", "+".join(card.backbones), card.head]
    name = " ".join(p for p in parts if p)
    version = card.versions.get("cxrlab") or identity.get("cxrlab_version") or __version__
    sha = identity.get("sha256") if identity.get("format") == "onnx" else identity.get("weights_sha256")
    return ModelIdentity(name=name, version=str(version), sha256=sha or identity.get("sha256") or "unknown")


@dataclass(frozen=True)
class Finding:
    """One label's result for one image: its probability, the threshold it is decided at, the decision."""

    label: str
    probability: float
    threshold: float

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold


def findings(label_names, probs, thresholds) -> list[Finding]:
    return [Finding(str(n), float(p), float(t)) for n, p, t in zip(label_names, probs, thresholds)]
