"""``cxrlab data stats`` and ``cxrlab data split``: look at a source and freeze its CV folds.

Both read label files only, so they run in seconds on 200k-row datasets.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..errors import unknown
from .policies import POLICIES, PolicyResult, apply_policy
from .records import Records
from .sources import LABELLERS, parse_source

COUNT_KEYS = ("positive", "negative", "uncertain", "unknown")


def add_data_commands(subparsers) -> None:
    """Add ``data stats`` and ``data split`` to the CLI's subparsers."""
    data = subparsers.add_parser("data", help="inspect a data source; write cross-validation splits")

    def usage(_args) -> int:  # `cxrlab data` alone
        data.print_help()
        return 2

    data.set_defaults(func=usage)
    sub = data.add_subparsers(dest="data_command")

    p = sub.add_parser("stats", help="images, patients, views and per-label counts of a source")
    _source_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=_stats)

    p = sub.add_parser("split", help="write a patient-disjoint, stratified R×K fold manifest (CSV)")
    _source_args(p)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="manifest CSV to write")
    p.set_defaults(func=_split)


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="KIND:LOCATION, e.g. nih:/data/ChestX-ray14, chexpert:/data/CheXpert-v1.0-small")
    p.add_argument("--policy", default=None,
                   help=f"label policy to apply first ({', '.join(POLICIES)}); default: raw values")
    p.add_argument("--views", default=None, help="frontal, lateral, or view positions, e.g. PA,AP (default: all)")
    p.add_argument("--labeller", default="chexpert", help=f"MIMIC labels: {' or '.join(LABELLERS)}")


def load(args) -> tuple[Records, PolicyResult | None]:
    """The (view-filtered) records of the source and, with --policy, the policy's result."""
    if args.policy and args.policy not in POLICIES:  # fail before a long load
        raise unknown("label policy", args.policy, POLICIES)
    records = parse_source(args.source, views=args.views, labeller=args.labeller)
    if not args.policy:
        return records, None
    return records, apply_policy(records.values, records.labels, args.policy, seed=getattr(args, "seed", 0))


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
    """Plain-text tables of ``data_stats``."""
    lines = [f"source: {source}", f"images: {stats['n_images']:,}", f"patients: {stats['n_patients']:,}",
             "views: " + ", ".join(f"{k} {v:,}" for k, v in stats["views"].items()), ""]
    width = max([len("label")] + [len(n) for n in stats["labels"]])
    lines.append(f"{'label':<{width}}  " + "  ".join(f"{k:>10}" for k in COUNT_KEYS) + "  prevalence")
    for name, c in stats["labels"].items():
        known = c["positive"] + c["negative"] + c["uncertain"]
        prevalence = f"{100 * c['positive'] / known:9.2f}%" if known else "         -"
        lines.append(f"{name:<{width}}  " + "  ".join(f"{c[k]:>10,}" for k in COUNT_KEYS) + f"  {prevalence}")
    return "\n".join(lines)


def _stats(args) -> int:
    stats = data_stats(*load(args))
    print(json.dumps(stats) if args.json else format_stats(stats, args.source))
    return 0


def _split(args) -> int:
    from .splits import repeated_kfold, write_manifest

    records, result = load(args)
    if result is None:
        strata = records.values == 1
    else:
        records, strata = records.take(result.rows), (result.target * result.mask) > 0
    manifest = repeated_kfold(records, target=strata, folds=args.folds, repeats=args.repeats, seed=args.seed)
    write_manifest(manifest, args.out)
    sizes = manifest[manifest["repeat"] == 0].groupby("fold").size()
    print(f"wrote {args.out}: {args.repeats} × {args.folds} folds over {len(records):,} images of "
          f"{records.meta['patient_id'].nunique():,} patients (fold sizes in repeat 0: "
          f"{', '.join(str(int(s)) for s in sizes)})")
    return 0
