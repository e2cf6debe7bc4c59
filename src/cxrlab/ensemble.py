"""Ensembles of trained models: one self-describing checkpoint folder that averages probabilities.

Ge et al. (arXiv:1807.07247, 2018; Multimedia Tools and Applications 79, 2020) report that models
trained with different losses are complementary and gain when fused; ``cxrlab ensemble`` builds the
fusion as a checkpoint every consumer of checkpoints accepts (predict, evaluate, heatmap, export);
:func:`cxrlab.workflows.ensemble.build_ensemble` writes the folder:

``checkpoint.json``  the usual format, with ``kind: ensemble``, a model card (the members' common input
                     spec, the label names, thresholds, every member's backbones, head ``ensemble``)
                     and ``members``: each member's folder (relative), weight and the SHA-256 of its
                     files
``members/K-NAME/``  each member's ``checkpoint.json`` and weights file, hard-linked (else copied)

:func:`cxrlab.checkpoint.load_model` turns the folder into one :class:`EnsembleModel`:
``p = Σ_k w_k sigmoid(logits_k)`` (weights normalised to sum 1), returned as ``logits = logit(p)`` so
the Output contract holds. Members must take the same input (their cards' size, resize and decoder);
their labels are matched by name, and a "No Finding" output that only some members have (added for
training, e.g. by ``data.add_no_finding``) is left out. The thresholds are the weighted mean of the
members' (an approximation; refit them on the ensemble with ``cxrlab calibrate``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import CxrlabError
from .output import Output
from .serialization import sha256_file

KIND = "ensemble"


class EnsembleModel(nn.Module):
    """Weighted mean of member probabilities. ``columns[k]`` picks member k's outputs in the ensemble's
    label order. ``forward(x) -> Output(logit(p), {"member_probs": B×K×L})``."""

    def __init__(self, members: list[nn.Module], weights, columns: list[list[int]], eps: float = 1e-6):
        super().__init__()
        if len(members) != len(weights) or len(members) != len(columns):
            raise CxrlabError("ensemble: members, weights and label columns differ in number")
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", torch.as_tensor(normalised_weights(weights), dtype=torch.float32))
        for k, cols in enumerate(columns):
            self.register_buffer(f"columns{k}", torch.as_tensor(cols, dtype=torch.long), persistent=False)
        self.eps = eps

    def member_columns(self, k: int) -> torch.Tensor:
        return getattr(self, f"columns{k}")

    def forward(self, x: torch.Tensor) -> Output:
        probs = torch.stack([torch.sigmoid(m(x).logits.float()[:, self.member_columns(k)])
                             for k, m in enumerate(self.members)], dim=1)  # B×K×L
        p = (probs * self.weights[None, :, None]).sum(1).clamp(self.eps, 1 - self.eps)
        return Output(torch.log(p) - torch.log1p(-p), {"member_probs": probs})


def normalised_weights(weights) -> list[float]:
    """Weights scaled to sum 1, refused unless each is a finite number > 0. Divided by the largest first,
    so that large weights (1e308, 1e308) do not overflow their sum to inf and every weight to 0."""
    values = [float(w) for w in weights]
    if not values or any(not np.isfinite(w) or w <= 0 for w in values):
        raise CxrlabError(f"ensemble: weights must be positive, finite numbers, got {values}")
    largest = max(values)
    scaled = [w / largest for w in values]
    total = sum(scaled)  # in [1, len(values)]
    result = [w / total for w in scaled]
    if min(result) == 0.0:  # e.g. 1e-308 beside 1e308: that member would silently count for nothing
        raise CxrlabError(f"ensemble: weights {values} differ too much: the smallest rounds to 0 beside the largest")
    return result


def load_ensemble(folder: Path, info: dict, load_member) -> EnsembleModel:
    """The :class:`EnsembleModel` of an ensemble folder, after checking every member file's SHA-256;
    ``load_member(path) -> (model, info)`` loads one member (``checkpoint.load_model``, which calls this:
    passed in so that this module needs nothing of the checkpoint module)."""
    folder = Path(folder)
    members, weights, columns = [], [], []
    for entry in info.get("members") or []:
        path = folder / entry["path"]
        for file, expected in entry["sha256"].items():
            if not (path / file).is_file():
                raise CxrlabError(f"ensemble {folder}: member file missing: {path / file}")
            if sha256_file(path / file) != expected:
                raise CxrlabError(f"ensemble {folder}: member file {path / file} is corrupt "
                                  "(SHA-256 differs from the ensemble's checkpoint.json)")
        model, member_info = load_member(path)
        try:
            columns.append([member_info["labels"].index(n) for n in info["labels"]])
        except ValueError:
            raise CxrlabError(f"ensemble {folder}: member {path} lacks some of the labels {info['labels']}") from None
        members.append(model)
        weights.append(float(entry["weight"]))
    if not members:
        raise CxrlabError(f"ensemble {folder}: checkpoint.json lists no members")
    return EnsembleModel(members, weights, columns).eval()


@torch.no_grad()
def ensemble_heatmaps(model: EnsembleModel, x: torch.Tensor, member_heatmaps) -> tuple[np.ndarray, np.ndarray]:
    """Ensemble probabilities and the weighted mean of the members' heatmaps (each already scaled to
    [0, 1]), rescaled to [0, 1]. ``member_heatmaps(model, x) -> (probs, maps)`` is the single-model one;
    a member that gives no maps (e.g. a bilinear head) makes it an error naming that member."""
    probs = torch.sigmoid(model(x).logits.float()).cpu().numpy()
    total = None
    for k, member in enumerate(model.members):
        try:
            _, maps = member_heatmaps(member, x)
        except CxrlabError as exc:
            raise CxrlabError(f"ensemble member {k}: {exc}") from None
        maps = maps[:, model.member_columns(k).cpu().numpy()] * float(model.weights[k])
        total = maps if total is None else total + maps
    low = total.min(axis=(2, 3), keepdims=True)
    high = total.max(axis=(2, 3), keepdims=True)
    return probs, (total - low) / np.maximum(high - low, 1e-12)
