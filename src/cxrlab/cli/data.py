"""``cxrlab data stats``, ``cxrlab data split`` and ``cxrlab prepare``: look at a source, freeze its CV
folds, build its image cache. Stats and split read label files only, so they run in seconds on 200k rows.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import unknown
from ..data.cache import MODES, ON_ERROR, prepare
from ..data.policies import POLICIES, PolicyResult, apply_policy
from ..data.records import Records
from ..data.sources import LABELLERS, parse_source
from ..data.statistics import data_stats, format_stats


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


def _stats(args) -> int:
    stats = data_stats(*load(args))
    print(json.dumps(stats) if args.json else format_stats(stats, args.source))
    return 0


def _split(args) -> int:
    from ..data.splits import fold_balance, repeated_kfold, write_manifest

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
    for repeat in range(args.repeats):
        fold = manifest["fold"].to_numpy()[manifest["repeat"].to_numpy() == repeat]
        b = fold_balance(fold, strata, label_names=records.labels.names)
        print(f"repeat {repeat}: worst fold deviation of a label's image prevalence "
              f"{100 * b['worst_prevalence_deviation']:.2f} % ({b['worst_label']}; {b['labels_checked']} labels "
              f"with >= {b['min_positives']:,} positive images), of a fold's size "
              f"{100 * b['worst_size_deviation']:.2f} %")
    return 0


def add_prepare_command(subparsers) -> argparse.ArgumentParser:
    """``cxrlab prepare SOURCE --size N --out DIR [--mode pad|crop] [--workers W] [--on-error skip|fail]
    [--views ...]``."""
    p = subparsers.add_parser("prepare", help="decode a source once into a fixed-size uint8 cache for training")
    p.add_argument("source", help="KIND:LOCATION, e.g. nih:/data/ChestX-ray14 or synthetic:3000")
    p.add_argument("--size", type=int, required=True, help="side of the square cached images, in pixels")
    p.add_argument("--out", type=Path, required=True, help="cache folder to create")
    p.add_argument("--mode", choices=MODES, default="pad",
                   help="pad: keep the whole image, black borders (default); crop: centre crop")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: one per usable CPU)")
    p.add_argument("--on-error", choices=ON_ERROR, default="skip",
                   help="skip: list unreadable images in failed.csv and go on (default); fail: stop")
    p.add_argument("--views", default=None, help="keep these views only, e.g. frontal or PA,AP")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_prepare_command)
    return p


def _prepare_command(args) -> int:
    records = parse_source(args.source, views=args.views)
    info = prepare(records, args.out, args.size, mode=args.mode, workers=args.workers, on_error=args.on_error,
                   progress=not args.quiet)
    state = "reused existing cache" if info.reused else "wrote"
    print(f"{state} {args.out}: {info.n} images of {info.size}×{info.size} ({info.mode}), "
          f"{info.n_failed} failed, labels {info.labels.name}")
    return 0
