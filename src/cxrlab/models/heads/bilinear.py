"""Bilinear (second-order) pooling head for fine-grained classification.

Ge et al., "Chest X-rays Classification: A Multi-Label and Fine-Grained Problem", arXiv:1807.07247
(2018), treat pathologies that look alike as a fine-grained problem and classify from bilinear
features (Lin, RoyChowdhury, Maji, "Bilinear CNN Models for Fine-grained Visual Recognition", ICCV
2015). The head:

1. reduces the feature map to ``dim`` channels with a 1×1 convolution (default 256); with
   ``reduce_act: bn_relu`` the convolution (then without bias) is followed by BatchNorm and ReLU, as in
   the reference B-CNN code (jiangtaoxie/fast-MPN-COV, ``BCNN.py``): the reduced map is non-negative, so
   every entry of the full bilinear pool is ≥ 0 (with ``none``, the paper's plain 1×1 convolution, about half of them
   start negative);
2. pools ``b = vec(F Fᵀ / hw)`` over the h×w locations (``dim²`` values: 65,536 for 256);
3. takes the signed square root ``sign(b) √|b|`` and L2-normalises;
4. scores the labels with one linear layer.

``feature_scale`` [ours] multiplies the unit vector before the classifier (default 1: the paper's head).
Under Adam-type optimisers a constant scale on the classifier's input acts like a larger learning rate
of that classifier, so ``optim.head_lr_mult`` (an explicit per-part rate) is the cleaner knob; the
scale stays for the recipes that used it.
A unit vector of K entries has entries of size ~1/√K, so the classifier's logits move √K times slower
per optimiser step than on pooled CNN features; with a short budget (the synthetic comparison's 42
steps) the head is still learning the label base rates when training ends. ``feature_scale: √K``
(e.g. 64 for K = 4,096) gives entries of size ~1, like average-pooled features.

``compact: true`` replaces step 2 by compact bilinear pooling (Gao, Beijbom, Zhang, Darrell, "Compact
Bilinear Pooling", CVPR 2016) to ``compact_dim`` values (8192): ``sketch: tensor_sketch`` (two count
sketches multiplied in the Fourier domain) or ``random_maclaurin`` (product of two random ±1
projections). Both are random features whose inner product approximates the bilinear kernel
``⟨vec(XXᵀ), vec(YYᵀ)⟩ = Σ_{s,t} ⟨x_s, y_t⟩²``; the projections are fixed buffers drawn from ``seed``
and saved with the model.

Extras: ``features`` (B×K, the normalised bilinear vector the classifier reads). The head has no
per-location classifier, so there is no class activation map: heatmaps need a gradient-based method.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CxrlabError, unknown
from ...output import Output
from ...registry import HEADS
from .base import Head

SKETCHES = ("tensor_sketch", "random_maclaurin")
REDUCE_ACTS = ("none", "bn_relu")
HEATMAP_NOTE = ("head 'bilinear' has no class activation map: its classifier reads vec(F Fᵀ/hw), "
                "second-order statistics of the whole feature map, not a score per location, so "
                "w_c · F is not defined; gradient-based maps show where the evidence is")


def signed_sqrt(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``sign(x) √(|x| + eps)`` where x ≠ 0 (0 at 0); eps bounds the gradient near 0."""
    return torch.sign(x) * torch.sqrt(x.abs() + eps)


def bilinear_pool(fmap: torch.Tensor) -> torch.Tensor:
    """B×d×h×w → B×d² ``vec(F Fᵀ / hw)``."""
    b, d, h, w = fmap.shape
    flat = fmap.reshape(b, d, h * w)
    return torch.bmm(flat, flat.transpose(1, 2)).reshape(b, d * d) / (h * w)


class TensorSketch(nn.Module):
    """Tensor sketch of the outer product, averaged over locations: B×d×h×w → B×D.

    For one location x: ``TS(x) = IFFT(FFT(C₁x) ∘ FFT(C₂x))`` with count sketches ``C_k x``
    (``C_k[h_k(i)] += s_k(i) x_i``, random hashes h_k into D bins and signs s_k), so that
    ``E⟨TS(x), TS(y)⟩ = ⟨x, y⟩²``.
    """

    def __init__(self, in_dim: int, out_dim: int, generator: torch.Generator):
        super().__init__()
        self.out_dim = out_dim
        for k in (1, 2):
            index = torch.randint(out_dim, (in_dim,), generator=generator)
            sign = torch.randint(2, (in_dim,), generator=generator).float() * 2 - 1
            sketch = torch.zeros(in_dim, out_dim)
            sketch[torch.arange(in_dim), index] = sign
            self.register_buffer(f"sketch{k}", sketch)  # dense d×D: one matmul per location

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        b, d, h, w = fmap.shape
        x = fmap.float().permute(0, 2, 3, 1).reshape(b, h * w, d)
        f1 = torch.fft.rfft(x @ self.sketch1, dim=-1)
        f2 = torch.fft.rfft(x @ self.sketch2, dim=-1)
        # the average over locations commutes with the (linear) inverse FFT: average first
        return torch.fft.irfft((f1 * f2).mean(dim=1), n=self.out_dim, dim=-1)


class RandomMaclaurin(nn.Module):
    """Random Maclaurin features of the outer product, averaged over locations: B×d×h×w → B×D,
    ``RM(x) = (W₁x) ∘ (W₂x) / √D`` with ±1 entries, so that ``E⟨RM(x), RM(y)⟩ = ⟨x, y⟩²``."""

    def __init__(self, in_dim: int, out_dim: int, generator: torch.Generator):
        super().__init__()
        self.out_dim = out_dim
        for k in (1, 2):
            self.register_buffer(f"proj{k}", torch.randint(2, (in_dim, out_dim), generator=generator).float() * 2 - 1)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        b, d, h, w = fmap.shape
        x = fmap.float().permute(0, 2, 3, 1).reshape(b, h * w, d)
        return ((x @ self.proj1) * (x @ self.proj2)).mean(dim=1) / self.out_dim ** 0.5


@HEADS.register("bilinear")
class BilinearHead(Head):
    """Bilinear pooling head (Ge et al. 2018; Lin et al. ICCV 2015; compact: Gao et al. CVPR 2016).

    Args (``head_args``): ``dim`` channels after the 1×1 reduction (256; 0 or None = no reduction);
    ``compact`` (False); ``sketch`` ``tensor_sketch`` | ``random_maclaurin`` (compact only);
    ``compact_dim`` (8192); ``seed`` of the random projections (0); ``dropout`` before the classifier (0);
    ``feature_scale`` [ours] factor on the normalised vector (1.0); ``reduce_act`` ``none`` (the paper's
    plain 1×1 convolution) | ``bn_relu`` (conv1×1 without bias + BatchNorm + ReLU, the reference B-CNN's
    reduction; needs ``dim`` > 0).
    """

    provides = frozenset({"features"})
    heatmap_note = HEATMAP_NOTE  # no NATIVE_MAPS capability: cxrlab heatmap says why

    def __init__(self, in_features: int, num_labels: int, dim: int | None = 256, compact: bool = False,
                 sketch: str = "tensor_sketch", compact_dim: int = 8192, seed: int = 0, dropout: float = 0.0,
                 feature_scale: float = 1.0, reduce_act: str = "none"):
        super().__init__()
        if sketch not in SKETCHES:
            raise unknown("bilinear head sketch", str(sketch), SKETCHES)
        if reduce_act not in REDUCE_ACTS:
            raise unknown("bilinear head reduce_act", str(reduce_act), REDUCE_ACTS)
        if reduce_act == "bn_relu" and not dim:
            raise CxrlabError(f"head bilinear: reduce_act bn_relu acts on the 1×1 reduction, so it needs "
                              f"dim > 0, got dim={dim}")
        if dim is not None and dim < 0 or compact_dim < 1 or not feature_scale > 0:
            raise CxrlabError(f"head bilinear: need dim >= 0, compact_dim >= 1 and feature_scale > 0, got "
                              f"dim={dim}, compact_dim={compact_dim}, feature_scale={feature_scale}")
        self.feature_scale = float(feature_scale)
        self.in_features = in_features
        self.reduce_act = reduce_act
        if reduce_act == "bn_relu":  # BN supplies the shift, so the convolution has no bias
            self.reduce = nn.Sequential(nn.Conv2d(in_features, dim, kernel_size=1, bias=False),
                                        nn.BatchNorm2d(dim), nn.ReLU(inplace=True))
        else:
            self.reduce = nn.Conv2d(in_features, dim, kernel_size=1) if dim else nn.Identity()
        channels = dim or in_features
        self.compact = bool(compact)
        self.pool = None
        if self.compact:
            generator = torch.Generator().manual_seed(int(seed))
            pool_cls = TensorSketch if sketch == "tensor_sketch" else RandomMaclaurin
            self.pool = pool_cls(channels, compact_dim, generator)
        self.out_features = compact_dim if self.compact else channels * channels
        self.dropout = nn.Dropout(dropout)
        # not called `fc`: the linear-head CAM (w_c · F per location) does not apply here
        self.classifier = nn.Linear(self.out_features, num_labels)

    def embed(self, fmap: torch.Tensor) -> torch.Tensor:
        """B×D×h×w → B×K: reduced, pooled, signed-square-rooted and L2-normalised bilinear vector."""
        if fmap.ndim != 4 or fmap.shape[1] != self.in_features:
            raise CxrlabError(f"head bilinear: expected a B×{self.in_features}×h×w feature map, "
                              f"got shape {tuple(fmap.shape)}")
        reduced = self.reduce(fmap).float()  # second-order sums in fp32 under autocast
        pooled = self.pool(reduced) if self.compact else bilinear_pool(reduced)
        return F.normalize(signed_sqrt(pooled), dim=1)

    def forward(self, fmap: torch.Tensor) -> Output:
        features = self.embed(fmap)
        return Output(self.classifier(self.dropout(features * self.feature_scale)), {"features": features})
