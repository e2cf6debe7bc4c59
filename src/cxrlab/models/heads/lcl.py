"""Label-level heads: LCL (label decomposition by class-wise spatial attention) and label queries.

``lcl`` — Zhang, Liang, Cao, Liu, Yang, Zaiane, "Label correlation guided discriminative label feature
learning for multi-label chest image classification", Computer Methods and Programs in Biomedicine 245
(2024) 108032. The paper gives no code; where it is silent the defaults follow the nearest public code:
the same group's GL-MLL (github llt1836/GL-MLL, ``models/my_model.py``, ``train_my_model.py``), ADD-GCN
(Ye et al., ECCV 2020, github Yejin0111/ADD-GCN, ``models/add_gcn.py``, ``trainer.py``) and Query2Label.
The head

1. **global branch** (``global_branch``, default on; GL-MLL and ADD-GCN): a linear classifier on the
   global average pool of ``F`` (B×D×h×w), ``global_logits = W·GAP(F) + b``. The head's ``logits`` are
   the mean of ``global_logits`` and the label branch's ``label_logits`` (ADD-GCN averages the two
   branches' logits; GL-MLL averages their probabilities). Training both branches — GL-MLL's loss is its
   weighted BCE on each output, summed — is the loss ``lcl_branches`` (:mod:`cxrlab.losses.lcl`);
   ``weighted_bce`` alone trains the average, as ADD-GCN does.
2. **decomposes** ``F`` into one feature per label with a class-wise spatial attention
   ``a_c = softmax_hw(s_c / τ)``, ``v_c = Σ_hw a_c F``, projected to ``dim`` (d'). The scores ``s_c``:

   * ``spatial_source: classifier`` (default; needs the global branch): the global classifier's class
     activation map ``s_c = w_c·F_hw + b_c`` (``b_c`` cancels in the softmax), with a learnable
     temperature ``τ`` (stored as ``log τ``, starting at ``temperature``, 1.0). GL-MLL (``forward_sam``)
     and ADD-GCN (SAM) both take the label maps from the supervised classifier's weights, so they are
     label-specific from the first epochs. The softmax over space and ``τ`` are [ours] (GL-MLL uses
     LeakyReLU(CAM) itself as the node feature, ADD-GCN weights F by sigmoid(CAM)); the softmax keeps
     the ``attention`` maps summing to 1 like the paper's.
   * ``spatial_source: learned``: one free vector ``w_c`` per label, init std 0.01, ``τ = 1`` (the
     paper's description and the earlier cxrlab default; at 8×8 its maps start 99.97 % uniform and
     stayed 92–99 % uniform in training).
3. models the global label **correlation** with multi-head self-attention over the C label tokens
   (learnable label embeddings added; residual + LayerNorm + MLP, post-norm; ``layers`` blocks). The
   last block's attention weights, averaged over heads and batch, are tracked as an exponential moving
   average over training steps: the global correlation matrix ``G`` (C×C, rows sum to 1). For the
   tokens to differ, ``label_embed_std`` (default 1.0, Query2Label's N(0, 1) label queries) sets the
   embeddings' init std and ``token_norm`` (default on, [ours]) LayerNorms the projected tokens before
   the embeddings are added, so image content and label identity enter at the same scale. (With the
   earlier std 0.02 against a token std of 0.26 the 14 tokens of an image had mean cosine 0.9994.)
4. classifies each label from its own label feature ("group-wise linear": one weight vector and bias per
   label): ``label_logits``.

``label_query`` — the Query2Label-style alternative (Liu, Zhang, Yang, Su, Zhu, "Query2Label: A Simple
Transformer Way to Multi-Label Classification", arXiv:2107.10834, 2021): learnable label queries
(init std ``label_embed_std``, 1.0 as Query2Label's ``nn.Embedding``) cross-attend to the flattened,
projected feature map (with 2-D sine position encodings on the keys, as DETR/Query2Label), then the same
correlation block and group-wise classifier. Query2Label's decoder also has a self-attention among the
queries; here that role is taken by the correlation block. ``global_branch`` is offered (default off, as
Query2Label); its tokens come out of a post-norm decoder block already normalised (``token_norm`` off).
[ours: offered as the spec's alternative decomposition.]

Both heads fill the extras (see :mod:`cxrlab.output`): ``label_features`` (B×C×d', after the correlation
block), ``attention`` (B×C×h×w, each map sums to 1 over space: per-label heatmaps), ``label_attention``
(B×C×C, last correlation block, averaged over heads), ``correlation`` (G, C×C), ``features`` (B×D,
global average pool), and with the global branch ``global_logits`` and ``label_logits`` (B×C each).
The losses ``lcl_consistency``, ``lcl_supcon`` and ``lcl_branches`` (:mod:`cxrlab.losses.lcl`) read them.

Sizing: ``dim`` (d', 512 as the paper; any positive multiple of ``num_heads``, e.g. 128 for the 96
channels of ``test_resnet``), ``num_heads``, ``layers``, ``mlp_ratio``, ``dropout`` are all head_args.
Set ``lcl_supcon``'s ``in_dim`` to the same ``dim``.

Old checkpoints: a checkpoint saved before the global branch, the classifier-tied maps and ``token_norm``
existed records head_args without those keys; :meth:`LCLHead.args_for_weights` (which
:func:`cxrlab.checkpoint.load_model` consults) reads the missing choices off the saved weight names, so
it is rebuilt as it was trained. Recipes that mean the earlier design set ``global_branch: false,
spatial_source: learned, token_norm: false, label_embed_std: 0.02``.

Options that are our reconstructions, not the paper's ([ours] in the spec):

* ``correlation_source``: ``attention`` (default; the EMA of self-attention weights, as the paper),
  ``learned`` (a C×C parameter, row-softmaxed) or ``cooccurrence`` (the training data's P(j|i),
  row-normalised; given by :meth:`set_cooccurrence`, which the pipeline calls with
  ``LossContext.cooccurrence``; labels never positive get an identity row).
* ``ema_warmup`` (default on): the first ``1/(1-momentum)`` updates average the batches seen so far
  exactly (momentum ``min(m, n/(n+1))`` at update n) instead of starting from a uniform G.
* In training mode, ``correlation`` is the freshly updated EMA value ``m·G_old + (1−m)·Ā_batch`` and
  carries the gradient of the current batch's attention ``Ā_batch`` (scaled by 1−m), so a loss with
  ``detach_g: false`` can shape the self-attention; in eval mode it is the stored buffer (no gradient).
* ``learned`` G only moves through a loss that does not detach it: use it with
  ``lcl_consistency: {detach_g: false}`` (lcl_supcon always detaches G), else it stays uniform.
* Under DDP the EMA buffer is rank 0's (DDP broadcasts buffers before every forward).

Diagnostics (:meth:`_LabelLevelHead.epoch_stats`, logged per epoch by the trainer): whether G collapses
(``g_row_entropy``: mean entropy of G's rows / log C, 1 = uniform, 0 = one-hot; ``g_top_label_share``:
the share of all of G's attention that goes to the single most attended label, 1/C if even), whether
the class-wise maps focus (``attention_entropy``: mean entropy of the ``attention`` maps over the
training batches / log(h·w), 1 = uniform over the map, i.e. global average pooling) and whether the
label tokens differ (``token_cosine``: mean pairwise cosine of an image's C tokens entering the
correlation block, averaged over the training batches; 1 = C copies of one vector).
"""
from __future__ import annotations

import inspect
import math

import numpy as np
import torch
from torch import nn

from ...errors import CxrlabError, unknown
from ...output import Output
from ...registry import HEADS
from .base import Capability, Head

CORRELATION_SOURCES = ("attention", "learned", "cooccurrence")
SPATIAL_SOURCES = ("classifier", "learned")


class Attention(nn.Module):
    """Multi-head (scaled dot-product) attention that also returns the weights averaged over heads.

    ``forward(query B×Lq×d, key B×Lk×d, value B×Lk×d) -> (B×Lq×d, B×Lq×Lk)``; no attention dropout, so
    every row of the returned weights sums to 1.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise CxrlabError(f"attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # B×L×d -> B×H×L×d/H
        b, n, d = x.shape
        return x.reshape(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = self._split(self.q(query)), self._split(self.k(key)), self._split(self.v(value))
        weights = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)  # B×H×Lq×Lk
        out = (weights.to(v.dtype) @ v).transpose(1, 2).reshape(query.shape)
        return self.out(out), weights.mean(dim=1)


class _Block(nn.Module):
    """Post-norm transformer block: ``x = LN(x + Attn(x, mem)); x = LN(x + MLP(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        hidden = max(1, int(round(dim * mlp_ratio)))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        key = x if key is None else key
        value = key if value is None else value
        attended, weights = self.attn(x, key, value)
        x = self.norm1(x + self.drop(attended))
        x = self.norm2(x + self.drop(self.mlp(x)))
        return x, weights


def _init_label_vectors(param: nn.Parameter, std: float) -> None:
    # truncated at ±2 absolute as before for small stds (same draws as the earlier 0.02), ±3σ for large
    bound = max(2.0, 3.0 * std)
    nn.init.trunc_normal_(param, std=std, a=-bound, b=bound)


class LabelCorrelation(nn.Module):
    """Global label correlation by self-attention over the C label tokens (LCL design step 3).

    ``forward(tokens B×C×d) -> (tokens B×C×d, attention B×C×C of the last block, averaged over heads)``;
    :meth:`embed` is what enters the first block: the tokens (LayerNormed with ``token_norm``) plus the
    learnable label embeddings (C×d, init std ``embed_std``).
    """

    def __init__(self, num_labels: int, dim: int, num_heads: int, layers: int, mlp_ratio: float, dropout: float,
                 embed_std: float = 0.02, token_norm: bool = False):
        super().__init__()
        if layers < 1:
            raise CxrlabError(f"label correlation: layers must be >= 1, got {layers}")
        if not embed_std > 0:
            raise CxrlabError(f"label correlation: label_embed_std must be > 0, got {embed_std}")
        self.label_embed = nn.Parameter(torch.empty(num_labels, dim))
        _init_label_vectors(self.label_embed, embed_std)
        self.blocks = nn.ModuleList(_Block(dim, num_heads, mlp_ratio, dropout) for _ in range(layers))
        self.token_norm = nn.LayerNorm(dim) if token_norm else None

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.token_norm is not None:
            tokens = self.token_norm(tokens)
        return tokens + self.label_embed.to(tokens.dtype)

    def attend(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = None
        for block in self.blocks:
            x, weights = block(x)
        return x, weights

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attend(self.embed(tokens))


def mean_pairwise_cosine(tokens: torch.Tensor) -> torch.Tensor:
    """Mean cosine over the C·(C−1) ordered pairs of distinct tokens of each image, averaged over the
    batch (``tokens`` B×C×d, C ≥ 2): 1 when an image's tokens are copies of one vector."""
    z = torch.nn.functional.normalize(tokens.float(), dim=-1)
    c = z.shape[1]
    sims = z @ z.transpose(1, 2)
    off_diagonal = sims.sum(dim=(1, 2)) - sims.diagonal(dim1=1, dim2=2).sum(-1)
    return (off_diagonal / (c * (c - 1))).mean()


class _LabelLevelHead(Head):
    """Shared tail of the label-level heads: correlation block, G tracking, group-wise classifier and
    the optional global branch.

    Subclasses turn the feature map into label tokens (B×C×dim) and spatial maps (B×C×h×w) and call
    :meth:`_finish`. ``provides`` lists the extras with the head's default ``head_args``.
    """

    provides = frozenset({"label_features", "attention", "label_attention", "correlation", "features"})
    capabilities = frozenset({Capability.CORRELATION, Capability.COOCCURRENCE, Capability.NATIVE_MAPS})
    BRANCH_EXTRAS = frozenset({"global_logits", "label_logits"})  # filled with global_branch on

    @classmethod
    def extras_for(cls, head_args: dict | None = None) -> frozenset[str]:
        default = inspect.signature(cls).parameters["global_branch"].default
        on = (head_args or {}).get("global_branch", default)
        return (cls.provides | cls.BRANCH_EXTRAS) if on else (cls.provides - cls.BRANCH_EXTRAS)

    def __init__(self, in_features: int, num_labels: int, dim: int, num_heads: int, layers: int,
                 mlp_ratio: float, dropout: float, correlation_source: str, ema_momentum: float,
                 ema_warmup: bool, global_branch: bool, label_embed_std: float, token_norm: bool):
        super().__init__()
        name = type(self).__name__
        if correlation_source not in CORRELATION_SOURCES:
            raise unknown(f"{name} correlation_source", correlation_source, CORRELATION_SOURCES)
        if not 0.0 <= ema_momentum < 1.0:
            raise CxrlabError(f"{name}: ema_momentum must be in [0, 1), got {ema_momentum}")
        if dim < 1 or num_heads < 1 or dim % num_heads:
            raise CxrlabError(f"{name}: dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise CxrlabError(f"{name}: dropout must be in [0, 1), got {dropout}")
        if not mlp_ratio > 0:
            raise CxrlabError(f"{name}: mlp_ratio must be > 0, got {mlp_ratio}")
        self.in_features = in_features
        self.num_labels = num_labels
        self.dim = dim
        self.correlation_source = correlation_source
        self.ema_momentum = float(ema_momentum)
        self.ema_warmup = bool(ema_warmup)
        self.correlation_block = LabelCorrelation(num_labels, dim, num_heads, layers, mlp_ratio, dropout,
                                                  label_embed_std, token_norm)
        # group-wise linear classifier: label c is scored from its own label feature only
        self.cls_weight = nn.Parameter(torch.empty(num_labels, dim))
        self.cls_bias = nn.Parameter(torch.zeros(num_labels))
        nn.init.trunc_normal_(self.cls_weight, std=dim ** -0.5)
        # global correlation G tracked from the self-attention (kept whatever the source, for analysis)
        self.register_buffer("attention_ema", torch.full((num_labels, num_labels), 1.0 / num_labels))
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        # data co-occurrence, row-normalised (used when correlation_source == "cooccurrence")
        self.register_buffer("cooccurrence", torch.eye(num_labels))
        self._cooccurrence_set = False
        self.register_load_state_dict_post_hook(_mark_cooccurrence_loaded)
        if correlation_source == "learned":
            self.correlation_logits = nn.Parameter(torch.zeros(num_labels, num_labels))
        # supervised global branch fc(GAP F) (GL-MLL, ADD-GCN); made last, so that without it the
        # parameters draw the same random numbers as before it existed
        self.global_fc = nn.Linear(in_features, num_labels) if global_branch else None
        self._running: dict[str, list] = {}  # per-epoch diagnostics: name -> [sum, count]

    @classmethod
    def args_for_weights(cls, head_args: dict, weight_names) -> dict:
        """``head_args`` completed with the choices a checkpoint's weights show (names relative to the
        head, e.g. ``global_fc.weight``), for the options whose default changed: a checkpoint saved
        before they existed records no value for them and is rebuilt as it was trained."""
        names = set(weight_names)
        args = dict(head_args)
        args.setdefault("global_branch", "global_fc.weight" in names)
        args.setdefault("token_norm", "correlation_block.token_norm.weight" in names)
        return args

    # ------------------------------------------------------------------------------------- diagnostics

    def _add(self, name: str, value) -> None:
        total = self._running.setdefault(name, [0.0, 0])
        total[0] += float(value)
        total[1] += 1

    @torch.no_grad()
    def _record(self, maps: torch.Tensor, tokens: torch.Tensor) -> None:
        """Training batches only: the normalised entropy of the maps and the tokens' pairwise cosine."""
        if not self.training:
            return
        n = maps.shape[-1] * maps.shape[-2]
        if n > 1:
            p = maps.detach().float().flatten(2)
            self._add("attention_entropy", (-(torch.xlogy(p, p)).sum(-1) / math.log(n)).mean())  # in [0, 1]
        if tokens.shape[1] > 1:
            self._add("token_cosine", mean_pairwise_cosine(tokens.detach()))

    @torch.no_grad()
    def epoch_stats(self) -> dict:
        """G's row entropy and top-label share now, and the means of the attention-map entropy and the
        token cosine over the training batches since the last call (then reset); see the module notes."""
        g = self.correlation().detach().float().cpu()
        c = g.shape[0]
        rows = -(torch.xlogy(g, g)).sum(-1) / math.log(c)
        out = {"g_row_entropy": float(rows.mean()), "g_top_label_share": float(g.sum(0).max() / g.sum())}
        out.update({name: total / count for name, (total, count) in self._running.items() if count})
        self._running = {}
        return out

    # ------------------------------------------------------------------------------------- correlation

    @torch.no_grad()
    def set_cooccurrence(self, matrix) -> None:
        """Store the training data's co-occurrence ``P(j positive | i positive)`` (C×C, e.g.
        ``LossContext.cooccurrence``), row-normalised; a label never positive gets an identity row.
        Used as ``G`` when ``correlation_source == "cooccurrence"`` (stored, and saved, whatever the source)."""
        m = np.asarray(matrix, dtype=np.float64)
        c = self.num_labels
        if m.shape != (c, c):
            raise CxrlabError(f"set_cooccurrence: expected a {c}×{c} matrix, got shape {m.shape}")
        if not np.all(np.isfinite(m)) or (m < 0).any():
            raise CxrlabError("set_cooccurrence: the matrix must be finite and non-negative")
        rows = m.sum(1, keepdims=True)
        normalised = np.where(rows > 0, m / np.where(rows > 0, rows, 1.0), np.eye(c))
        self.cooccurrence.copy_(torch.as_tensor(normalised, dtype=self.cooccurrence.dtype))
        self._cooccurrence_set = True

    def correlation(self) -> torch.Tensor:
        """The current global correlation ``G`` (C×C, rows sum to 1) from the configured source."""
        if self.correlation_source == "learned":
            return torch.softmax(self.correlation_logits, dim=-1)
        if self.correlation_source == "cooccurrence":
            self._check_cooccurrence()
            return self.cooccurrence.clone()
        return self.attention_ema.clone()

    def _check_cooccurrence(self) -> None:
        if not self._cooccurrence_set:
            raise CxrlabError(f"head {type(self).__name__} has correlation_source='cooccurrence' but "
                              "set_cooccurrence() was never called (pass LossContext.cooccurrence)")

    def _track(self, label_attention: torch.Tensor) -> torch.Tensor:
        """Update the EMA of the batch-mean attention (training only); return G for this step."""
        if not self.training:
            return self.attention_ema.clone()
        batch_mean = label_attention.to(self.attention_ema.dtype).mean(dim=0)
        n = self.ema_updates.to(batch_mean.dtype)
        momentum = torch.clamp(n / (n + 1), max=self.ema_momentum) if self.ema_warmup \
            else torch.full_like(n, self.ema_momentum)
        updated = momentum * self.attention_ema + (1 - momentum) * batch_mean
        with torch.no_grad():
            self.attention_ema.copy_(updated.detach())
            self.ema_updates.add_(1)
        return updated

    def _finish(self, tokens: torch.Tensor, maps: torch.Tensor, fmap: torch.Tensor) -> Output:
        entering = self.correlation_block.embed(tokens)
        self._record(maps, entering)
        label_features, label_attention = self.correlation_block.attend(entering)
        ema = self._track(label_attention)
        correlation = ema if self.correlation_source == "attention" else self.correlation()
        label_logits = (label_features * self.cls_weight.to(label_features.dtype)).sum(-1) + self.cls_bias
        pooled = fmap.mean(dim=(2, 3))
        extras = {"label_features": label_features, "attention": maps, "label_attention": label_attention,
                  "correlation": correlation, "features": pooled}
        if self.global_fc is None:
            return Output(label_logits, extras)
        global_logits = self.global_fc(pooled)
        logits = (global_logits + label_logits.to(global_logits.dtype)) / 2
        return Output(logits, {**extras, "global_logits": global_logits, "label_logits": label_logits})


def _mark_cooccurrence_loaded(module: nn.Module, incompatible) -> None:
    """A loaded state dict (e.g. a checkpoint) carries the co-occurrence matrix, unless it lacked the key.
    (Called with the whole load's incompatible keys, prefixed, when the head is a submodule.)"""
    missing = getattr(incompatible, "missing_keys", ())
    if not any(key == "cooccurrence" or key.endswith(".cooccurrence") for key in missing):
        module._cooccurrence_set = True


def _check_fmap(fmap: torch.Tensor, in_features: int, head: str) -> None:
    if fmap.ndim != 4 or fmap.shape[1] != in_features:
        raise CxrlabError(f"head {head}: expected a B×{in_features}×h×w feature map, got shape {tuple(fmap.shape)}")


@HEADS.register("lcl")
class LCLHead(_LabelLevelHead):
    """LCL head (Zhang et al., CMPB 2024) on its group's design (GL-MLL): supervised global branch,
    class-wise spatial attention decomposition (tied to the global classifier's CAM by default),
    self-attention label correlation with an EMA-tracked global correlation G, group-wise linear
    classifier; see the module notes for the sources of each choice.

    Args (``head_args``): ``dim`` label-feature size d' (512); ``num_heads`` of the self-attention (8);
    ``layers`` correlation blocks (1); ``mlp_ratio`` (4.0); ``dropout`` in the blocks (0.0);
    ``global_branch`` (True); ``spatial_source`` ``classifier`` | ``learned`` (``classifier``, needs
    ``global_branch``); ``temperature`` initial τ of the classifier-tied maps (1.0, learnable);
    ``label_embed_std`` (1.0; the earlier default 0.02); ``token_norm`` [ours] (True);
    ``correlation_source`` ``attention`` | ``learned`` | ``cooccurrence`` (``attention``; the other two
    are [ours]); ``ema_momentum`` of G (0.99); ``ema_warmup`` [ours] (True).
    """

    provides = _LabelLevelHead.provides | _LabelLevelHead.BRANCH_EXTRAS  # global_branch on by default

    def __init__(self, in_features: int, num_labels: int, dim: int = 512, num_heads: int = 8, layers: int = 1,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, correlation_source: str = "attention",
                 ema_momentum: float = 0.99, ema_warmup: bool = True, global_branch: bool = True,
                 spatial_source: str = "classifier", temperature: float = 1.0, label_embed_std: float = 1.0,
                 token_norm: bool = True):
        if spatial_source not in SPATIAL_SOURCES:
            raise unknown("lcl spatial_source", spatial_source, SPATIAL_SOURCES)
        if spatial_source == "classifier" and not global_branch:
            raise CxrlabError("lcl: spatial_source 'classifier' takes the class maps from the global branch's "
                              "classifier: set global_branch: true, or spatial_source: learned")
        if not temperature > 0:
            raise CxrlabError(f"lcl: temperature must be > 0, got {temperature}")
        super().__init__(in_features, num_labels, dim, num_heads, layers, mlp_ratio, dropout, correlation_source,
                         ema_momentum, ema_warmup, global_branch, label_embed_std, token_norm)
        self.spatial_source = spatial_source
        if spatial_source == "learned":
            # w_c: one spatial-attention vector per label; small init -> near-uniform maps (v_c ≈ GAP) at start
            self.spatial_weight = nn.Parameter(torch.empty(num_labels, in_features))
            nn.init.normal_(self.spatial_weight, std=0.01)
        else:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        self.project = nn.Linear(in_features, dim)

    @classmethod
    def args_for_weights(cls, head_args: dict, weight_names) -> dict:
        names = set(weight_names)
        args = super().args_for_weights(head_args, names)
        args.setdefault("spatial_source", "learned" if "spatial_weight" in names else "classifier")
        return args

    def spatial_scores(self, flat: torch.Tensor) -> torch.Tensor:
        """``s_c / τ`` for every location: B×C×N from the flattened map B×D×N."""
        if self.spatial_source == "learned":
            return torch.einsum("cd,bdn->bcn", self.spatial_weight.to(flat.dtype), flat)
        fc = self.global_fc
        cam = torch.einsum("cd,bdn->bcn", fc.weight.to(flat.dtype), flat) + fc.bias.to(flat.dtype)[:, None]
        return cam / self.log_temperature.exp().to(flat.dtype)

    def forward(self, fmap: torch.Tensor) -> Output:
        _check_fmap(fmap, self.in_features, "lcl")
        b, d, h, w = fmap.shape
        flat = fmap.flatten(2)  # B×D×N
        attn = torch.softmax(self.spatial_scores(flat).float(), dim=-1)  # a_c, sums to 1 over space
        label_vectors = torch.einsum("bcn,bdn->bcd", attn.to(flat.dtype), flat)  # v_c = Σ a_c F
        tokens = self.project(label_vectors)
        return self._finish(tokens, attn.reshape(b, self.num_labels, h, w), fmap)


def sine_position_encoding(h: int, w: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """2-D sine/cosine position encoding (DETR-style), ``(h·w)×dim``: first half encodes the row, second
    half the column, frequencies ``10000^(-2⌊k/2⌋/(dim/2))``, coordinates normalised to (0, 2π)."""
    if dim % 4:
        raise CxrlabError(f"sine position encoding needs dim divisible by 4, got {dim}")
    half = dim // 2
    k = torch.arange(half, device=device, dtype=torch.float32)
    freq = 10000.0 ** (-(2 * torch.div(k, 2, rounding_mode="floor")) / half)
    even = (k % 2 == 0)

    def axis(n: int) -> torch.Tensor:
        pos = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n * 2 * math.pi
        angles = pos[:, None] * freq
        return torch.where(even, torch.sin(angles), torch.cos(angles))  # n×half

    rows = axis(h)[:, None, :].expand(h, w, half)
    cols = axis(w)[None, :, :].expand(h, w, half)
    return torch.cat([rows, cols], dim=-1).reshape(h * w, dim).to(dtype)


@HEADS.register("label_query")
class LabelQueryHead(_LabelLevelHead):
    """Query2Label-style head (Liu et al. 2021) [ours: the spec's alternative to LCL's decomposition]:
    learnable label queries cross-attend to the projected feature map (``decoder_layers`` post-norm
    cross-attention + MLP blocks), then the LCL correlation block and group-wise classifier.
    The ``attention`` extra is the last cross-attention's weights (averaged over heads), B×C×h×w.

    Args (``head_args``): as :class:`LCLHead` (``dim`` 512, ``num_heads`` 8, ``layers`` 1, ``mlp_ratio`` 4.0,
    ``dropout`` 0.0, ``correlation_source``, ``ema_momentum`` 0.99, ``ema_warmup``, ``global_branch``
    (False here), ``label_embed_std`` (1.0: the init std of the queries and of the label embeddings),
    ``token_norm`` (False here)), plus ``decoder_layers`` (1) and ``position_encoding`` (True: 2-D sine
    encodings added to the keys).
    """

    def __init__(self, in_features: int, num_labels: int, dim: int = 512, num_heads: int = 8, layers: int = 1,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, correlation_source: str = "attention",
                 ema_momentum: float = 0.99, ema_warmup: bool = True, decoder_layers: int = 1,
                 position_encoding: bool = True, global_branch: bool = False, label_embed_std: float = 1.0,
                 token_norm: bool = False):
        super().__init__(in_features, num_labels, dim, num_heads, layers, mlp_ratio, dropout, correlation_source,
                         ema_momentum, ema_warmup, global_branch, label_embed_std, token_norm)
        if decoder_layers < 1:
            raise CxrlabError(f"label_query: decoder_layers must be >= 1, got {decoder_layers}")
        if position_encoding and dim % 4:
            raise CxrlabError(f"label_query: position_encoding needs dim divisible by 4, got {dim}")
        self.position_encoding = bool(position_encoding)
        self.input_proj = nn.Linear(in_features, dim)
        self.queries = nn.Parameter(torch.empty(num_labels, dim))
        _init_label_vectors(self.queries, label_embed_std)
        self.decoder = nn.ModuleList(_Block(dim, num_heads, mlp_ratio, dropout) for _ in range(decoder_layers))

    def forward(self, fmap: torch.Tensor) -> Output:
        _check_fmap(fmap, self.in_features, "label_query")
        b, _, h, w = fmap.shape
        memory = self.input_proj(fmap.flatten(2).transpose(1, 2))  # B×N×dim
        keys = memory
        if self.position_encoding:
            keys = memory + sine_position_encoding(h, w, self.dim, memory.device, memory.dtype)
        x = self.queries.to(memory.dtype).unsqueeze(0).expand(b, -1, -1)
        weights = None
        for block in self.decoder:
            x, weights = block(x, keys, memory)
        return self._finish(x, weights.reshape(b, self.num_labels, h, w), fmap)
