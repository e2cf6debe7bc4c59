"""The arguments of ``cxrlab data stats``, ``cxrlab data split`` and ``cxrlab prepare``; the work is in
``cxrlab.workflows.data``."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..workflows import data as workflow
from ..workflows.data import LABELLERS, MODES, ON_ERROR, POLICIES


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


def _stats(args) -> int:
    print(workflow.source_stats(args.source, args.policy, args.views, args.labeller, as_json=args.json))
    return 0


def _split(args) -> int:
    print(workflow.split_source(args.source, args.out, folds=args.folds, repeats=args.repeats, seed=args.seed,
                                policy=args.policy, views=args.views, labeller=args.labeller))
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
    print(workflow.prepare_source(args.source, args.out, args.size, mode=args.mode, workers=args.workers,
                                  on_error=args.on_error, views=args.views, progress=not args.quiet))
    return 0
