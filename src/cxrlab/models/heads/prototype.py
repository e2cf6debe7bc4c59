"""``prototype`` head: images and label texts in one metric space, labels scored by cosine similarity.

The visual branch of DWML (Jin, Lu, Zhu, Huo, "Deep learning based classification of multi-label chest
X-ray images via dual-weighted metric loss", Comput. Biol. Med. 157 (2023) 106683):

* the pooled backbone feature goes through an MLP to ``z_i`` (``dim``, 256), L2-normalised;
* each label's text vector ``t_c`` (from :mod:`cxrlab.models.text`, fixed) goes through a trainable
  linear projection to the prototype ``q_c`` (``dim``), L2-normalised;
* ``m_ic = cos(z_i, q_c)`` and the logit is ``κ m_ic + b_c`` with learnable ``κ`` (kept positive as
  ``exp(log κ)``, start 16) and ``b_c`` (start ``−κ·0.3``, the midpoint of the dwml loss's margins
  0.5 and 0.1, so ``sigmoid(logit)`` starts on the loss's decision boundary).

Options beside the cosine above (Jin et al.'s sibling paper, Jin, Lu, Li, Wang, Multimedia Tools and
Applications 2023, PMC10015533, describes a *fixed* semantic extractor and a *Euclidean* metric):

* ``metric`` [ours, the form]: ``cosine`` (default); ``euclidean``: ``z`` and ``q`` unnormalised and
  ``m_ic = 1 − ½‖z_i − q_c‖²``, which equals the cosine when both are unit vectors, so the dwml loss's
  margins keep their meaning, but lets norms differ; ``dot``: ``z`` unnormalised, ``q`` unit and
  ``m_ic = z_i · q_c``. On unit vectors an image with k findings whose prototypes are near-orthogonal
  reaches at most cos = 1/√k with each of them (its positives compete for one direction); with ``dot``
  ``z = Σ_c q_c`` scores every one of them 1, and with ``euclidean`` the centroid of the k prototypes
  scores each ½ + 1/(2k) (0.625 for k = 4, against the cosine's 0.5).
* ``freeze_text``: the text projection keeps its orthogonal start and is never trained (it has no
  gradient, so no optimiser step, weight decay included, changes it): the prototypes are a fixed
  isometric image of the text vectors (exactly so when T ≤ ``dim``).

The text vectors are a buffer (``label_text``, L×T) set by :meth:`set_label_text` (the pipeline calls
it from ``model.text_encoder``); they are saved with the weights, and a head built bare and given a
checkpoint's state dict takes their shape from it, so prediction and export never run a text encoder.

Extras (see :mod:`cxrlab.output`): ``embedding`` (z, B×dim), ``prototypes`` (q, L×dim),
``similarity`` (m, B×L, in [−1, 1] for ``cosine``; at most 1 for ``euclidean``) and ``features`` (the pooled backbone feature).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CxrlabError, unknown
from ...output import Output
from ...registry import HEADS
from .base import Capability, Head

METRICS = ("cosine", "euclidean", "dot")


@HEADS.register("prototype")
class PrototypeHead(Head):
    """Args (``head_args``): ``dim`` of the metric space (256); ``hidden`` width of the image MLP (512);
    ``kappa`` the starting scale κ (16); ``learn_kappa`` (True); ``dropout`` before the MLP (0.0);
    ``metric`` ``cosine`` | ``euclidean`` | ``dot`` and ``freeze_text`` (False), see the module docstring."""

    provides = frozenset({"embedding", "prototypes", "similarity", "features"})
    capabilities = frozenset({Capability.LABEL_TEXT})

    def __init__(self, in_features: int, num_labels: int, dim: int = 256, hidden: int = 512,
                 kappa: float = 16.0, learn_kappa: bool = True, dropout: float = 0.0, metric: str = "cosine",
                 freeze_text: bool = False):
        super().__init__()
        if dim < 1 or hidden < 1 or kappa <= 0:
            raise CxrlabError(f"head prototype: need dim >= 1, hidden >= 1 and kappa > 0, got dim={dim}, "
                              f"hidden={hidden}, kappa={kappa}")
        if metric not in METRICS:
            raise unknown("prototype head metric", str(metric), METRICS)
        if not isinstance(freeze_text, bool):
            raise CxrlabError(f"head prototype: freeze_text must be true or false, got {freeze_text!r}")
        self.metric, self.freeze_text = metric, freeze_text
        self.in_features, self.num_labels, self.dim = in_features, num_labels, dim
        self.embed = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
                                   nn.Linear(hidden, dim))
        self.log_kappa = nn.Parameter(torch.tensor(math.log(kappa)), requires_grad=bool(learn_kappa))
        self.bias = nn.Parameter(torch.full((num_labels,), -0.3 * kappa))
        self.register_buffer("label_text", torch.zeros(num_labels, 0))
        self.text_proj: nn.Linear | None = None
        self.text_identity: dict | None = None  # what produced label_text (set_label_text's caller says)

    # ---------------------------------------------------------------- text vectors
    def set_label_text(self, vectors, identity: dict | None = None) -> None:
        """Fix the label text vectors (L×T) and build the prototype projection T -> dim for them.
        Setting vectors of the same width again keeps the trained projection."""
        v = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
        if v.ndim != 2 or v.shape[0] != self.num_labels or v.shape[1] < 1:
            raise CxrlabError(f"head prototype: expected {self.num_labels} label text vectors (an "
                              f"{self.num_labels}×T matrix), got shape {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise CxrlabError("head prototype: the label text vectors are not all finite")
        self._materialise(v.shape[1])
        with torch.no_grad():
            self.label_text.copy_(v.to(self.label_text.device))
        self.text_identity = identity

    def _materialise(self, text_dim: int) -> None:
        if self.text_proj is not None and self.text_proj.in_features == text_dim:
            return
        device = self.bias.device
        self.label_text = torch.zeros(self.num_labels, text_dim, device=device)
        self.text_proj = nn.Linear(text_dim, self.dim, bias=False).to(device)
        # orthogonal start: the prototypes' cosines begin as the text vectors' own (for T >= dim,
        # an orthogonal map with orthonormal rows is close to it), so the text's geometry is live at step 0
        nn.init.orthogonal_(self.text_proj.weight)
        self.text_proj.weight.requires_grad_(not self.freeze_text)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # a bare head (built from a checkpoint's recipe) takes the text width from the saved vectors
        saved = state_dict.get(prefix + "label_text")
        proj = state_dict.get(prefix + "text_proj.weight")
        if saved is not None and saved.ndim == 2:
            if saved.shape[0] != self.num_labels:
                raise CxrlabError(f"head prototype: the saved label text has {saved.shape[0]} rows, "
                                  f"the model has {self.num_labels} labels")
            if proj is not None and tuple(proj.shape) != (self.dim, saved.shape[1]):
                raise CxrlabError(f"head prototype: the saved prototype projection is {tuple(proj.shape)}, "
                                  f"this head needs ({self.dim}, {saved.shape[1]}) (head_args dim={self.dim}); "
                                  "the checkpoint was trained with another prototype dimension")
            self._materialise(saved.shape[1])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # ---------------------------------------------------------------- forward
    @property
    def kappa(self) -> torch.Tensor:
        return self.log_kappa.exp()

    def prototypes(self) -> torch.Tensor:
        """The class prototypes q (L×dim): L2-normalised, except with ``metric: euclidean``."""
        if self.text_proj is None:
            raise CxrlabError("head prototype has no label text vectors: call set_label_text(vectors) "
                              "(the training pipeline does, from model.text_encoder)")
        q = self.text_proj(self.label_text)
        return q if self.metric == "euclidean" else F.normalize(q, dim=-1)

    def scores(self, z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``m`` (B×L) of embeddings z (unit for ``cosine``) and prototypes q, by ``metric``."""
        if self.metric == "euclidean":
            # ½‖z − q‖² expanded (no B×L×dim difference tensor); equals 1 − cos on unit vectors
            half_sq = 0.5 * ((z * z).sum(1, keepdim=True) + (q * q).sum(1)[None, :]) - z @ q.t()
            return 1.0 - half_sq
        return z @ q.t()

    def forward(self, fmap: torch.Tensor) -> Output:
        if fmap.ndim != 4 or fmap.shape[1] != self.in_features:
            raise CxrlabError(f"head prototype: expected a B×{self.in_features}×h×w feature map, got "
                              f"shape {tuple(fmap.shape)}")
        pooled = fmap.mean(dim=(2, 3))
        z = self.embed(pooled).float()
        z = F.normalize(z, dim=-1) if self.metric == "cosine" else z
        q = self.prototypes().float()
        similarity = self.scores(z, q)
        logits = self.kappa * similarity + self.bias
        return Output(logits, {"embedding": z, "prototypes": q, "similarity": similarity, "features": pooled})
