"""What a ``prototype`` head's metric space learned: label–label cosines of the learned prototypes next
to those of the label text vectors they started from (DWML, Jin et al., Comput. Biol. Med. 157 (2023)
106683). Both come from the checkpoint alone (the head stores the text vectors), no text encoder runs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import checkpoint as ckpt
from ..errors import CxrlabError
from ..evaluation.plots import plot_matrices
from ..models import CxrModel
from ..models.heads.prototype import PrototypeHead
from ..models.text import cosine_matrix
from ..registry import HEADS


def prototype_similarities(checkpoint: Path) -> dict:
    """``{"labels", "prototypes" (L×L cosines of q), "text" (L×L cosines of the stored text vectors),
    "r_offdiagonal" (Pearson r of their off-diagonal entries), "kappa", "text_encoder"}``."""
    model, info = ckpt.load_model(Path(checkpoint))
    head = model.head if isinstance(model, CxrModel) else None  # an ensemble has no one head
    if not isinstance(head, PrototypeHead):
        used = "ensemble" if head is None else HEADS.name_of(type(head)) or type(head).__name__
        raise CxrlabError(f"checkpoint {checkpoint} has head {used!r}: `cxrlab prototypes` needs one trained "
                          "with model.head=prototype")
    with torch.no_grad():
        q = head.prototypes().double().cpu().numpy()
        text = head.label_text.double().cpu().numpy()
    learned, given = cosine_matrix(q), cosine_matrix(text)  # q is not unit with metric: euclidean
    off = ~np.eye(len(q), dtype=bool)
    a, b = learned[off], given[off]
    r = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
    return {"labels": list(info["labels"]), "prototypes": learned, "text": given, "r_offdiagonal": r,
            "kappa": float(head.kappa.detach()), "text_encoder": info.get("label_text")}


def write_prototype_report(checkpoint: Path, out_dir: Path) -> dict:
    """``prototypes.png`` (the two heatmaps side by side), ``prototype_cosine.csv``, ``text_cosine.csv``
    and ``prototypes.json`` (r, κ, the text encoder's identity) in ``out_dir``; returns their paths."""
    result = prototype_similarities(checkpoint)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = result["labels"]
    paths = {"prototype_csv": out_dir / "prototype_cosine.csv", "text_csv": out_dir / "text_cosine.csv",
             "json": out_dir / "prototypes.json", "png": out_dir / "prototypes.png"}
    pd.DataFrame(result["prototypes"], index=names, columns=names).to_csv(paths["prototype_csv"], float_format="%.4f")
    pd.DataFrame(result["text"], index=names, columns=names).to_csv(paths["text_csv"], float_format="%.4f")
    encoder = (result["text_encoder"] or {}).get("name", "text encoder")
    plot_matrices(paths["png"], {f"learned prototypes cos(q_i, q_j); r = {result['r_offdiagonal']:.2f} with text":
                                 result["prototypes"], f"label text vectors ({encoder})": result["text"]}, names)
    summary = {"checkpoint": str(checkpoint), "r_offdiagonal": result["r_offdiagonal"], "kappa": result["kappa"],
               "text_encoder": result["text_encoder"]}
    paths["json"].write_text(json.dumps(summary, indent=1, default=str))
    return {**paths, "r_offdiagonal": result["r_offdiagonal"]}
