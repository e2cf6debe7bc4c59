"""The normal chest of a synthetic radiograph (see ``cxrlab.data.synthetic``): coordinates, lung
fields, heart, mediastinum, bones and vessel markings as a density map, and the exposure that turns the
density into pixels. Findings (``painter``) change its geometry and add to its density."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

@dataclass
class Lung:
    """One lung field: an ellipse (centre cx, cy; half-axes a, b) cut from below by a domed diaphragm
    whose top is at ``base - dome``. ``lateral`` is -1 for the image-left lung, +1 for the right."""

    cx: float
    cy: float
    a: float
    b: float
    base: float
    dome: float
    lateral: int

    def point(self, ux: float, uy: float, top: float = 0.15, bottom: float = 0.9) -> tuple[float, float]:
        """A point inside the lung from two uniforms; ``uy`` spans ``top``..``bottom`` of its height."""
        apex = self.cy - self.b
        y = apex + (top + (bottom - top) * uy) * (self.base - self.dome * 0.5 - apex)
        half = self.a * np.sqrt(max(1.0 - ((y - self.cy) / self.b) ** 2, 0.0)) * 0.75
        return self.cx + (2 * ux - 1) * half, y


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1] (x to the image right, y down)."""
    t = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2 - 1
    return np.meshgrid(t, t)


@lru_cache(maxsize=8)
def _upsampler(size: int, grid: int) -> np.ndarray:
    """size×grid bilinear interpolation matrix: ``U @ noise @ U.T`` is a smooth size×size field."""
    pos = np.clip((np.arange(size) + 0.5) / size * (grid - 1), 0, grid - 1)
    lo = np.minimum(pos.astype(int), grid - 2)
    frac = (pos - lo).astype(np.float32)
    out = np.zeros((size, grid), dtype=np.float32)
    out[np.arange(size), lo] = 1 - frac
    out[np.arange(size), lo + 1] = frac
    return out


def ramp(d: np.ndarray, width: float) -> np.ndarray:
    """A soft step: 0 where ``d`` << 0, 1 where ``d`` >> 0, linear over ``width``."""
    return np.clip(0.5 + d / width, 0.0, 1.0)


def radius(x, y, cx, cy, a, b, angle: float = 0.0) -> np.ndarray:
    """Normalised elliptical radius (1 on the ellipse)."""
    dx, dy = x - cx, y - cy
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    return np.sqrt((dx / a) ** 2 + (dy / b) ** 2)


def blob(x, y, cx, cy, r) -> np.ndarray:
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (r * r))


class Chest:
    """The drawing of one image: coordinates, anatomy and the density map findings add to."""

    def __init__(self, size: int, anatomy: np.ndarray, jitter: np.ndarray, noise: np.ndarray, ap: bool):
        self.size, self.px = size, 2.0 / size
        gx, gy = _grid(size)
        angle = (jitter[0] - 0.5) * np.deg2rad(8)
        scale = 0.92 + 0.14 * jitter[1]
        dx, dy = (jitter[2] - 0.5) * 0.16, (jitter[3] - 0.5) * 0.14
        c, s = np.cos(angle), np.sin(angle)
        self.x = ((c * (gx - dx) + s * (gy - dy)) / scale).astype(np.float32)
        self.y = ((-s * (gx - dx) + c * (gy - dy)) / scale).astype(np.float32)
        self.edge = 2.5 * self.px / scale
        up = _upsampler(size, noise.shape[-1])
        self.fields = [up @ f @ up.T for f in noise]          # smooth N(0, ~0.5) fields
        self.a = anatomy
        self.ap = ap
        inspiration = 0.93 if ap else 1.0                     # AP films: supine, shallower breath
        self.heart_scale = (0.86 + 0.2 * anatomy[3]) * (1.08 if ap else 1.0)
        lung_b = (0.56 + 0.08 * anatomy[2]) * inspiration
        lung_a = 0.26 + 0.04 * anatomy[1]
        base = 0.42 + 0.08 * anatomy[5] - (0.05 if ap else 0.0)
        self.lungs = [
            Lung(-0.41 - 0.03 * anatomy[1], base - lung_b * 0.8, lung_a, lung_b, base, 0.12, -1),
            Lung(0.41 + 0.03 * anatomy[1], base - lung_b * 0.8 + 0.02, lung_a * 0.95, lung_b, base + 0.03,
                  0.11, +1),
        ]
        self.lung_dark = 0.27 + 0.07 * anatomy[9]
        self.markings = 1.0
        self.mediastinum_extra = 0.0                          # widening (Enlarged Cardiomediastinum)
        self.density = np.zeros_like(self.x)

    def mediastinum(self, extra: float = 0.0) -> np.ndarray:
        """The (upper) mediastinum, widened by ``extra`` on each side."""
        width = 0.09 + 0.03 * self.a[4]
        if extra:
            width = width + extra
        return ramp(width - np.abs(self.x - 0.02), self.edge) * ramp(0.2 - self.y, 0.2)

    def layout(self) -> None:
        """Lung fields, their normalised radii and the heart, after findings changed the geometry."""
        self.r, self.masks = [], []
        for lung in self.lungs:
            r = radius(self.x, self.y, lung.cx, lung.cy, lung.a, lung.b)
            q = np.clip((self.x - lung.cx) / lung.a, -1, 1)
            dome = lung.base - lung.dome * (1 - q * q)
            self.r.append(r)
            self.masks.append(ramp(1 - r, self.edge / lung.a) * ramp(dome - self.y, self.edge))
        self.lung = self.masks[0] + self.masks[1]
        s = self.heart_scale
        r = radius(self.x, self.y, 0.08 + 0.08 * (s - 1), self.lungs[0].base - 0.14 * s, 0.31 * s, 0.21 * s,
                    angle=-0.3)
        self.heart = ramp(1 - r, self.edge / 0.2)
        hidden = 1 - 0.85 * self.heart                        # lung behind the heart shows little
        if self.mediastinum_extra:                            # a wide mediastinum hides the medial lungs
            hidden = hidden * (1 - 0.85 * self.mediastinum(self.mediastinum_extra))
        self.open_masks = [m * hidden for m in self.masks]
        self.open_lung = self.lung * hidden

    def draw_anatomy(self) -> None:
        """Body, lungs, heart, mediastinum, spine, ribs, clavicles and vessel markings (as density).

        The heart and mediastinum are soft tissue like the rest of the body: they show only where
        they hide the dark lungs, as on a real film."""
        a, x, y = self.a, self.x, self.y
        half_width = 0.84 + 0.1 * a[0]
        body = ramp(1 - ((x / half_width) ** 4 + ((y - 0.3) / 1.4) ** 4) ** 0.25, 0.04)
        heart = self.heart
        mediastinum = self.mediastinum(self.mediastinum_extra)
        spine = ramp(0.055 - np.abs(x - 0.01 * (a[6] - 0.5)), self.edge)
        vertebrae = 0.6 + 0.4 * np.cos(2 * np.pi * y / 0.14)
        period = 0.15 + 0.04 * a[7]
        v = y - 0.3 * np.abs(x) + 0.5 * x * x
        ribs = ramp(np.cos(2 * np.pi * v / period + 6.28 * a[8]) - 0.6, 0.4) * ramp(0.5 - y, 0.1)
        clavicle = np.exp(-((y + 0.66 - 0.3 * np.abs(x)) / 0.04) ** 2) * ramp(0.6 - np.abs(x), 0.1)
        hila = blob(x, y, -0.22, -0.05, 0.22) + blob(x, y, 0.22, -0.03, 0.2)
        vessels = np.abs(self.fields[0]) * (0.35 + hila) * self.markings
        self.vessels = vessels * self.lung
        self.density += (0.06 + (0.44 + 0.08 * a[10]) * body + 0.06 * mediastinum + 0.07 * spine * vertebrae
                         - self.lung_dark * self.open_lung + 0.04 * heart
                         + 0.06 * ribs * body + 0.1 * clavicle * body + 0.07 * self.vessels)
        if self.ap:  # scapulae project over the lateral upper lungs on AP films
            self.density += 0.05 * ramp(np.abs(x) - 0.62, 0.1) * ramp(0.1 - y, 0.2) * body

    def finish(self, look: np.ndarray, pixel_noise: np.ndarray) -> np.ndarray:
        """Global contrast, brightness, gamma and noise: what differs between machines and exposures."""
        img = (self.density - 0.4) * (0.8 + 0.4 * look[0]) + 0.4 + (look[1] - 0.5) * 0.14
        img = np.clip(img, 0.0, 1.0) ** (0.8 + 0.45 * look[2])
        img += (0.01 + 0.025 * look[3]) * pixel_noise
        return np.clip(img, 0.0, 1.0)
