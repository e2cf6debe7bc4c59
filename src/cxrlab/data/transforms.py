"""Batch augmentation on the training device: B×1×H×W float tensors in [0, 1], every sample with its
own random parameters, every step vectorised over the batch (no Python loop over samples).

``build_augment(spec)`` takes a pipeline name (``none``, ``weak``, ``strong``) or a dict ``{"name":
..., key: value, ...}`` whose keys override that pipeline's defaults (``PIPELINES``). Geometry — the
random affine and the elastic deformation — is composed into one sampling grid and applied with a
single ``grid_sample``, so the image is interpolated once. torchvision's v2 ops (``ElasticTransform``,
``RandomAffine``, ``GaussianBlur``, ...) draw one parameter set per call, so per-sample versions are
built here from ``affine_grid``/``grid_sample`` and grouped convolutions. Randomness comes from torch's
global generator on the batch's device: ``torch.manual_seed`` makes it reproducible.

Keys (probabilities are per sample):

- ``rotate`` degrees (±), ``scale`` (low, high), ``translate`` fraction of the side (±),
  ``hflip`` probability (0 by default: the heart's side is anatomy, not noise);
- ``brightness`` (± offset), ``contrast`` (± relative, around each image's mean), ``gamma`` (low, high);
- ``blur`` probability with ``blur_sigma`` (low, high) pixels; ``noise`` (Gaussian std drawn up to it);
- ``erase`` probability of one random rectangle of ``erase_area`` (low, high) of the image, filled
  with a random grey;
- ``elastic`` probability of an elastic deformation: a per-sample displacement field of uniform noise
  blurred with ``elastic_sigma`` pixels and scaled by ``elastic_alpha`` (torchvision's convention:
  displacement = blur(U(-1, 1)) · alpha / size, in grid units).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import CxrlabError, unknown

Augment = Callable[[torch.Tensor], torch.Tensor]

OFF = {
    "rotate": 0.0, "scale": (1.0, 1.0), "translate": 0.0, "hflip": 0.0,
    "brightness": 0.0, "contrast": 0.0, "gamma": (1.0, 1.0),
    "blur": 0.0, "blur_sigma": (0.1, 1.0), "noise": 0.0,
    "erase": 0.0, "erase_area": (0.02, 0.15),
    "elastic": 0.0, "elastic_alpha": 50.0, "elastic_sigma": 5.0,
}
WEAK = {**OFF, "rotate": 7.0, "scale": (0.9, 1.1), "translate": 0.05}
STRONG = {**WEAK, "brightness": 0.1, "contrast": 0.2, "gamma": (0.8, 1.25), "blur": 0.2, "noise": 0.03,
          "erase": 0.5, "elastic": 0.5}
PIPELINES = {"none": OFF, "weak": WEAK, "strong": STRONG}
PROBABILITIES = ("hflip", "blur", "erase", "elastic")


def build_augment(spec: dict | str | None) -> Augment:
    """A batch augmentation from a pipeline name or a ``{"name": ..., key: value}`` dict."""
    params = parse_spec(spec)
    if params == OFF:
        return _identity
    return BatchAugment(params)


def parse_spec(spec: dict | str | None) -> dict:
    """The full, validated parameter dict of a spec (unknown keys: error naming the closest key)."""
    if spec is None:
        spec = {"name": "none"}
    elif isinstance(spec, str):
        spec = {"name": spec}
    elif not isinstance(spec, dict):
        raise CxrlabError(f"augment spec must be a pipeline name or a dict, got {type(spec).__name__}")
    name = str(spec.get("name", "none"))
    if name not in PIPELINES:
        raise unknown("augment pipeline", name, PIPELINES)
    params = dict(PIPELINES[name])
    for key, value in spec.items():
        if key == "name":
            continue
        if key not in OFF:
            raise unknown("augment key", key, ["name", *OFF])
        params[key] = _value(key, value, OFF[key])
    return params


def _value(key: str, value, default):
    """``value`` checked against the kind of the key's default (a number or a (low, high) pair)."""
    if isinstance(default, tuple):
        ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value)
        if not ok or not 0 <= value[0] <= value[1]:
            raise CxrlabError(f"augment {key}: expected [low, high] with 0 <= low <= high, got {value!r}")
        return (float(value[0]), float(value[1]))
    if isinstance(value, bool) and key in PROBABILITIES:
        value = 0.5 if value else 0.0
    if not _is_number(value) or value < 0 or (key in PROBABILITIES and value > 1):
        limit = "a probability in [0, 1]" if key in PROBABILITIES else "a number >= 0"
        raise CxrlabError(f"augment {key}: expected {limit}, got {value!r}")
    return float(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid(theta, [B, 1, h, w], align_corners=False)`` as one matmul of a shared base grid
    with the B×2×3 maps: the same grid (to float rounding) at 3-4× the speed on CPU, where the
    generic op was the augmentation's largest cost (bench_vs_txv)."""
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=theta.device, dtype=theta.dtype)
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=theta.device, dtype=theta.dtype)
    base = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones_like(xs).expand(h, w)], -1)
    return torch.matmul(base.view(1, h * w, 3), theta.transpose(1, 2)).view(-1, h, w, 2)


def _identity(batch: torch.Tensor) -> torch.Tensor:
    return batch


class BatchAugment:
    """The augmentation for one parameter dict; call it on a B×C×H×W batch."""

    def __init__(self, params: dict):
        self.p = params

    def __repr__(self) -> str:
        return f"BatchAugment({self.p})"

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.ndim != 4:
            raise CxrlabError(f"augment expects a B×C×H×W batch, got shape {tuple(batch.shape)}")
        dtype = batch.dtype
        x = batch.float()
        x = self.geometry(x)
        x = self.intensity(x)
        x = self.blur(x)
        x = self.noise(x)
        x = self.erase(x)
        return x.clamp_(0.0, 1.0).to(dtype)

    # --- geometry: one grid, one resampling

    def geometry(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        affine = p["rotate"] > 0 or p["scale"] != (1.0, 1.0) or p["translate"] > 0 or p["hflip"] > 0
        elastic = p["elastic"] > 0 and p["elastic_alpha"] > 0
        if not (affine or elastic):
            return x
        b, _, h, w = x.shape
        grid = affine_grid(self._theta(b, x.device), h, w)
        if elastic:
            grid = grid + self._displacement(b, h, w, x.device)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _theta(self, b: int, device) -> torch.Tensor:
        """B×2×3 inverse maps (output → input coordinates) of a random rotation, scale, shift and flip."""
        p = self.p
        angle = _uniform(b, -p["rotate"], p["rotate"], device) * (math.pi / 180)
        scale = _uniform(b, *p["scale"], device)
        shift = _uniform((b, 2), -2 * p["translate"], 2 * p["translate"], device)  # grid spans 2 units
        flip = torch.where(torch.rand(b, device=device) < p["hflip"], -1.0, 1.0)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                             torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
        return theta

    def _displacement(self, b: int, h: int, w: int, device) -> torch.Tensor:
        """B×H×W×2 smooth random displacements (zero for samples that skip the elastic step)."""
        p = self.p
        noise = torch.rand(b, 2, h, w, device=device) * 2 - 1
        field = _gaussian_blur(noise, torch.full((b * 2,), p["elastic_sigma"], device=device))
        field = field * (p["elastic_alpha"] / torch.tensor([w, h], device=device).view(1, 2, 1, 1))
        apply = (torch.rand(b, device=device) < p["elastic"]).float().view(b, 1, 1, 1)
        return (field * apply).permute(0, 2, 3, 1)

    # --- intensity

    def intensity(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        b = x.shape[0]
        if p["contrast"] > 0:
            c = _uniform(b, 1 - p["contrast"], 1 + p["contrast"], x.device).view(b, 1, 1, 1)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * c + mean
        if p["brightness"] > 0:
            x = x + _uniform(b, -p["brightness"], p["brightness"], x.device).view(b, 1, 1, 1)
        if p["gamma"] != (1.0, 1.0):
            g = _uniform(b, *p["gamma"], x.device).view(b, 1, 1, 1)
            x = x.clamp(0.0, 1.0).pow(g)
        return x

    def blur(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        if p["blur"] <= 0:
            return x
        b, c = x.shape[:2]
        sigma = _uniform(b, *p["blur_sigma"], x.device)
        apply = torch.rand(b, device=x.device) < p["blur"]
        blurred = _gaussian_blur(x, sigma.repeat_interleave(c), max_sigma=p["blur_sigma"][1])
        return torch.where(apply.view(b, 1, 1, 1), blurred, x)

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        if self.p["noise"] <= 0:
            return x
        std = _uniform(x.shape[0], 0.0, self.p["noise"], x.device).view(-1, 1, 1, 1)
        return x + std * torch.randn_like(x)

    def erase(self, x: torch.Tensor) -> torch.Tensor:
        """One random rectangle per chosen sample, filled with a random grey (cutout)."""
        p = self.p
        if p["erase"] <= 0:
            return x
        b, _, h, w = x.shape
        dev = x.device
        area = _uniform(b, *p["erase_area"], dev)
        ratio = torch.exp(_uniform(b, math.log(0.3), math.log(3.3), dev))
        eh = (torch.sqrt(area * ratio) * h).clamp(1, h)
        ew = (torch.sqrt(area / ratio) * w).clamp(1, w)
        top = torch.rand(b, device=dev) * (h - eh)
        left = torch.rand(b, device=dev) * (w - ew)
        ys = torch.arange(h, device=dev).view(1, h, 1)
        xs = torch.arange(w, device=dev).view(1, 1, w)
        inside = ((ys >= top.view(b, 1, 1)) & (ys < (top + eh).view(b, 1, 1))
                  & (xs >= left.view(b, 1, 1)) & (xs < (left + ew).view(b, 1, 1)))
        inside &= (torch.rand(b, device=dev) < p["erase"]).view(b, 1, 1)
        fill = torch.rand(b, device=dev).view(b, 1, 1, 1).expand_as(x)
        return torch.where(inside.unsqueeze(1), fill, x)


def _uniform(shape, low: float, high: float, device) -> torch.Tensor:
    return torch.rand(shape, device=device) * (high - low) + low


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float | None = None) -> torch.Tensor:
    """Separable Gaussian blur of B×C×H×W with one sigma per (sample, channel) (``sigma``: B·C),
    reflect-padded; one grouped convolution per axis for the whole batch."""
    b, c, h, w = x.shape
    radius = int(math.ceil(3 * float(max_sigma if max_sigma is not None else sigma.max())))
    radius = max(1, min(radius, (min(h, w) - 1)))
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps.view(1, -1) / sigma.view(-1, 1).clamp_min(1e-3)) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)                                  # (B·C)×K
    flat = x.reshape(1, b * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(b * c, 1, 1, -1),
                    groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(b * c, 1, -1, 1),
                    groups=b * c)
    return flat.view(b, c, h, w)
