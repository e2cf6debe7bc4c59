"""``cxrlab ensemble``: one checkpoint folder from several (see :mod:`cxrlab.ensemble` for what it holds
and how ``load_model`` turns it into one model). Members must take the same input (their model cards'
size, resize and decoder); their labels are matched by name, and a "No Finding" output that only some
members have (added for training, e.g. by ``data.add_no_finding``) is left out. The thresholds are the
weighted mean of the members' (an approximation; refit them on the ensemble with ``cxrlab calibrate``).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import __version__
from ..checkpoint import FORMAT, INFO_FILE, MODEL_FILE, STATE_FILE, VERSION, find_checkpoint, read_info
from ..ensemble import KIND, normalised_weights
from ..errors import CxrlabError
from ..labels import NO_FINDING
from ..model_card import ModelCard, card_from_json, card_to_json
from ..serialization import sha256_file

MEMBERS_DIR = "members"


def build_ensemble(checkpoints: list, out: Path, weights: list[float] | None = None,
                   missing_thresholds: float | None = None) -> Path:
    """Write an ensemble folder at ``out`` from checkpoint (or run) folders; returns ``out``. A member
    without fitted thresholds (a ``last/`` checkpoint) is refused unless ``missing_thresholds`` says
    what to use for its labels (e.g. 0.5)."""
    if missing_thresholds is not None and not 0 < missing_thresholds < 1:  # NaN fails this too
        raise CxrlabError(f"--missing-thresholds must be a probability between 0 and 1, got {missing_thresholds}")
    if not checkpoints:
        raise CxrlabError("ensemble: give at least one checkpoint")
    weights = [1.0] * len(checkpoints) if weights is None else [float(w) for w in weights]
    if len(weights) != len(checkpoints):
        raise CxrlabError(f"ensemble: {len(weights)} weights for {len(checkpoints)} checkpoints")
    if any(not np.isfinite(w) or w <= 0 for w in weights):
        raise CxrlabError(f"ensemble: weights must be positive, finite numbers, got {weights}")
    weights = normalised_weights(weights)
    folders = [find_checkpoint(Path(c)) for c in checkpoints]
    infos = [read_info(f) for f in folders]
    for folder, info in zip(folders, infos):
        if info.get("kind") == KIND:
            raise CxrlabError(f"ensemble: {folder} is itself an ensemble; list its members instead")
    labels = _common_labels(folders, infos)
    cards = [card_from_json(info, folder / INFO_FILE) for folder, info in zip(folders, infos)]
    for folder, card in zip(folders, cards):
        if not card.thresholds and missing_thresholds is None:
            raise CxrlabError(f"ensemble: {folder} has no fitted thresholds (a last/ checkpoint, or a run that did not "
                              "finish); use its run's best/, calibrate it, or pass --missing-thresholds 0.5 to use "
                              "0.5 for its labels")
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
            own = cards[k].thresholds or [missing_thresholds] * len(cards[k].labels)
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
