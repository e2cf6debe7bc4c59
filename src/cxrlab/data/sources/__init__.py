"""Data sources: ``KIND:LOCATION`` → ``Records`` (labels and metadata only; images stay on disk).

Kinds: ``nih:``, ``chexpert:``, ``mimic:``, ``csv:``, ``folder:`` and ``synthetic:``. Every source
returns raw label values (1, 0, -1, NaN) and meta columns ``path`` (absolute), ``patient_id``,
``study_id``, ``view`` (PA, AP, Lateral, ...), ``frontal_lateral`` (frontal, lateral, other, unknown)
and, where the dataset has an official split, ``split`` (train, val, test); where the label file gives
them (NIH, CheXpert, a CSV's ``sex``/``age`` columns), ``sex`` (female, male, unknown) and ``age``
(years, NaN unknown) for subgroup evaluation.
"""
from __future__ import annotations

from ...errors import CxrlabError, unknown
from ..records import Records
from ..synthetic import load_synthetic
from ._common import filter_views
from .chexpert import load_chexpert
from .generic import load_csv, load_folder
from .mimic import LABELLERS, load_mimic
from .nih import load_nih

KINDS = ("nih", "chexpert", "mimic", "csv", "folder", "synthetic")

__all__ = ["KINDS", "LABELLERS", "filter_views", "load_chexpert", "load_csv", "load_folder", "load_mimic",
           "load_nih", "parse_source"]


def parse_source(spec: str, views=None, labeller: str = "chexpert", labels=None, duplicates: str = "warn") -> Records:
    """Load ``KIND:LOCATION``, e.g. ``nih:/data/ChestX-ray14`` or ``folder:./scans``.

    ``views``: None keeps every view; else "frontal", "lateral", a view position ("PA") or a list or
    comma-separated string of them. ``labeller``: MIMIC's chexpert or negbio labels. ``labels``: the
    label columns of a ``csv:`` source, or the label space a ``folder:`` source reports. ``duplicates``:
    ``warn`` or ``drop`` exact duplicate rows of a ``csv:``, ``nih:`` or ``chexpert:`` source (rows that
    list one image with another patient or other labels are an error in each).
    """
    kind, location = split_spec(spec)
    if kind == "nih":
        return load_nih(location, views, duplicates=duplicates)
    if kind == "chexpert":
        return load_chexpert(location, views, duplicates=duplicates)
    if kind == "mimic":
        return load_mimic(location, views, labeller=labeller)
    if kind == "csv":
        return load_csv(location, views, labels=labels, duplicates=duplicates)
    if kind == "folder":
        return load_folder(location, views, labels=labels)
    return filter_views(load_synthetic(location), views)


def split_spec(spec: str) -> tuple[str, str]:
    """``"nih:/data/x"`` → ("nih", "/data/x"), with errors for a missing colon or an unknown kind."""
    if not isinstance(spec, str) or ":" not in spec:
        raise CxrlabError(f"data source {spec!r}: expected KIND:LOCATION, e.g. nih:/data/ChestX-ray14 "
                          f"(kinds: {', '.join(KINDS)})")
    kind, location = spec.split(":", 1)
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise unknown("data source kind", kind, KINDS)
    if not location.strip() and kind != "synthetic":
        raise CxrlabError(f"data source {spec!r}: no location after '{kind}:'")
    return kind, location.strip()
