"""``cxrlab ensemble CKPT1 CKPT2 ... --out DIR [--weights 2,1]``: fuse trained models (see cxrlab.ensemble)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import CxrlabError


def add_ensemble_command(sub) -> None:
    p = sub.add_parser("ensemble", help="one checkpoint averaging the probabilities of several (predict, "
                                        "evaluate, heatmap and export accept it)")
    p.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint or run folders")
    p.add_argument("--out", type=Path, required=True, help="the ensemble folder to write (must not exist)")
    p.add_argument("--weights", help="comma-separated positive weights, one per checkpoint (default equal)")
    p.set_defaults(func=_ensemble)


def _ensemble(args: argparse.Namespace) -> int:
    from ..ensemble import build_ensemble

    weights = None
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise CxrlabError(f"--weights {args.weights!r}: expected comma-separated numbers, e.g. 2,1") from None
    out = build_ensemble(args.checkpoints, args.out, weights)
    print(f"ensemble of {len(args.checkpoints)} models: {out}")
    return 0
