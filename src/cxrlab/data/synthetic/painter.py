"""The findings of a synthetic radiograph and ``render``, which draws one image (see
``cxrlab.data.synthetic``): each finding of NIH-14 and CheXpert-14 as its own radiological pattern with
random location, size and intensity, on the chest of ``anatomy``."""
from __future__ import annotations

import numpy as np

from ...labels import NIH14
from .anatomy import Chest, blob, radius, ramp
from .tables import LABEL_SETS, STREAM_ANATOMY, STREAM_IMAGE, random_stream

# Findings. Each has two parts: ``_SHAPE`` changes the geometry before the lungs are drawn, ``_DRAW``
# adds a density pattern after; both read only their own 12 uniforms ``u``. Every amount goes through
# ``_sev``: u[0] is the severity, and u[11] < FAINT makes the finding faint, nearly invisible, as a
# report-mined label (NIH's are) sometimes is: this keeps the attainable AUC below 1.
FAINT, FAINT_SCALE = 0.15, 0.1


def _sev(u, low: float, high: float) -> float:
    return (low + (high - low) * u[0]) * (FAINT_SCALE if u[11] < FAINT else 1.0)


def _shape_atelectasis(c: Chest, u) -> None:
    c.lungs[int(u[1] < 0.5)].base -= _sev(u, 0.03, 0.09)          # volume loss: raised hemidiaphragm


def _shape_cardiomegaly(c: Chest, u) -> None:
    c.heart_scale *= 1 + _sev(u, 0.16, 0.4)


def _shape_emphysema(c: Chest, u) -> None:
    for lung in c.lungs:                                         # large, hyperinflated, flat domes
        lung.b *= 1 + _sev(u, 0.05, 0.12)
        lung.a *= 1 + _sev(u, 0.03, 0.07)
        lung.base += _sev(u, 0.04, 0.09)
        lung.dome *= 0.3
    c.lung_dark += _sev(u, 0.03, 0.09)
    c.markings *= 1 - _sev(u, 0.5, 0.5)


def _shape_fibrosis(c: Chest, u) -> None:
    for lung in c.lungs:
        lung.b *= 1 - _sev(u, 0.03, 0.06)


def _draw_atelectasis(c: Chest, u) -> None:
    lung = c.lungs[int(u[1] < 0.5)]
    px, py = lung.point(u[2], u[3], top=0.55, bottom=0.9)
    angle = (u[4] - 0.5) * 0.7
    half = 0.1 + 0.12 * u[5]
    dx, dy = c.x - px, c.y - py
    along = np.clip(dx * np.cos(angle) + dy * np.sin(angle), -half, half)
    dist = np.hypot(dx - along * np.cos(angle), dy - along * np.sin(angle))
    band = np.exp(-(dist / (0.025 + 0.02 * u[6])) ** 2)
    c.density += _sev(u, 0.12, 0.24) * band * c.open_lung


def _draw_effusion(c: Chest, u) -> None:
    sides = (0,) if u[1] < 0.4 else (1,) if u[1] < 0.8 else (0, 1)
    for side in sides:
        lung = c.lungs[side]
        level = lung.base - lung.dome - _sev(u, 0.04, 0.29) * (1 if side == sides[0] else u[2])
        lateral = np.clip((c.x - lung.cx) * lung.lateral / lung.a, -1, 1)
        surface = level - (0.04 + 0.1 * u[3]) * (lateral + 1) / 2    # meniscus: higher laterally
        fluid = ramp(c.y - surface, 0.04 + 0.04 * u[4])
        c.density += _sev(u, 0.2, 0.3) * fluid * c.open_masks[side]


def _patchy(c: Chest, u, field: np.ndarray, top: float, bottom: float, radius: float, amp: float,
            threshold: float) -> None:
    """Ill-defined opacity: a smooth noise field kept above ``threshold`` inside a blob in one lung
    (or both), for infiltration- and pneumonia-like patterns."""
    sides = (int(u[1] < 0.5),) if u[2] < 0.7 else (0, 1)
    envelope = np.zeros_like(c.x)
    for side in sides:
        px, py = c.lungs[side].point(u[3], u[4], top, bottom)
        envelope += blob(c.x, c.y, px, py, radius)
    texture = np.clip(field - threshold + 0.6, 0, 1)
    c.density += amp * np.minimum(envelope, 1) * texture * c.open_lung


def _draw_infiltration(c: Chest, u) -> None:
    _patchy(c, u, c.fields[1], 0.2, 0.9, 0.18 + 0.17 * u[5], _sev(u, 0.1, 0.2), threshold=0.3 * u[6])


def _draw_pneumonia(c: Chest, u) -> None:
    field = 0.6 * c.fields[2] + 0.5
    _patchy(c, u, field, 0.45, 0.95, 0.14 + 0.14 * u[5], _sev(u, 0.1, 0.22), threshold=0.2 * u[6])


def _draw_mass(c: Chest, u) -> None:
    px, py = c.lungs[int(u[1] < 0.5)].point(u[2], u[3], 0.1, 0.85)
    r = 0.08 + 0.08 * u[4]
    lobes = blob(c.x, c.y, px, py, r) + 0.6 * blob(c.x, c.y, px + r * (u[5] - 0.5), py + r * (u[6] - 0.5), r * 0.7)
    c.density += _sev(u, 0.18, 0.32) * np.clip(lobes * 1.6, 0, 1)


def _draw_nodule(c: Chest, u) -> None:
    px, py = c.lungs[int(u[1] < 0.5)].point(u[2], u[3], 0.1, 0.85)
    r = 0.035 + 0.03 * u[4]
    c.density += _sev(u, 0.2, 0.36) * np.clip(blob(c.x, c.y, px, py, r) * 1.5, 0, 1)


def _draw_pneumothorax(c: Chest, u) -> None:
    side = int(u[1] < 0.5)
    lung, r, mask = c.lungs[side], c.r[side], c.masks[side]
    edge = 1 - _sev(u, 0.15, 0.45)                                # collapsed lung edge (radius)
    where = ramp(lung.cy + 0.3 * lung.b - c.y, 0.2) * ramp((c.x - lung.cx) * lung.lateral + 0.4 * lung.a, 0.2)
    rim = ramp(r - edge, 0.03) * where * mask                    # air without lung markings
    line = np.exp(-((r - edge) / 0.03) ** 2) * where * mask       # the visceral pleural line
    c.density += -_sev(u, 0.08, 0.14) * rim - _sev(u, 0.07, 0.07) * c.vessels * rim + _sev(u, 0.05, 0.09) * line


def _draw_consolidation(c: Chest, u) -> None:
    side = int(u[1] < 0.5)
    px, py = c.lungs[side].point(u[2], u[3], 0.2, 0.85)
    r = radius(c.x, c.y, px, py, 0.1 + 0.12 * u[4], 0.08 + 0.1 * u[5], angle=(u[6] - 0.5) * 2)
    region = ramp(1 - r, 0.25) * (0.85 + 0.15 * np.clip(c.fields[1], -1, 1))
    c.density += _sev(u, 0.18, 0.3) * region * c.open_masks[side]


def _draw_edema(c: Chest, u) -> None:
    radius = 0.28 + 0.16 * u[1]
    haze = blob(c.x, c.y, -0.22, -0.02, radius) + blob(c.x, c.y, 0.22, 0.0, radius)
    c.density += (_sev(u, 0.07, 0.15) * np.minimum(haze, 1) + _sev(u, 0.05, 0.05) * c.vessels) * c.open_lung


def _draw_emphysema(c: Chest, u) -> None:
    pass  # all in the geometry (hyperinflation, lucency, fewer markings)


def _draw_fibrosis(c: Chest, u) -> None:
    period = 0.1 + 0.05 * u[1]
    warp = 0.12 * c.fields[2]
    lines = np.zeros_like(c.x)
    for angle in (u[2] * np.pi, u[2] * np.pi + np.pi / 2.5):
        t = (c.x * np.cos(angle) + c.y * np.sin(angle) + warp) / period
        lines += np.exp(-(np.sin(np.pi * t) / 0.3) ** 2)
    zone = sum(ramp(r - 0.45, 0.3) for r in c.r) * ramp(c.y - 0.2 * u[3] + 0.2, 0.4)
    c.density += _sev(u, 0.05, 0.11) * np.minimum(lines, 1) * zone * c.open_lung


def _draw_pleural_thickening(c: Chest, u) -> None:
    sides = (int(u[1] < 0.5),) if u[2] < 0.7 else (0, 1)
    width = 0.08 + 0.07 * u[3]
    for side in sides:
        lung, r = c.lungs[side], c.r[side]
        lateral = ramp((c.x - lung.cx) * lung.lateral, 0.2) if u[4] < 0.5 else ramp(lung.cy - c.y, 0.2)
        rim = ramp(r - (1 - width), 0.03) * lateral
        c.density += _sev(u, 0.12, 0.24) * rim * c.masks[side]


def _draw_hernia(c: Chest, u) -> None:
    cx, cy = 0.03 + 0.1 * (u[1] - 0.5), c.lungs[0].base - 0.1 - 0.06 * u[2]
    r = 0.07 + 0.06 * u[0]
    inside = ramp(1 - radius(c.x, c.y, cx, cy, r * 1.2, r), 0.15)
    gas = inside * ramp(cy + 0.2 * r - c.y, 0.02)                 # air above an air-fluid level
    wall = np.exp(-((radius(c.x, c.y, cx, cy, r * 1.2, r) - 1) / 0.2) ** 2)
    c.density += _sev(u, 0.1, 0.18) * (-gas + 0.4 * wall)


# CheXpert observations without an NIH drawing of their own.

def _shape_enlarged_cardiomediastinum(c: Chest, u) -> None:
    c.mediastinum_extra += _sev(u, 0.05, 0.12)                  # widened upper mediastinum
    c.heart_scale *= 1 + _sev(u, 0.0, 0.1) * (u[1] < 0.5)        # sometimes with a larger heart too


def _draw_enlarged_cardiomediastinum(c: Chest, u) -> None:
    c.density += _sev(u, 0.04, 0.08) * c.mediastinum(c.mediastinum_extra) * c.lung


def _draw_lung_opacity(c: Chest, u) -> None:
    """A hazy, smooth (ground-glass) opacity in one lung or both: softer and wider than
    consolidation, without infiltration's texture."""
    sides = (int(u[1] < 0.5),) if u[2] < 0.6 else (0, 1)
    envelope = np.zeros_like(c.x)
    for side in sides:
        px, py = c.lungs[side].point(u[3], u[4], 0.25, 0.95)
        envelope += blob(c.x, c.y, px, py, 0.16 + 0.16 * u[5])
    haze = np.minimum(envelope, 1) * (0.8 + 0.2 * np.clip(c.fields[0], -1, 1))
    c.density += _sev(u, 0.08, 0.16) * haze * c.open_lung


def _draw_lung_lesion(c: Chest, u) -> None:
    (_draw_nodule if u[7] < 0.5 else _draw_mass)(c, u)


def _draw_pleural_other(c: Chest, u) -> None:
    """Pleural thickening, or calcified pleural plaques: short, bright streaks along the lateral
    chest wall or the diaphragm."""
    if u[7] < 0.5:
        _draw_pleural_thickening(c, u)
        return
    for k in range(2 + int(u[8] * 3)):
        lung = c.lungs[int((u[1] + 0.37 * k) % 1 < 0.5)]
        t = (u[2] + 0.29 * k) % 1
        if u[3] < 0.5:   # lateral wall
            px, py = lung.cx + lung.lateral * lung.a * 0.92, lung.cy - lung.b * (0.5 - t)
            r = radius(c.x, c.y, px, py, 0.02, 0.07)
        else:            # diaphragm
            px, py = lung.cx + lung.lateral * lung.a * (t - 0.4), lung.base - lung.dome * 0.8
            r = radius(c.x, c.y, px, py, 0.07, 0.02)
        c.density += _sev(u, 0.12, 0.22) * ramp(1 - r, 0.5)


def _draw_fracture(c: Chest, u) -> None:
    """A healing rib fracture on the lateral chest wall: a bright callus across a rib and a thin
    dark fracture gap through it."""
    lung = c.lungs[int(u[1] < 0.5)]
    py = lung.cy - lung.b * (0.6 - 1.0 * u[2])
    px = lung.cx + lung.lateral * lung.a * (0.75 + 0.2 * u[3])
    r = 0.03 + 0.02 * u[4]
    callus = ramp(1 - radius(c.x, c.y, px, py, r * 1.4, r), 0.4)
    angle = (u[5] - 0.5) * 1.2
    gap = np.exp(-(((c.x - px) * np.cos(angle) + (c.y - py) * np.sin(angle)) / 0.012) ** 2) * callus
    c.density += _sev(u, 0.12, 0.22) * callus - _sev(u, 0.06, 0.1) * gap


def _tube(c: Chest, points, width: float) -> np.ndarray:
    """A thin line along a polyline through ``points`` (x, y pairs): a catheter or tube."""
    out = np.zeros_like(c.x)
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((c.x - x0) * dx + (c.y - y0) * dy) / (dx * dx + dy * dy), 0, 1)
        dist = np.hypot(c.x - x0 - t * dx, c.y - y0 - t * dy)
        out = np.maximum(out, np.exp(-(dist / width) ** 2))
    return out


def _draw_support_devices(c: Chest, u) -> None:
    """Radio-opaque lines and devices: an endotracheal tube, a central venous catheter from the
    clavicle region to the superior vena cava, or a pacemaker box with its lead into the heart
    (at least one; several at once as in ICU films)."""
    amp, width = _sev(u, 0.25, 0.4), 0.012 + 0.006 * u[1]
    kinds = [u[2] < 0.5, u[3] < 0.5, u[4] < 0.25]
    if not any(kinds):
        kinds[int(u[5] * 3)] = True
    lines = np.zeros_like(c.x)
    if kinds[0]:   # endotracheal tube: down the trachea, tip above the carina
        tip = -0.45 + 0.15 * u[6]
        lines = np.maximum(lines, _tube(c, [(0.02, -1.1), (0.02 + 0.02 * (u[7] - 0.5), tip)], width * 1.5))
    if kinds[1]:   # central line from either side
        side = -1 if u[8] < 0.5 else 1
        start = (side * (0.55 + 0.15 * u[9]), -0.75)
        lines = np.maximum(lines, _tube(c, [start, (side * 0.12, -0.55), (0.05, -0.3 + 0.1 * u[10])], width))
    if kinds[2]:   # pacemaker: a box below the left clavicle, lead into the right ventricle
        box = (np.abs(c.x - 0.55) < 0.07) & (np.abs(c.y + 0.6) < 0.05)
        lines = np.maximum(lines, box.astype(np.float32))
        lines = np.maximum(lines, _tube(c, [(0.55, -0.6), (0.15, -0.45), (0.05, -0.1), (0.15, 0.2)], width))
    c.density += amp * lines


_SHAPE = {"Atelectasis": _shape_atelectasis, "Cardiomegaly": _shape_cardiomegaly,
          "Emphysema": _shape_emphysema, "Fibrosis": _shape_fibrosis}
_DRAW = {
    "Atelectasis": _draw_atelectasis, "Cardiomegaly": lambda c, u: None, "Effusion": _draw_effusion,
    "Infiltration": _draw_infiltration, "Mass": _draw_mass, "Nodule": _draw_nodule,
    "Pneumonia": _draw_pneumonia, "Pneumothorax": _draw_pneumothorax, "Consolidation": _draw_consolidation,
    "Edema": _draw_edema, "Emphysema": _draw_emphysema, "Fibrosis": _draw_fibrosis,
    "Pleural_Thickening": _draw_pleural_thickening, "Hernia": _draw_hernia,
}
# CheXpert observation -> (shape, draw); the NIH drawing where the two vocabularies share a finding
_CHEXPERT_PARTS = {
    "No Finding": (None, None),
    "Enlarged Cardiomediastinum": (_shape_enlarged_cardiomediastinum, _draw_enlarged_cardiomediastinum),
    "Cardiomegaly": (_shape_cardiomegaly, None),
    "Lung Opacity": (None, _draw_lung_opacity),
    "Lung Lesion": (None, _draw_lung_lesion),
    "Edema": (None, _draw_edema),
    "Consolidation": (None, _draw_consolidation),
    "Pneumonia": (None, _draw_pneumonia),
    "Atelectasis": (_shape_atelectasis, _draw_atelectasis),
    "Pneumothorax": (None, _draw_pneumothorax),
    "Pleural Effusion": (None, _draw_effusion),
    "Pleural Other": (None, _draw_pleural_other),
    "Fracture": (None, _draw_fracture),
    "Support Devices": (None, _draw_support_devices),
}
_PARTS = {"nih14": {name: (_SHAPE.get(name), _DRAW[name]) for name in NIH14.names},
          "chexpert14": _CHEXPERT_PARTS}


def _distractors(c: Chest, u) -> None:
    """Normal look-alikes of findings (nipple shadows, end-on vessels) so that a bright dot alone
    does not mean Nodule."""
    if u[0] < 0.3:
        for lung in c.lungs:
            px, py = lung.point(0.5 + 0.3 * lung.lateral * u[1], 0.8 + 0.1 * u[2], 0.1, 0.9)
            c.density += (0.05 + 0.08 * u[3]) * blob(c.x, c.y, px, py, 0.035)
    if u[4] < 0.4:
        px, py = c.lungs[int(u[5] < 0.5)].point(u[6], u[7], 0.3, 0.8)
        c.density += (0.06 + 0.1 * u[8]) * blob(c.x, c.y, px, py, 0.022)


def render(i: int, labels, seed: int = 0, size: int = 64, patient: int | None = None,
           view: str = "PA", label_set: str = "nih14") -> np.ndarray:
    """Image ``i`` of the synthetic set ``seed`` drawn with the 14 ``labels`` (0/1) of ``label_set``
    (NIH's by default, or ``chexpert14``), float32 size×size in [0, 1]. ``patient`` (default ``i``)
    fixes the shared anatomy."""
    labels = np.asarray(labels, dtype=bool)
    parts = _PARTS[label_set]
    names = LABEL_SETS[label_set][0].names
    anatomy = random_stream(seed, STREAM_ANATOMY, i if patient is None else int(patient)).random(12, dtype=np.float32)
    rng = random_stream(seed, STREAM_IMAGE, i)
    jitter, look, extra = (rng.random(k, dtype=np.float32) for k in (4, 4, 9))
    finding_u = rng.random((14, 12), dtype=np.float32)   # 14 rows whatever the labels: same streams
    noise = rng.standard_normal((3, 12, 12), dtype=np.float32) * 0.6
    pixel_noise = rng.standard_normal((size, size), dtype=np.float32)
    chest = Chest(size, anatomy, jitter, noise, ap=view == "AP")
    present = [(parts[name], finding_u[j]) for j, name in enumerate(names) if labels[j]]
    for (shape, _), u in present:
        if shape is not None:
            shape(chest, u)
    chest.layout()
    chest.draw_anatomy()
    _distractors(chest, extra)
    for (_, draw), u in present:
        if draw is not None:
            draw(chest, u)
    return chest.finish(look, pixel_noise).astype(np.float32, copy=False)
