"""``cxrlab prototypes CKPT --out DIR``: the learned label prototypes' cosine matrix next to the text's."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_prototypes_command(sub) -> None:
    p = sub.add_parser("prototypes", help="label-label cosines of a prototype head's learned prototypes next to "
                                          "its label text vectors (heatmap PNG + CSV)")
    p.add_argument("checkpoint", type=Path, help="checkpoint folder or run folder (its best/)")
    p.add_argument("--out", required=True, type=Path, help="folder to write into")
    p.add_argument("--overwrite", action="store_true", help="replace the report in an --out folder that holds files")
    p.set_defaults(func=_prototypes)


def _prototypes(args: argparse.Namespace) -> int:
    from ..workflows.deploy import prototypes  # lazy: start-up time (torch), for every command

    written = prototypes(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"wrote {written['png']}, {written['prototype_csv'].name}, {written['text_csv'].name} "
          f"(off-diagonal r between learned and text cosines: {written['r_offdiagonal']:.3f})")
    return 0
