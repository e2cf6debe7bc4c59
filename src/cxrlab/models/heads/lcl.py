"""Label-level heads: LCL (label decomposition by class-wise spatial attention) and label queries.

``lcl`` — Zhang, Liang, Cao, Liu, Yang, Zaiane, "Label correlation guided discriminative label feature
learning for multi-label chest image classification", Computer Methods and Programs in Biomedicine 245
(2024) 108032. The head

1. decomposes the backbone feature map ``F`` (B×D×h×w) into one feature per label with a class-wise
   spatial attention ``a_c = softmax_hw(w_c · F)`` (one learnable vector ``w_c`` per label, CAM style) and
   ``v_c = Σ_hw a_c F``, projected to ``dim`` (d', default 512);
2. models the global label correlation with multi-head self-attention over the C label tokens (learnable
   label embeddings added; residual + LayerNorm + MLP, post-norm; ``layers`` blocks, default 1). The
   last block's attention weights, averaged over heads and batch, are tracked as an exponential moving
   average over training steps: the global correlation matrix ``G`` (C×C, rows sum to 1);
3. classifies each label from its own label feature ("group-wise linear": one weight vector and bias per
   label).

``label_query`` — the Query2Label-style alternative (Liu, Zhang, Yang, Su, Zhu, "Query2Label: A Simple
Transformer Way to Multi-Label Classification", arXiv:2107.10834, 2021): learnable label queries
cross-attend to the flattened, projected feature map (with 2-D sine position encodings on the keys, as
DETR/Query2Label), then the same correlation block and group-wise classifier. Query2Label's decoder also
has a self-attention among the queries; here that role is taken by the correlation block. [ours: offered
as the spec's alternative decomposition.]

Both heads fill the extras (see :mod:`cxrlab.output`): ``label_features`` (B×C×d', after the correlation
block), ``attention`` (B×C×h×w, each map sums to 1 over space: per-label heatmaps), ``label_attention``
(B×C×C, last correlation block, averaged over heads), ``correlation`` (G, C×C) and ``features`` (B×D,
global average pool). The losses ``lcl_consistency`` and ``lcl_supcon`` (:mod:`cxrlab.losses.lcl`) read them.

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
the share of all of G's attention that goes to the single most attended label, 1/C if even) and whether
the class-wise maps focus (``attention_entropy``: mean entropy of the ``attention`` maps over the
training batches / log(h·w), 1 = uniform over the map, i.e. global average pooling).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ...errors import CxrlabError, unknown
from ...output import Output
from ...registry import HEADS

CORRELATION_SOURCES = ("attention", "learned", "cooccurrence")


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


class LabelCorrelation(nn.Module):
    """Global label correlation by self-attention over the C label tokens (LCL design step 3).

    ``forward(tokens B×C×d) -> (tokens B×C×d, attention B×C×C of the last block, averaged over heads)``;
    learnable label embeddings (C×d) are added to the tokens before the first block.
    """

    def __init__(self, num_labels: int, dim: int, num_heads: int, layers: int, mlp_ratio: float, dropout: float):
        super().__init__()
        if layers < 1:
            raise CxrlabError(f"label correlation: layers must be >= 1, got {layers}")
        self.label_embed = nn.Parameter(torch.empty(num_labels, dim))
        nn.init.trunc_normal_(self.label_embed, std=0.02)
        self.blocks = nn.ModuleList(_Block(dim, num_heads, mlp_ratio, dropout) for _ in range(layers))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = tokens + self.label_embed.to(tokens.dtype)
        weights = None
        for block in self.blocks:
            x, weights = block(x)
        return x, weights


class _LabelLevelHead(nn.Module):
    """Shared tail of the label-level heads: correlation block, G tracking, group-wise classifier.

    Subclasses turn the feature map into label tokens (B×C×dim) and spatial maps (B×C×h×w) and call
    :meth:`_finish`.
    """

    def __init__(self, num_labels: int, dim: int, num_heads: int, layers: int, mlp_ratio: float,
                 dropout: float, correlation_source: str, ema_momentum: float, ema_warmup: bool):
        super().__init__()
        name = type(self).__name__
        if correlation_source not in CORRELATION_SOURCES:
            raise unknown(f"{name} correlation_source", correlation_source, CORRELATION_SOURCES)
        if not 0.0 <= ema_momentum < 1.0:
            raise CxrlabError(f"{name}: ema_momentum must be in [0, 1), got {ema_momentum}")
        if dim < 1 or num_heads < 1 or dim % num_heads:
            raise CxrlabError(f"{name}: dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        self.num_labels = num_labels
        self.dim = dim
        self.correlation_source = correlation_source
        self.ema_momentum = float(ema_momentum)
        self.ema_warmup = bool(ema_warmup)
        self.correlation_block = LabelCorrelation(num_labels, dim, num_heads, layers, mlp_ratio, dropout)
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
        self._map_entropy = [0.0, 0]  # running sum and count of normalised attention-map entropies

    @torch.no_grad()
    def _record_maps(self, maps: torch.Tensor) -> None:
        n = maps.shape[-1] * maps.shape[-2]
        if self.training and n > 1:
            p = maps.detach().float().flatten(2)
            entropy = -(torch.xlogy(p, p)).sum(-1) / math.log(n)  # B×C, in [0, 1]
            self._map_entropy[0] += float(entropy.mean())
            self._map_entropy[1] += 1

    @torch.no_grad()
    def epoch_stats(self) -> dict:
        """G's row entropy and top-label share now, and the mean attention-map entropy over the
        training batches since the last call (then reset); see the module notes."""
        g = self.correlation().detach().float().cpu()
        c = g.shape[0]
        rows = -(torch.xlogy(g, g)).sum(-1) / math.log(c)
        out = {"g_row_entropy": float(rows.mean()), "g_top_label_share": float(g.sum(0).max() / g.sum())}
        total, count = self._map_entropy
        if count:
            out["attention_entropy"] = total / count
        self._map_entropy = [0.0, 0]
        return out

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
        self._record_maps(maps)
        label_features, label_attention = self.correlation_block(tokens)
        ema = self._track(label_attention)
        correlation = ema if self.correlation_source == "attention" else self.correlation()
        logits = (label_features * self.cls_weight.to(label_features.dtype)).sum(-1) + self.cls_bias
        return Output(logits, {"label_features": label_features, "attention": maps,
                               "label_attention": label_attention, "correlation": correlation,
                               "features": fmap.mean(dim=(2, 3))})


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
    """LCL head (Zhang et al., CMPB 2024): class-wise spatial attention decomposition, self-attention
    label correlation with an EMA-tracked global correlation G, group-wise linear classifier.

    Args (``head_args``): ``dim`` label-feature size d' (512); ``num_heads`` of the self-attention (8);
    ``layers`` correlation blocks (1); ``mlp_ratio`` (4.0); ``dropout`` in the blocks (0.0);
    ``correlation_source`` ``attention`` | ``learned`` | ``cooccurrence`` (``attention``; the other two are
    [ours]); ``ema_momentum`` of G (0.99); ``ema_warmup`` [ours] (True).
    """

    def __init__(self, in_features: int, num_labels: int, dim: int = 512, num_heads: int = 8, layers: int = 1,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, correlation_source: str = "attention",
                 ema_momentum: float = 0.99, ema_warmup: bool = True):
        super().__init__(num_labels, dim, num_heads, layers, mlp_ratio, dropout, correlation_source,
                         ema_momentum, ema_warmup)
        self.in_features = in_features
        # w_c: one spatial-attention vector per label; small init -> near-uniform maps (v_c ≈ GAP) at start
        self.spatial_weight = nn.Parameter(torch.empty(num_labels, in_features))
        nn.init.normal_(self.spatial_weight, std=0.01)
        self.project = nn.Linear(in_features, dim)

    def forward(self, fmap: torch.Tensor) -> Output:
        _check_fmap(fmap, self.in_features, "lcl")
        b, d, h, w = fmap.shape
        flat = fmap.flatten(2)  # B×D×N
        scores = torch.einsum("cd,bdn->bcn", self.spatial_weight.to(flat.dtype), flat)
        attn = torch.softmax(scores.float(), dim=-1)  # a_c, sums to 1 over space
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
    ``dropout`` 0.0, ``correlation_source``, ``ema_momentum`` 0.99, ``ema_warmup``), plus
    ``decoder_layers`` (1) and ``position_encoding`` (True: 2-D sine encodings added to the keys).
    """

    def __init__(self, in_features: int, num_labels: int, dim: int = 512, num_heads: int = 8, layers: int = 1,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, correlation_source: str = "attention",
                 ema_momentum: float = 0.99, ema_warmup: bool = True, decoder_layers: int = 1,
                 position_encoding: bool = True):
        super().__init__(num_labels, dim, num_heads, layers, mlp_ratio, dropout, correlation_source,
                         ema_momentum, ema_warmup)
        if decoder_layers < 1:
            raise CxrlabError(f"label_query: decoder_layers must be >= 1, got {decoder_layers}")
        if position_encoding and dim % 4:
            raise CxrlabError(f"label_query: position_encoding needs dim divisible by 4, got {dim}")
        self.in_features = in_features
        self.position_encoding = bool(position_encoding)
        self.input_proj = nn.Linear(in_features, dim)
        self.queries = nn.Parameter(torch.empty(num_labels, dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
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
