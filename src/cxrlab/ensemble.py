"""Ensembles of trained models: one self-describing checkpoint folder that averages probabilities.

Ge et al. (arXiv:1807.07247, 2018; Multimedia Tools and Applications 79, 2020) report that models
trained with different losses are complementary and gain when fused; ``cxrlab ensemble`` builds the
fusion as a checkpoint every consumer of checkpoints accepts (predict, evaluate, heatmap, export):

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

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import CxrlabError
from . import __version__
from .labels import NO_FINDING
from .model_card import ModelCard, Training, card_from_json, card_to_json
from .output import Output
from .serialization import sha256_file

KIND = "ensemble"
MEMBERS_DIR = "members"


class EnsembleModel(nn.Module):
    """Weighted mean of member probabilities. ``columns[k]`` picks member k's outputs in the ensemble's
    label order. ``forward(x) -> Output(logit(p), {"member_probs": B×K×L})``."""

    def __init__(self, members: list[nn.Module], weights, columns: list[list[int]], eps: float = 1e-6):
        super().__init__()
        if len(members) != len(weights) or len(members) != len(columns):
            raise CxrlabError("ensemble: members, weights and label columns differ in number")
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", torch.as_tensor(weights, dtype=torch.float32) / float(sum(weights)))
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


def build_ensemble(checkpoints: list, out: Path, weights: list[float] | None = None) -> Path:
    """Write an ensemble folder at ``out`` from checkpoint (or run) folders; returns ``out``."""
    from .checkpoint import FORMAT, INFO_FILE, MODEL_FILE, STATE_FILE, VERSION, find_checkpoint, read_info

    if not checkpoints:
        raise CxrlabError("ensemble: give at least one checkpoint")
    weights = [1.0] * len(checkpoints) if weights is None else [float(w) for w in weights]
    if len(weights) != len(checkpoints):
        raise CxrlabError(f"ensemble: {len(weights)} weights for {len(checkpoints)} checkpoints")
    if any(not np.isfinite(w) or w <= 0 for w in weights):
        raise CxrlabError(f"ensemble: weights must be positive, got {weights}")
    folders = [find_checkpoint(Path(c)) for c in checkpoints]
    infos = [read_info(f) for f in folders]
    for folder, info in zip(folders, infos):
        if info.get("kind") == KIND:
            raise CxrlabError(f"ensemble: {folder} is itself an ensemble; list its members instead")
    labels = _common_labels(folders, infos)
    cards = [card_from_json(info, folder / INFO_FILE) for folder, info in zip(folders, infos)]
    first = cards[0].input
    for folder, card in zip(folders[1:], cards[1:]):
        for key in ("size", "resize", "decoder"):
            if getattr(card.input, key) != getattr(first, key):
                raise CxrlabError(f"ensemble: {folder / INFO_FILE} has input {key} {getattr(card.input, key)!r} but "
                                  f"{folders[0] / INFO_FILE} has {getattr(first, key)!r}; members must take the same input")
    out = Path(out)
    if out.exists():
        raise CxrlabError(f"ensemble: {out} already exists; choose a new --out")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / MEMBERS_DIR).mkdir(parents=True)
    members, thresholds = [], np.zeros(len(labels))
    total = sum(weights)
    try:
        for k, (folder, info, w) in enumerate(zip(folders, infos, weights)):
            name = f"{k}-{cards[k].training.recipe or 'model'}".replace(os.sep, "_")
            target = tmp / MEMBERS_DIR / name
            target.mkdir()
            weights_file = STATE_FILE if info.get("ema") else MODEL_FILE
            sums = {}
            for file in (INFO_FILE, weights_file):
                _link_or_copy(folder / file, target / file)
                sums[file] = sha256_file(target / file)
            members.append({"path": f"{MEMBERS_DIR}/{name}", "from": str(folder), "weight": w / total,
                            "sha256": sums})
            own = cards[k].thresholds or [0.5] * len(cards[k].labels)
            thresholds += w / total * np.asarray(own, np.float64)[[cards[k].labels.index(n) for n in labels]]
        card = _ensemble_card(cards, labels, thresholds)
        ensemble_info = {"format": FORMAT, "version": VERSION, "kind": KIND, **card_to_json(card),
                         "members": members, "files": {}}
        (tmp / INFO_FILE).write_text(json.dumps(ensemble_info, indent=1))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _ensemble_card(cards: list[ModelCard], labels: list[str], thresholds) -> ModelCard:
    """One card for the fused model: the members' common input, all their backbones (and normalisation,
    in member order), head ``ensemble``; scoring follows the first member's training data."""
    first = cards[0]
    spec = replace(first.input, mean=tuple(m for c in cards for m in c.input.mean),
                   std=tuple(v for c in cards for v in c.input.std))
    training = replace(first.training, recipe="ensemble of " + ", ".join(c.training.recipe or "model" for c in cards),
                       epochs=None, metrics={})
    return ModelCard(labels=tuple(labels), input=spec, thresholds=tuple(float(t) for t in thresholds),
                     threshold_source="weighted mean of the members' thresholds (not refitted)",
                     backbones=tuple(b for c in cards for b in c.backbones), head=KIND, training=training,
                     versions={"cxrlab": __version__})


def load_ensemble(folder: Path, info: dict) -> EnsembleModel:
    """The :class:`EnsembleModel` of an ensemble folder, after checking every member file's SHA-256."""
    from .checkpoint import load_model

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
        model, member_info = load_model(path)
        try:
            columns.append([member_info["labels"].index(n) for n in info["labels"]])
        except ValueError:
            raise CxrlabError(f"ensemble {folder}: member {path} lacks some of the labels {info['labels']}") from None
        members.append(model)
        weights.append(float(entry["weight"]))
    if not members:
        raise CxrlabError(f"ensemble {folder}: checkpoint.json lists no members")
    return EnsembleModel(members, weights, columns).eval()


def _common_labels(folders, infos) -> list[str]:
    """The first member's labels; every member must have the same set, up to a "No Finding" output
    that not all have (then it is left out)."""
    core = [set(info["labels"]) - {NO_FINDING} for info in infos]
    for folder, names in zip(folders[1:], core[1:]):
        if names != core[0]:
            raise CxrlabError(f"ensemble: label spaces differ: {folder} has {sorted(names - core[0]) or 'none'} "
                              f"that {folders[0]} lacks, and lacks {sorted(core[0] - names) or 'none'}; members "
                              "must have the same labels (matched by name; only a 'No Finding' output may differ)")
    common = set.intersection(*[set(info["labels"]) for info in infos])
    return [n for n in infos[0]["labels"] if n in common]


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


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
