"""The MPC training regime: weak-to-strong pseudo-labels at image, feature and batch level.

Xiao, Li, Lin, Zhu, Yuan, Feng, Sheng. "Multi-Label Chest X-Ray Image Classification With Single
Positive Labels." IEEE Transactions on Medical Imaging 43(12):4404–4418, 2024.

One step (``MPC.step(model, batch)``), with ``x = batch['image']``:

1. Pseudo-labels from the **weak** view, without gradient: ``q = σ(model(weak(x)).logits)``. For every
   *unknown* entry (``mask == 0``): pseudo-positive if ``q ≥ τ⁺``, pseudo-negative if ``q ≤ τ⁻``,
   ignored otherwise. Known entries keep their observed label (never overwritten).
2. IPC (image-level perturbation consistency): the **strong** view ``fmap = model.features(strong(x))``,
   ``out = model.head(fmap)``; ``out.logits`` is the returned Output's logits, which ``spml_observed``
   and ``mpc_ipc`` score. RED (random elastic deformation) is part of the strong augmentation spec.
3. FPC (feature-level perturbation consistency, ``fpc=True``): channel dropout (``Dropout2d``,
   ``fpc_dropout``) on the weak view's backbone feature map, through the same head → ``fpc_logits``.
   [ours, as UniMatch does] The weak feature map is computed *once, with gradient*, and reused: the
   pseudo-labels are read from ``head(fmap_weak.detach())`` under ``torch.no_grad()`` (so they carry
   no gradient), and FPC back-propagates through the weak forward. With ``fpc=False`` the weak
   forward runs entirely under ``no_grad`` (cheaper).
4. BTC (batch-level Transformer correlation, ``btc=True``): each image's pooled strong-view feature
   is a token, the batch is the sequence, and an ``nn.TransformerEncoder`` (``btc_layers`` layers,
   ``btc_heads`` heads) mixes them (as BatchFormer, Hou et al., CVPR 2022). [ours] The feature map
   is shifted per channel by ``mixed − pooled`` (broadcast over space), so its spatial mean becomes
   the mixed vector and *any* head can score it → ``btc_logits``. The encoder lives in
   ``self.modules['btc']``: trained and checkpointed with the model, never used at inference (the
   model's own ``forward`` is untouched).

Every part is switchable for the ablation: IPC by the weight of ``mpc_ipc`` in the loss (0 = off),
RED by the strong augmentation spec, FPC/BTC by ``fpc`` / ``btc`` here (their extras then disappear
and the ``mpc_fpc`` / ``mpc_btc`` terms say so). Drop ``mpc_fpc`` / ``mpc_btc`` from the loss together
with their switch; keep ``btc`` off when ``mpc_btc`` is not in the loss (the encoder would get no
gradient, which DistributedDataParallel refuses without ``find_unused_parameters``).

Cost (``benchmarks/bench_regimes.py``, resnet18 at 64 px, batch 32, CPU): the weak no-grad forward
makes a step ≈1.3× a supervised one; FPC's weak forward *with* gradient ≈2×; BTC adds little.

``epoch_stats()`` reports how well the pseudo-labels recover the withheld labels
(``batch['full_target']``, used for measurement only, never for training) over the epoch, then resets.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CxrlabError
from ..output import Output
from ..registry import REGIMES
from .base import Augment, Regime


class BatchTransformer(nn.Module):
    """Transformer encoder over the batch axis of pooled features; returns the feature map shifted
    per channel so that its spatial mean is the batch-mixed feature vector."""

    def __init__(self, dim: int, heads: int = 4, layers: int = 1, dropout: float = 0.1,
                 ffn_dim: int | None = None):
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=ffn_dim or dim, dropout=dropout,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.dim = dim

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        if fmap.ndim != 4 or fmap.shape[1] != self.dim:
            raise CxrlabError(f"regime mpc: BTC was built for {self.dim}-channel feature maps, got shape "
                              f"{tuple(fmap.shape)}; set regime.args.feature_dim to the backbone's num_features")
        pooled = fmap.mean(dim=(2, 3))
        mixed = self.encoder(pooled.unsqueeze(0)).squeeze(0)  # one sequence: the batch
        return fmap + (mixed - pooled).to(fmap.dtype)[:, :, None, None]


@REGIMES.register("mpc")
class MPC(Regime):
    """MPC regime. Args (recipe ``regime.args``):

    ``tau_pos`` (0.95) / ``tau_neg`` (0.05): pseudo-positive / pseudo-negative thresholds on the weak
    view's probability (values out of [0, 1] switch that side off); ``fpc`` (True), ``fpc_dropout``
    (0.5); ``btc`` (True), ``btc_layers`` (1), ``btc_heads`` (4), ``btc_dropout`` (0.1),
    ``btc_ffn_dim`` (None = feature_dim); ``feature_dim``: the backbone's ``num_features``, required
    with ``btc`` (the experiment pipeline passes ``model.backbone.num_features``).

    ``exclusive_label`` [ours] ("No Finding"): a label that excludes every other one. Pseudo-labels
    never contradict an observed positive: an image whose observed positive is a finding gets no
    pseudo-positive on it, and one whose observed positive is it gets no pseudo-positive finding.
    Without this, on our synthetic SPML task the frequent "No Finding" was pseudo-labelled positive on
    images with an observed finding (hundreds per epoch, all wrong). Needs ``label_names`` (the
    pipeline passes them); it does nothing when the label space lacks the label or when set to null.
    ``coexisting_labels`` [ours] ("Support Devices",): labels that the exclusive label does not exclude
    (CheXpert's labeller sets "No Finding" on images with support devices: 3.9 % of its frontal images).
    """

    # FPC and BTC perturb and mix one backbone's feature map; several backbones give several maps
    one_feature_map = True

    @classmethod
    def extras_for(cls, args: dict | None = None) -> frozenset[str]:
        args = args or {}
        return frozenset({"pseudo_target", "pseudo_mask", "weak_logits", "strong_logits"}
                         | ({"fpc_logits"} if args.get("fpc", True) else set())
                         | ({"btc_logits"} if args.get("btc", True) else set()))

    def __init__(self, weak: Augment, strong: Augment, tau_pos: float = 0.95, tau_neg: float = 0.05,
                 fpc: bool = True, fpc_dropout: float = 0.5, btc: bool = True, btc_layers: int = 1,
                 btc_heads: int = 4, feature_dim: int | None = None, btc_dropout: float = 0.1,
                 btc_ffn_dim: int | None = None, exclusive_label: str | None = "No Finding",
                 coexisting_labels: tuple[str, ...] | list[str] = ("Support Devices",),
                 label_names: tuple[str, ...] | None = None):
        super().__init__(weak, strong)
        names = list(label_names or ())
        self.exclusive = names.index(exclusive_label) if exclusive_label in names else None
        # the labels the exclusive label excludes: every other one but the coexisting ones
        self._excluded = torch.tensor([n != exclusive_label and n not in tuple(coexisting_labels or ())
                                       for n in names], dtype=torch.bool)
        if not tau_neg < tau_pos:
            raise CxrlabError(f"regime mpc: need tau_neg < tau_pos, got tau_neg={tau_neg}, tau_pos={tau_pos}")
        if not 0 <= fpc_dropout < 1:
            raise CxrlabError(f"regime mpc: fpc_dropout must be in [0, 1), got {fpc_dropout}")
        self.tau_pos = float(tau_pos)
        self.tau_neg = float(tau_neg)
        self.fpc = bool(fpc)
        self.fpc_dropout = float(fpc_dropout)
        self.btc = bool(btc)
        if self.btc:
            if feature_dim is None:
                raise CxrlabError("regime mpc: btc=True needs feature_dim, the backbone's feature count "
                                  "(model.backbone.num_features; the experiment pipeline passes it), or set btc: false")
            feature_dim = int(feature_dim)
            if btc_layers < 1 or btc_heads < 1 or feature_dim % btc_heads:
                raise CxrlabError(f"regime mpc: need btc_layers >= 1 and btc_heads dividing feature_dim, got "
                                  f"btc_layers={btc_layers}, btc_heads={btc_heads}, feature_dim={feature_dim}")
            self.modules["btc"] = BatchTransformer(feature_dim, int(btc_heads), int(btc_layers), float(btc_dropout),
                                                   btc_ffn_dim)
        self.feature_dim = feature_dim
        self._stats: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------------------------- one step

    def pseudo_labels(self, weak_logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor):
        """``(pseudo_target, pseudo_mask)`` from the weak-view logits; known entries keep their label."""
        with torch.no_grad():
            q = torch.sigmoid(weak_logits.float())
            known = mask > 0.5
            pos = (q >= self.tau_pos) & ~known
            if self.exclusive is not None:
                j = self.exclusive
                excluded = self._excluded.to(pos.device)
                observed = known & (target > 0.5)
                finding_seen = (observed & excluded).any(dim=1)
                pos[:, j] &= ~finding_seen
                pos &= ~(observed[:, j:j + 1] & excluded)
            neg = (q <= self.tau_neg) & ~known
            pseudo_target = torch.where(known, target.float(), pos.float())
            pseudo_mask = (known | pos | neg).float()
        return pseudo_target, pseudo_mask

    def step(self, model, batch: dict) -> Output:
        x = batch["image"]
        target = batch["target"]
        mask = batch["mask"] if "mask" in batch else torch.ones_like(target)
        # the weak view carries the observed-label loss (FixMatch convention: supervision on the weakly
        # augmented view); its detached logits are the pseudo-labels, its feature map FPC's input
        fmap_weak = model.features(self.weak(x))
        weak = model.head(fmap_weak)
        weak_logits = weak.logits.detach()
        pseudo_target, pseudo_mask = self.pseudo_labels(weak_logits, target, mask)

        fmap_strong = model.features(self.strong(x))
        extras = dict(weak.extras)
        extras.update(pseudo_target=pseudo_target, pseudo_mask=pseudo_mask, weak_logits=weak_logits,
                      strong_logits=model.head(fmap_strong).logits)
        if self.fpc:
            extras["fpc_logits"] = model.head(F.dropout2d(fmap_weak, self.fpc_dropout, training=True)).logits
        if self.btc:
            extras["btc_logits"] = model.head(self.modules["btc"](fmap_strong)).logits
        self._record(pseudo_target, pseudo_mask, mask, batch.get("full_target"))
        return Output(weak.logits, extras)

    # ------------------------------------------------------------------------------- measurement

    def _record(self, pseudo_target, pseudo_mask, mask, full_target) -> None:
        with torch.no_grad():
            unknown = mask <= 0.5
            pos = (pseudo_mask > 0.5) & (pseudo_target > 0.5) & unknown
            neg = (pseudo_mask > 0.5) & (pseudo_target <= 0.5) & unknown
            counts = {"pos": pos.sum(), "neg": neg.sum(), "unknown": unknown.sum()}
            if full_target is not None:
                truth = full_target.to(pos.device) > 0.5
                counts.update(pos_true=(pos & truth).sum(), neg_true=(neg & ~truth).sum(),
                              hidden=(unknown & truth).sum())
            for k, v in counts.items():  # kept on the device: no sync per step
                self._stats[k] = self._stats[k] + v if k in self._stats else v.clone()

    def epoch_stats(self) -> dict:
        """Pseudo-label recovery over the epoch so far (then reset), on unknown entries:

        ``pseudo_pos_count`` / ``pseudo_neg_count``: pseudo-positives / pseudo-negatives assigned;
        with ``full_target`` in the batches also ``pseudo_pos_precision`` (share of pseudo-positives
        truly positive), ``pseudo_pos_recall`` (share of hidden positives — true positives among
        unknown entries — pseudo-labelled positive), ``pseudo_neg_precision`` and
        ``hidden_pos_rate`` (share of unknown entries truly positive: the precision of guessing).
        Undefined ratios are NaN.
        """
        s = {k: float(v) for k, v in self._stats.items()}
        self._stats = {}
        if not s:
            return {}
        out = {"pseudo_pos_count": s["pos"], "pseudo_neg_count": s["neg"]}
        if "hidden" in s:
            out.update(pseudo_pos_precision=_ratio(s["pos_true"], s["pos"]),
                       pseudo_pos_recall=_ratio(s["pos_true"], s["hidden"]),
                       pseudo_neg_precision=_ratio(s["neg_true"], s["neg"]),
                       hidden_pos_rate=_ratio(s["hidden"], s["unknown"]))
        return out


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan
