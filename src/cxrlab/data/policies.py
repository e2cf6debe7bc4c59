"""Label policies: raw values (1, 0, -1 uncertain, NaN blank) → training ``target`` + ``mask``.

The standard choices, named as in the CheXpert paper (Irvin et al., AAAI 2019):

- ``full``: the labels are complete (NIH): 1 → 1, 0 → 0, blank → 0 (known). An uncertain value is an
  error, so a CheXpert/MIMIC user must choose a U-policy instead of having one chosen silently.
- ``u_ones`` / ``u_zeros``: uncertain → 1 / → 0 (known).
- ``u_ignore``: uncertain → unknown (mask 0).
- ``spml``: single positive multi-label (Cole et al., CVPR 2021): uncertain → 0 first, then one
  positive per image, drawn reproducibly, is the only known label. Images without any positive get
  "No Finding" as their observed positive (``no_finding='keep'``, adding that label to the space if it
  is missing) or are dropped (``no_finding='drop'``).

Blank (not mentioned) counts as a known 0 by default (``blank='zeros'``); ``blank='ignore'`` masks it.
``add_no_finding`` (the other policies; SPML always has it with ``no_finding='keep'``) adds the same
"No Finding" label: positive when no label is, negative when one is, unknown when none is positive but
some is unknown; a space that already has "No Finding" keeps its own column.
``per_label`` overrides the uncertain handling per label, e.g. ``{"Atelectasis": "u_ones"}``.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..config import NoFinding, Policy, choose
from ..errors import CxrlabError, unknown
from ..labels import NO_FINDING, LabelSpace

POLICIES = tuple(p.value for p in Policy)  # the values of data.policy (config.Policy), for listing
# what one label may get in per_label: SPML is a policy of the whole label space
LABEL_POLICIES = tuple(p.value for p in Policy if p is not Policy.SPML)
BLANK_CHOICES = ("zeros", "ignore")


@dataclass
class PolicyResult:
    """What a policy produces. ``target``/``mask`` (K×L' float32) cover the kept ``rows`` (positions
    into the input) over ``labels`` (the input space, plus "No Finding" for SPML where needed).
    For SPML, ``full_target``/``full_mask`` hold the complete labels the single positive was drawn
    from (same rows and labels), for measuring pseudo-label recovery; None otherwise.
    Unpacks as ``target, mask, rows = apply_policy(...)``."""

    labels: LabelSpace
    target: np.ndarray
    mask: np.ndarray
    rows: np.ndarray
    full_target: np.ndarray | None = None
    full_mask: np.ndarray | None = None

    def __iter__(self):
        return iter((self.target, self.mask, self.rows))


def apply_policy(values, labels: LabelSpace, policy: str, per_label: dict | None = None, seed: int = 0,
                 no_finding: str = "keep", blank: str = "zeros", keys: Iterable | None = None,
                 add_no_finding: bool = False) -> PolicyResult:
    """Turn raw values (N×L) into a ``PolicyResult``; see the module docstring for the policies.

    ``keys`` (SPML only, optional): one identifier per row (e.g. the image path). When given, each
    row's draw depends only on ``seed`` and its key, so reordering or subsetting the rows does not
    change which positive an image keeps; otherwise draws come from ``default_rng(seed)`` in row order.
    ``no_finding`` only matters for SPML.
    """
    values = _check_values(values, labels)
    policy = choose(Policy, policy, "label policy")  # also called with plain strings, outside a recipe
    no_finding = choose(NoFinding, no_finding, "no_finding choice")
    _check_choice("blank choice", blank, BLANK_CHOICES)
    base = Policy.U_ZEROS if policy is Policy.SPML else policy
    per_column = _per_column(labels, base, per_label or {})
    target, mask = _resolve(values, labels, per_column, blank)
    rows = np.arange(len(values), dtype=np.int64)
    if policy is not Policy.SPML:
        if add_no_finding and NO_FINDING not in labels.names:
            return PolicyResult(labels.with_no_finding(), *_append_no_finding(target, mask), rows)
        return PolicyResult(labels, target, mask, rows)
    return _single_positive(target, mask, labels, seed, no_finding, keys)


def _check_choice(kind: str, name: str, choices) -> None:
    if name not in choices:
        raise unknown(kind, str(name), choices)


def _check_values(values, labels: LabelSpace) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2 or values.shape[1] != len(labels):
        raise CxrlabError(f"label values must be N×{len(labels)} for {labels.name!r}, got shape {values.shape}")
    bad = ~(np.isnan(values) | np.isin(values, (1.0, 0.0, -1.0)))
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise CxrlabError(f"row {i}, label {labels.names[j]!r}: value {values[i, j]} is not 1, 0, -1 or blank")
    return values


def _per_column(labels: LabelSpace, base: str, per_label: dict) -> list[str]:
    """The uncertain-handling policy of every column: ``base`` unless ``per_label`` overrides it."""
    chosen = [base] * len(labels)
    for name, policy in per_label.items():
        if name not in labels.names:
            raise unknown(f"label in per_label (label space {labels.name!r}):", name, labels.names)
        _check_choice(f"policy for label {name!r}:", policy, LABEL_POLICIES)
        chosen[labels.index(name)] = policy
    return chosen


def _resolve(values: np.ndarray, labels: LabelSpace, per_column: list[str], blank: str):
    """Apply blank and uncertain handling column by column (vectorised over rows)."""
    target = np.where(values == 1, 1.0, 0.0).astype(np.float32)
    mask = np.ones_like(target)
    if blank == "ignore":
        mask[np.isnan(values)] = 0.0
    for j, policy in enumerate(per_column):
        uncertain = values[:, j] == -1
        if not uncertain.any():
            continue
        if policy == Policy.FULL:
            raise CxrlabError(f"label {labels.names[j]!r} has {int(uncertain.sum())} uncertain (-1) values, "
                              f"which policy 'full' does not accept; choose u_ones, u_zeros or u_ignore "
                              f"(for all labels, or per label)")
        if policy == Policy.U_ONES:
            target[uncertain, j] = 1.0
        elif policy == Policy.U_IGNORE:
            mask[uncertain, j] = 0.0
    return target, mask


def _append_no_finding(target: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Target and mask with a trailing "No Finding" column (see the module docstring)."""
    any_positive = ((target == 1) & (mask == 1)).any(1)
    all_known = (mask == 1).all(1)
    nf_target = (~any_positive & all_known).astype(np.float32)
    nf_mask = (any_positive | all_known).astype(np.float32)
    return np.concatenate([target, nf_target[:, None]], 1), np.concatenate([mask, nf_mask[:, None]], 1)


def _single_positive(target, mask, labels: LabelSpace, seed: int, no_finding: str, keys) -> PolicyResult:
    """Keep one known positive per image (uniform among its positives); everything else unknown."""
    positives = (target == 1) & (mask == 1)
    count = positives.sum(1)
    rows = np.arange(len(target), dtype=np.int64)
    if no_finding is NoFinding.DROP:
        rows = rows[count > 0]
        space = labels
    else:
        space = labels.with_no_finding()
        if len(space) > len(labels):  # add the "No Finding" column: positive exactly when nothing else is
            target = np.concatenate([target, (count == 0)[:, None].astype(np.float32)], axis=1)
            mask = np.concatenate([mask, np.ones((len(mask), 1), np.float32)], axis=1)
        else:
            nf = labels.index(NO_FINDING)
            target[count == 0, nf], mask[count == 0, nf] = 1.0, 1.0
        positives = (target == 1) & (mask == 1)
        count = positives.sum(1)
    if len(rows) == 0:
        raise CxrlabError("policy spml with no_finding='drop': no image has a positive label")
    u = _uniforms(seed, len(target), keys)[rows]
    positives, count = positives[rows], count[rows]
    pick = np.minimum((u * count).astype(np.int64), count - 1)
    column = np.argmax((np.cumsum(positives, axis=1) == (pick + 1)[:, None]) & positives, axis=1)
    observed = np.zeros((len(rows), len(space)), dtype=np.float32)
    observed[np.arange(len(rows)), column] = 1.0
    return PolicyResult(space, observed, observed.copy(), rows, target[rows], mask[rows])


def _uniforms(seed: int, n: int, keys) -> np.ndarray:
    """One uniform number in [0, 1) per row: from default_rng(seed), or from a hash of (seed, key)."""
    if keys is None:
        return np.random.default_rng(seed).random(n)
    keys = [str(k) for k in keys]
    if len(keys) != n:
        raise CxrlabError(f"spml: {len(keys)} keys for {n} rows")
    out = np.empty(n, dtype=np.float64)
    for i, key in enumerate(keys):
        digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") / 2.0 ** 64
    return out
