"""``cxrlab ensemble CKPT1 CKPT2 ... --out DIR [--weights 2,1]``: fuse trained models (see cxrlab.ensemble)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_ensemble_command(sub) -> None:
    p = sub.add_parser("ensemble", help="one checkpoint averaging the probabilities of several (predict, "
                                        "evaluate, heatmap and export accept it)")
    p.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint or run folders")
    p.add_argument("--out", type=Path, required=True, help="the ensemble folder to write (must not exist)")
    p.add_argument("--weights", help="comma-separated positive weights, one per checkpoint (default equal)")
    p.add_argument("--missing-thresholds", type=float, default=None, metavar="T",
                   help="threshold for the labels of a member without fitted ones (a last/ checkpoint); without "
                        "it such a member is refused")
    p.set_defaults(func=_ensemble)


def _ensemble(args: argparse.Namespace) -> int:
    from ..workflows.deploy import ensemble  # lazy: start-up time (torch), for every command

    out = ensemble(args.checkpoints, args.out, args.weights, args.missing_thresholds)
    print(f"ensemble of {len(args.checkpoints)} models: {out}")
    return 0
