"""What a source holds: images, patients, views and per-label counts (``cxrlab data stats``)."""
from __future__ import annotations

import numpy as np

from .policies import PolicyResult
from .records import Records

COUNT_KEYS = ("positive", "negative", "uncertain", "unknown")


def data_stats(records: Records, result: PolicyResult | None = None) -> dict:
    """Counts of images, patients, views and, per label, positive/negative/uncertain/unknown: of the
    raw values, or after a policy (nothing is uncertain any more; masked labels count as unknown)."""
    if result is not None:
        records = records.take(result.rows)
    meta = records.meta
    views = meta["view"].fillna("unknown").value_counts()
    stats = {
        "n_images": int(len(records)),
        "n_patients": int(meta["patient_id"].nunique()),
        "views": {str(k): int(v) for k, v in views.items()},
        "labels": {},
    }
    names = records.labels.names if result is None else result.labels.names
    for j, name in enumerate(names):
        if result is None:
            column = records.values[:, j]
            counts = (column == 1, column == 0, column == -1, np.isnan(column))
        else:
            known, positive = result.mask[:, j] == 1, result.target[:, j] == 1
            counts = (known & positive, known & ~positive, np.zeros(len(known), bool), ~known)
        stats["labels"][name] = {key: int(np.sum(c)) for key, c in zip(COUNT_KEYS, counts)}
    return stats


def format_stats(stats: dict, source: str = "") -> str:
    """Plain-text tables of ``data_stats``. Two shares per label, since they differ wildly where blanks
    are common (raw CheXpert "No Finding": 98.98 % of its labelled images, 8.9 % of all images): the
    positive share of labelled images (positive / (positive + negative + uncertain); blanks excluded) and
    the image prevalence (positive / all images)."""
    lines = [f"source: {source}", f"images: {stats['n_images']:,}", f"patients: {stats['n_patients']:,}",
             "views: " + ", ".join(f"{k} {v:,}" for k, v in stats["views"].items()), ""]
    width = max([len("label")] + [len(n) for n in stats["labels"]])
    lines.append(f"{'label':<{width}}  " + "  ".join(f"{k:>10}" for k in COUNT_KEYS)
                 + "  pos/labelled  pos/images")
    for name, c in stats["labels"].items():
        known = c["positive"] + c["negative"] + c["uncertain"]
        labelled = f"{100 * c['positive'] / known:11.2f}%" if known else f"{'-':>12}"
        images = f"{100 * c['positive'] / stats['n_images']:9.2f}%" if stats["n_images"] else f"{'-':>10}"
        lines.append(f"{name:<{width}}  " + "  ".join(f"{c[k]:>10,}" for k in COUNT_KEYS) + f"  {labelled}  {images}")
    lines += ["", "pos/labelled: positive share of the images labelled for it (positive, negative or uncertain; "
              "blanks left out). pos/images: image prevalence, positive / all images."]
    return "\n".join(lines)
