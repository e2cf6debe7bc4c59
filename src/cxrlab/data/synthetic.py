"""Synthetic chest radiographs: the embedded default dataset (``synthetic:N``) that the demo and the
tests train on, so that the whole flow runs without downloading anything.

Labels follow NIH ChestX-ray14 exactly: every image draws its label *set* from the table of the
801 distinct label combinations of the NIH label file (``Data_Entry_2017_v2020.csv``, 112,120 images)
with their counts, so both the label frequencies and their co-occurrence are NIH's. Patients have
several images (NIH's distribution of images per patient, mean 3.6) that share anatomy; views are PA
or AP (AP more often when there is a finding, as in NIH). Each finding is drawn as its own
radiological pattern with random location, size and intensity, on top of a randomly jittered
chest with noise, so that findings are learnable but not trivially so at 64 px.

Image ``i`` depends only on ``(seed, i)`` (and its labels), and its labels only on ``(seed, i,
temperature)``: any subset can be rendered independently, and ``generate(n)`` and ``generate(m)``
agree on their common images. Every random stream draws a fixed number of values whatever the labels,
so :func:`render` can draw the same chest with and without a finding.

Source spec grammar (``synthetic:SPEC``)::

    SPEC  := [N] [ "," KEY "=" VALUE ]*          N: number of images (default 2000)
    KEY   := seed (int >= 0, default 0) | size (pixels, default 64) | temperature (float > 0, default 1)

e.g. ``synthetic:3000`` or ``synthetic:20000,seed=1,temperature=2``; ``synthetic:`` alone is 2000
images. ``temperature`` > 1 flattens the
combination distribution (probabilities ∝ count^(1/T)) so rare labels appear more often; 1 is faithful.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd

from ..errors import CxrlabError, closest
from ..labels import NIH14
from .records import Records

# Distinct NIH label sets and their image counts, "MASK:COUNT" with MASK a hex bit mask over NIH14
# (bit j = NIH14.names[j]; 0 = No Finding). Computed once from Data_Entry_2017_v2020.csv (112,120
# rows); all 801 combinations are kept, so the table is exact.
_NIH_COMBOS = """
0:60361 8:9547 1:4215 4:3955 20:2705 80:2194 10:2139 c:1604 9:1350 100:1310 5:1167 1000:1126 2:1093 400:892
28:829 d:739 800:727 200:628 6:484 108:441 18:420 84:403 14:402 101:398 30:396 208:392 88:347 480:337 104:337
40:322 1004:251 24:250 81:241 1008:210 a:201 21:201 105:200 48:199 204:189 808:185 90:179 11:178 110:151
1020:141 248:138 10c:134 1010:132 a0:130 120:128 20c:127 408:126 e:120 401:117 1001:117 2000:110 41:108 2c:106
801:104 109:104 1c:99 85:99 404:96 8c:88 3:88 240:83 10d:81 1080:79 15:72 89:72 488:72 100c:71 1800:70 7:68
38:67 19:67 410:66 820:66 114:65 34:65 804:59 29:57 481:54 f:54 44:54 300:49 180:49 201:48 1005:47 128:47 484:47
1100:46 1400:46 1009:45 8d:44 25:43 118:42 4c:42 100d:41 102:40 409:40 1d:38 1014:38 115:37 140:36 202:35 209:35
1006:34 49:34 810:34 1084:34 111:34 1024:31 228:31 a8:31 b:31 490:30 1030:30 1028:29 420:29 124:28 220:28 489:27
405:26 1018:25 308:25 20d:24 40c:24 900:24 94:24 130:24 31:24 181:23 218:23 45:23 880:23 22:22 1088:22 184:22
106:22 205:22 3c:22 2d:21 24c:21 2001:21 809:21 188:20 1108:20 4a0:20 500:20 402:19 60:19 244:19 206:18 12:18
1081:18 4d:18 210:18 b0:18 40d:18 102c:17 1808:16 828:16 80c:16 1820:16 101c:16 418:16 121:16 135:16 1101:16
91:16 2008:15 98:15 11c:15 12c:15 2010:15 1200:15 411:15 805:15 1090:15 214:15 485:15 35:15 26:15 141:15 a4:15
16:14 1002:14 1404:13 c00:13 148:13 138:13 13d:13 1480:13 600:13 48c:12 1021:12 10a:12 10f:12 1115:11 1040:11
1104:11 50:11 68:11 2e:11 304:11 830:11 134:11 20e:10 20a:10 1019:10 119:10 103:10 120c:10 884:10 501:10 1110:10
806:10 110c:10 224:10 414:10 b4:10 580:10 ac:10 22c:9 107:9 908:9 58:9 125:9 305:9 82:9 1034:9 1105:9 406:9 a1:9
888:9 9c:9 3d:9 428:8 144:8 42:8 b8:8 581:8 1804:8 821:8 814:8 39:8 1038:8 1801:8 230:8 103c:8 10e:8 46:7 802:7
1408:7 1880:7 1900:7 190:7 2a:7 a9:7 1011:7 13c:7 819:7 185:7 111d:7 1488:6 803:6 1118:6 c8:6 920:6 1120:6 301:6
80a:6 1a0:6 100a:6 10a0:6 2020:6 2f:6 70:6 9d:6 258:6 498:6 1248:6 1089:6 a5:6 249:6 280:6 100f:6 110d:6 1130:6
840:5 440:5 14c:5 818:5 18d:5 18c:5 61:5 508:5 505:5 11d:5 99:5 1025:5 1085:5 424:5 c0:5 100e:5 430:5 1094:5
1015:5 2081:5 2004:5 1410:5 30c:5 140c:5 486:5 c4:4 1405:4 22a:4 104c:4 8a:4 1029:4 17:4 1048:4 30d:4 21c:4
194:4 509:4 10b:4 349:4 149:4 491:4 1007:4 905:4 8e:4 250:4 95:4 1401:4 4a8:4 4a9:4 1910:4 c80:4 2005:4 31c:4
1e:4 129:4 510:4 27:4 51d:4 314:4 101d:4 1489:4 ad:4 1134:4 648:4 2c8:4 10ac:4 416:3 1012:3 1824:3 306:3 24e:3
928:3 1818:3 117:3 302:3 108c:3 145:3 838:3 1420:3 108d:3 24d:3 10a4:3 24a:3 1500:3 229:3 43:3 203:3 811:3 136:3
1810:3 1003:3 80e:3 221:3 1f:3 80d:3 50d:3 499:3 189:3 207:3 142:3 198:3 1888:3 1484:3 901:3 54:3 219:3 234:3
c5:3 212:3 86:3 260:3 5a4:3 1121:3 348:3 1114:3 36:3 1031:3 1119:3 1027:3 1415:3 6c:3 3a:2 482:2 341:2 124c:2
2002:2 2006:2 1208:2 1886:2 264:2 2800:2 449:2 921:2 a00:2 844:2 1240:2 2021:2 48e:2 47:2 1198:2 4a4:2 890:2
139:2 1421:2 3000:2 1481:2 826:2 2c5:2 180e:2 12d:2 131:2 1409:2 1188:2 1148:2 822:2 419:2 1209:2 4a1:2 680:2
2009:2 2018:2 a1c:2 22e:2 103d:2 980:2 1a:2 328:2 51:2 191:2 2100:2 1830:2 10bd:2 1049:2 200c:2 910:2 1102:2
318:2 81d:2 588:2 102d:2 421:2 1091:2 441:2 1307:2 4c0:2 284:2 604:2 2080:2 87:2 225:2 116:2 cc:2 1805:2 30f:2
154:2 82c:2 515:2 8a0:2 1135:2 48d:2 816:2 159:2 105c:2 1026:2 21d:2 5c:2 96:2 10b8:2 1016:2 8f:2 236:2 494:2
111f:2 1098:2 881:2 1128:2 415:2 4a:2 148c:2 493:1 1834:1 a0e:1 8b:1 211:1 868:1 6a:1 384:1 848:1 1b0:1 c34:1
1201:1 4b0:1 28f:1 914:1 690:1 2a0:1 960:1 3014:1 1060:1 448:1 1448:1 1305:1 288:1 3004:1 ca4:1 4ac:1 915:1
909:1 1202:1 807:1 246:1 20b:1 80f:1 1044:1 3c08:1 180c:1 1c0:1 380:1 1238:1 584:1 1a8:1 582:1 827:1 621:1 30a:1
589:1 32:1 c08:1 2011:1 925:1 184c:1 118d:1 81c:1 c91:1 2810:1 151:1 3400:1 2400:1 3c1:1 2801:1 60c:1 122:1
61c:1 2110:1 839:1 2148:1 2044:1 2048:1 220c:1 829:1 c10:1 117c:1 2d8:1 334:1 4c1:1 1803:1 107c:1 118c:1 59:1
235:1 30e:1 1b:1 1184:1 112:1 14f:1 7c:1 1528:1 585:1 658:1 2014:1 1244:1 303:1 514:1 bc:1 1905:1 190d:1 122d:1
344:1 1348:1 1204:1 161:1 1189:1 19d:1 8a9:1 885:1 1d0:1 590:1 278:1 495:1 19c:1 1a5:1 14d:1 882:1 1109:1 4e:1
4d0:1 1bd:1 238:1 41c:1 c09:1 71:1 111e:1 82d:1 1814:1 1086:1 595:1 34d:1 d4:1 112d:1 50c:1 2a06:1 345:1 112f:1
1107:1 d35:1 64:1 540:1 1b1:1 74:1 10b4:1 a38:1 1206:1 200d:1 c11:1 538:1 5e:1 309:1 834:1 25c:1 1511:1 268:1
43c:1 31f:1 1111:1 28c:1 1c90:1 125e:1 c06:1 c94:1 196:1 294:1 1131:1 1017:1 15a8:1 320:1 222:1 200a:1 137:1
2c0:1 aa:1 1136:1 1336:1 110e:1 1106:1 2c10:1 12e:1 2088:1 103e:1 b1:1 1918:1 893:1 1499:1 1491:1 15b1:1 434:1
191d:1 91d:1 317:1 601:1 681:1 824:1 37:1 1807:1 1b5:1 1129:1 33f:1 1117:1 1884:1 c21:1 1424:1 109c:1 18ac:1
83:1 9f:1 1229:1 78:1 13e:1 a18:1 20f:1 1190:1 19bd:1 1138:1 1210:1 113d:1 11a1:1 11b1:1 11bc:1 1c01:1 1828:1
1228:1 1ca1:1 101f:1 245:1 226:1 1b4:1 170:1 42c:1 298:1 62:1 3008:1 220d:1 5a5:1 142c:1 52d:1 1300:1 120f:1
a08:1 2808:1 1181:1 4f:1 1211:1 3001:1 168:1 1306:1 26f:1 295:1 10a8:1 1058:1 c88:1 14a0:1 1809:1 12c8:1 137d:1
61d:1 11e:1 688:1 1180:1 44c:1 1311:1 12c4:1 14b0:1 1414:1 40e:1 4c9:1 591:1 1934:1 241:1 120d:1 111c:1 1418:1
140d:1 148d:1 f0:1 1438:1 187:1 c01:1 ca9:1 1430:1 11f:1 cd:1 2012:1 2028:1 528:1 146:1 14a8:1 10a1:1 160:1
1485:1 150:1 504:1 20b9:1 1191:1
"""

# NIH patients with 1, 2, ..., 30 images; 397 more have over 30 (31..184, mean 51), drawn here
# uniformly in 31..71 so that the mean stays NIH's 3.6 images per patient without 184-image outliers.
_PATIENT_SIZES = (17503, 4113, 2100, 1330, 938, 787, 608, 494, 387, 320, 281, 235, 165, 181, 121, 120, 91,
                  77, 77, 74, 68, 39, 50, 51, 45, 35, 38, 27, 25, 28)
_PATIENTS_OVER_30 = 397
_P_AP = {False: 0.349, True: 0.459}   # NIH: P(AP | No Finding), P(AP | any finding)

# Independent random streams, so that labels, views, patients and pixels never shift each other.
_LABELS, _VIEWS, _PATIENTS, _ANATOMY, _IMAGE = range(11, 16)
SPEC_KEYS = ("seed", "size", "temperature")
DEFAULT_N = 2000


# ------------------------------------------------------------------------------------------ labels

@lru_cache(maxsize=1)
def combo_table() -> tuple[np.ndarray, np.ndarray]:
    """(label sets as an n_combos×14 bool matrix, NIH image count of each)."""
    pairs = [token.split(":") for token in _NIH_COMBOS.split()]
    masks = np.array([int(m, 16) for m, _ in pairs], dtype=np.int64)
    counts = np.array([int(c) for _, c in pairs], dtype=np.int64)
    bits = (masks[:, None] >> np.arange(len(NIH14))) & 1
    return bits.astype(bool), counts


def nih_prevalence() -> np.ndarray:
    """NIH's per-label image frequency (the expected label means of ``sample_labels``)."""
    sets, counts = combo_table()
    return (sets * counts[:, None]).sum(0) / counts.sum()


def combo_probabilities(temperature: float = 1.0) -> np.ndarray:
    """Probability of each label combination: ∝ count^(1/temperature)."""
    if not temperature > 0:
        raise CxrlabError(f"synthetic: temperature must be > 0, got {temperature}")
    _, counts = combo_table()
    weights = np.exp(np.log(counts) / temperature)
    return weights / weights.sum()


def sample_labels(n: int, seed: int = 0, temperature: float = 1.0) -> np.ndarray:
    """N×14 float32 0/1 labels, image ``i``'s set drawn from the NIH combination table."""
    sets, _ = combo_table()
    cdf = np.cumsum(combo_probabilities(temperature))
    u = _rng(seed, _LABELS).random(n)
    index = np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)
    return sets[index].astype(np.float32)


def sample_views(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """"PA" or "AP" per image, AP more likely with a finding (NIH's rates; ~40 % AP overall)."""
    p_ap = np.where(labels.any(axis=1), _P_AP[True], _P_AP[False])
    return np.where(_rng(seed, _VIEWS).random(len(labels)) < p_ap, "AP", "PA")


def sample_patients(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(patient number, follow-up number) per image: consecutive images belong to one patient, with
    NIH's distribution of images per patient."""
    counts = np.array(_PATIENT_SIZES + (_PATIENTS_OVER_30,), dtype=np.float64)
    cdf = np.cumsum(counts / counts.sum())
    u = _rng(seed, _PATIENTS).random((max(n, 1), 2))
    sizes = np.searchsorted(cdf, u[:, 0], side="right") + 1
    big = sizes > len(_PATIENT_SIZES)
    sizes[big] = 31 + (u[big, 1] * 41).astype(np.int64)
    patient = np.repeat(np.arange(len(sizes)), sizes)[:n]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return patient, np.arange(n) - starts[patient]


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


# ------------------------------------------------------------------------------------------ drawing

@dataclass
class _Lung:
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


def _ramp(d: np.ndarray, width: float) -> np.ndarray:
    """A soft step: 0 where ``d`` << 0, 1 where ``d`` >> 0, linear over ``width``."""
    return np.clip(0.5 + d / width, 0.0, 1.0)


def _radius(x, y, cx, cy, a, b, angle: float = 0.0) -> np.ndarray:
    """Normalised elliptical radius (1 on the ellipse)."""
    dx, dy = x - cx, y - cy
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    return np.sqrt((dx / a) ** 2 + (dy / b) ** 2)


def _blob(x, y, cx, cy, r) -> np.ndarray:
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (r * r))


class _Chest:
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
            _Lung(-0.41 - 0.03 * anatomy[1], base - lung_b * 0.8, lung_a, lung_b, base, 0.12, -1),
            _Lung(0.41 + 0.03 * anatomy[1], base - lung_b * 0.8 + 0.02, lung_a * 0.95, lung_b, base + 0.03,
                  0.11, +1),
        ]
        self.lung_dark = 0.27 + 0.07 * anatomy[9]
        self.markings = 1.0
        self.density = np.zeros_like(self.x)

    def layout(self) -> None:
        """Lung fields, their normalised radii and the heart, after findings changed the geometry."""
        self.r, self.masks = [], []
        for lung in self.lungs:
            r = _radius(self.x, self.y, lung.cx, lung.cy, lung.a, lung.b)
            q = np.clip((self.x - lung.cx) / lung.a, -1, 1)
            dome = lung.base - lung.dome * (1 - q * q)
            self.r.append(r)
            self.masks.append(_ramp(1 - r, self.edge / lung.a) * _ramp(dome - self.y, self.edge))
        self.lung = self.masks[0] + self.masks[1]
        s = self.heart_scale
        r = _radius(self.x, self.y, 0.08 + 0.08 * (s - 1), self.lungs[0].base - 0.14 * s, 0.31 * s, 0.21 * s,
                    angle=-0.3)
        self.heart = _ramp(1 - r, self.edge / 0.2)
        hidden = 1 - 0.85 * self.heart                        # lung behind the heart shows little
        self.open_masks = [m * hidden for m in self.masks]
        self.open_lung = self.lung * hidden

    def draw_anatomy(self) -> None:
        """Body, lungs, heart, mediastinum, spine, ribs, clavicles and vessel markings (as density).

        The heart and mediastinum are soft tissue like the rest of the body: they show only where
        they hide the dark lungs, as on a real film."""
        a, x, y = self.a, self.x, self.y
        half_width = 0.84 + 0.1 * a[0]
        body = _ramp(1 - ((x / half_width) ** 4 + ((y - 0.3) / 1.4) ** 4) ** 0.25, 0.04)
        heart = self.heart
        mediastinum = _ramp(0.09 + 0.03 * a[4] - np.abs(x - 0.02), self.edge) * _ramp(0.2 - y, 0.2)
        spine = _ramp(0.055 - np.abs(x - 0.01 * (a[6] - 0.5)), self.edge)
        vertebrae = 0.6 + 0.4 * np.cos(2 * np.pi * y / 0.14)
        period = 0.15 + 0.04 * a[7]
        v = y - 0.3 * np.abs(x) + 0.5 * x * x
        ribs = _ramp(np.cos(2 * np.pi * v / period + 6.28 * a[8]) - 0.6, 0.4) * _ramp(0.5 - y, 0.1)
        clavicle = np.exp(-((y + 0.66 - 0.3 * np.abs(x)) / 0.04) ** 2) * _ramp(0.6 - np.abs(x), 0.1)
        hila = _blob(x, y, -0.22, -0.05, 0.22) + _blob(x, y, 0.22, -0.03, 0.2)
        vessels = np.abs(self.fields[0]) * (0.35 + hila) * self.markings
        self.vessels = vessels * self.lung
        self.density += (0.06 + (0.44 + 0.08 * a[10]) * body + 0.06 * mediastinum + 0.07 * spine * vertebrae
                         - self.lung_dark * self.open_lung + 0.04 * heart
                         + 0.06 * ribs * body + 0.1 * clavicle * body + 0.07 * self.vessels)
        if self.ap:  # scapulae project over the lateral upper lungs on AP films
            self.density += 0.05 * _ramp(np.abs(x) - 0.62, 0.1) * _ramp(0.1 - y, 0.2) * body

    def finish(self, look: np.ndarray, pixel_noise: np.ndarray) -> np.ndarray:
        """Global contrast, brightness, gamma and noise: what differs between machines and exposures."""
        img = (self.density - 0.4) * (0.8 + 0.4 * look[0]) + 0.4 + (look[1] - 0.5) * 0.14
        img = np.clip(img, 0.0, 1.0) ** (0.8 + 0.45 * look[2])
        img += (0.01 + 0.025 * look[3]) * pixel_noise
        return np.clip(img, 0.0, 1.0)


# Findings. Each has two parts: ``_SHAPE`` changes the geometry before the lungs are drawn, ``_DRAW``
# adds a density pattern after; both read only their own 12 uniforms ``u``. Every amount goes through
# ``_sev``: u[0] is the severity, and u[11] < FAINT makes the finding faint, nearly invisible, as a
# report-mined label (NIH's are) sometimes is: this keeps the attainable AUC below 1.
FAINT, FAINT_SCALE = 0.15, 0.1


def _sev(u, low: float, high: float) -> float:
    return (low + (high - low) * u[0]) * (FAINT_SCALE if u[11] < FAINT else 1.0)


def _shape_atelectasis(c: _Chest, u) -> None:
    c.lungs[int(u[1] < 0.5)].base -= _sev(u, 0.03, 0.09)          # volume loss: raised hemidiaphragm


def _shape_cardiomegaly(c: _Chest, u) -> None:
    c.heart_scale *= 1 + _sev(u, 0.16, 0.4)


def _shape_emphysema(c: _Chest, u) -> None:
    for lung in c.lungs:                                         # large, hyperinflated, flat domes
        lung.b *= 1 + _sev(u, 0.05, 0.12)
        lung.a *= 1 + _sev(u, 0.03, 0.07)
        lung.base += _sev(u, 0.04, 0.09)
        lung.dome *= 0.3
    c.lung_dark += _sev(u, 0.03, 0.09)
    c.markings *= 1 - _sev(u, 0.5, 0.5)


def _shape_fibrosis(c: _Chest, u) -> None:
    for lung in c.lungs:
        lung.b *= 1 - _sev(u, 0.03, 0.06)


def _draw_atelectasis(c: _Chest, u) -> None:
    lung = c.lungs[int(u[1] < 0.5)]
    px, py = lung.point(u[2], u[3], top=0.55, bottom=0.9)
    angle = (u[4] - 0.5) * 0.7
    half = 0.1 + 0.12 * u[5]
    dx, dy = c.x - px, c.y - py
    along = np.clip(dx * np.cos(angle) + dy * np.sin(angle), -half, half)
    dist = np.hypot(dx - along * np.cos(angle), dy - along * np.sin(angle))
    band = np.exp(-(dist / (0.025 + 0.02 * u[6])) ** 2)
    c.density += _sev(u, 0.12, 0.24) * band * c.open_lung


def _draw_effusion(c: _Chest, u) -> None:
    sides = (0,) if u[1] < 0.4 else (1,) if u[1] < 0.8 else (0, 1)
    for side in sides:
        lung = c.lungs[side]
        level = lung.base - lung.dome - _sev(u, 0.04, 0.29) * (1 if side == sides[0] else u[2])
        lateral = np.clip((c.x - lung.cx) * lung.lateral / lung.a, -1, 1)
        surface = level - (0.04 + 0.1 * u[3]) * (lateral + 1) / 2    # meniscus: higher laterally
        fluid = _ramp(c.y - surface, 0.04 + 0.04 * u[4])
        c.density += _sev(u, 0.2, 0.3) * fluid * c.open_masks[side]


def _patchy(c: _Chest, u, field: np.ndarray, top: float, bottom: float, radius: float, amp: float,
            threshold: float) -> None:
    """Ill-defined opacity: a smooth noise field kept above ``threshold`` inside a blob in one lung
    (or both), for infiltration- and pneumonia-like patterns."""
    sides = (int(u[1] < 0.5),) if u[2] < 0.7 else (0, 1)
    envelope = np.zeros_like(c.x)
    for side in sides:
        px, py = c.lungs[side].point(u[3], u[4], top, bottom)
        envelope += _blob(c.x, c.y, px, py, radius)
    texture = np.clip(field - threshold + 0.6, 0, 1)
    c.density += amp * np.minimum(envelope, 1) * texture * c.open_lung


def _draw_infiltration(c: _Chest, u) -> None:
    _patchy(c, u, c.fields[1], 0.2, 0.9, 0.18 + 0.17 * u[5], _sev(u, 0.1, 0.2), threshold=0.3 * u[6])


def _draw_pneumonia(c: _Chest, u) -> None:
    field = 0.6 * c.fields[2] + 0.5
    _patchy(c, u, field, 0.45, 0.95, 0.14 + 0.14 * u[5], _sev(u, 0.1, 0.22), threshold=0.2 * u[6])


def _draw_mass(c: _Chest, u) -> None:
    px, py = c.lungs[int(u[1] < 0.5)].point(u[2], u[3], 0.1, 0.85)
    r = 0.08 + 0.08 * u[4]
    lobes = _blob(c.x, c.y, px, py, r) + 0.6 * _blob(c.x, c.y, px + r * (u[5] - 0.5), py + r * (u[6] - 0.5), r * 0.7)
    c.density += _sev(u, 0.18, 0.32) * np.clip(lobes * 1.6, 0, 1)


def _draw_nodule(c: _Chest, u) -> None:
    px, py = c.lungs[int(u[1] < 0.5)].point(u[2], u[3], 0.1, 0.85)
    r = 0.035 + 0.03 * u[4]
    c.density += _sev(u, 0.2, 0.36) * np.clip(_blob(c.x, c.y, px, py, r) * 1.5, 0, 1)


def _draw_pneumothorax(c: _Chest, u) -> None:
    side = int(u[1] < 0.5)
    lung, r, mask = c.lungs[side], c.r[side], c.masks[side]
    edge = 1 - _sev(u, 0.15, 0.45)                                # collapsed lung edge (radius)
    where = _ramp(lung.cy + 0.3 * lung.b - c.y, 0.2) * _ramp((c.x - lung.cx) * lung.lateral + 0.4 * lung.a, 0.2)
    rim = _ramp(r - edge, 0.03) * where * mask                    # air without lung markings
    line = np.exp(-((r - edge) / 0.03) ** 2) * where * mask       # the visceral pleural line
    c.density += -_sev(u, 0.08, 0.14) * rim - _sev(u, 0.07, 0.07) * c.vessels * rim + _sev(u, 0.05, 0.09) * line


def _draw_consolidation(c: _Chest, u) -> None:
    side = int(u[1] < 0.5)
    px, py = c.lungs[side].point(u[2], u[3], 0.2, 0.85)
    r = _radius(c.x, c.y, px, py, 0.1 + 0.12 * u[4], 0.08 + 0.1 * u[5], angle=(u[6] - 0.5) * 2)
    region = _ramp(1 - r, 0.25) * (0.85 + 0.15 * np.clip(c.fields[1], -1, 1))
    c.density += _sev(u, 0.18, 0.3) * region * c.open_masks[side]


def _draw_edema(c: _Chest, u) -> None:
    radius = 0.28 + 0.16 * u[1]
    haze = _blob(c.x, c.y, -0.22, -0.02, radius) + _blob(c.x, c.y, 0.22, 0.0, radius)
    c.density += (_sev(u, 0.07, 0.15) * np.minimum(haze, 1) + _sev(u, 0.05, 0.05) * c.vessels) * c.open_lung


def _draw_emphysema(c: _Chest, u) -> None:
    pass  # all in the geometry (hyperinflation, lucency, fewer markings)


def _draw_fibrosis(c: _Chest, u) -> None:
    period = 0.1 + 0.05 * u[1]
    warp = 0.12 * c.fields[2]
    lines = np.zeros_like(c.x)
    for angle in (u[2] * np.pi, u[2] * np.pi + np.pi / 2.5):
        t = (c.x * np.cos(angle) + c.y * np.sin(angle) + warp) / period
        lines += np.exp(-(np.sin(np.pi * t) / 0.3) ** 2)
    zone = sum(_ramp(r - 0.45, 0.3) for r in c.r) * _ramp(c.y - 0.2 * u[3] + 0.2, 0.4)
    c.density += _sev(u, 0.05, 0.11) * np.minimum(lines, 1) * zone * c.open_lung


def _draw_pleural_thickening(c: _Chest, u) -> None:
    sides = (int(u[1] < 0.5),) if u[2] < 0.7 else (0, 1)
    width = 0.08 + 0.07 * u[3]
    for side in sides:
        lung, r = c.lungs[side], c.r[side]
        lateral = _ramp((c.x - lung.cx) * lung.lateral, 0.2) if u[4] < 0.5 else _ramp(lung.cy - c.y, 0.2)
        rim = _ramp(r - (1 - width), 0.03) * lateral
        c.density += _sev(u, 0.12, 0.24) * rim * c.masks[side]


def _draw_hernia(c: _Chest, u) -> None:
    cx, cy = 0.03 + 0.1 * (u[1] - 0.5), c.lungs[0].base - 0.1 - 0.06 * u[2]
    r = 0.07 + 0.06 * u[0]
    inside = _ramp(1 - _radius(c.x, c.y, cx, cy, r * 1.2, r), 0.15)
    gas = inside * _ramp(cy + 0.2 * r - c.y, 0.02)                 # air above an air-fluid level
    wall = np.exp(-((_radius(c.x, c.y, cx, cy, r * 1.2, r) - 1) / 0.2) ** 2)
    c.density += _sev(u, 0.1, 0.18) * (-gas + 0.4 * wall)


_SHAPE = {"Atelectasis": _shape_atelectasis, "Cardiomegaly": _shape_cardiomegaly,
          "Emphysema": _shape_emphysema, "Fibrosis": _shape_fibrosis}
_DRAW = {
    "Atelectasis": _draw_atelectasis, "Cardiomegaly": lambda c, u: None, "Effusion": _draw_effusion,
    "Infiltration": _draw_infiltration, "Mass": _draw_mass, "Nodule": _draw_nodule,
    "Pneumonia": _draw_pneumonia, "Pneumothorax": _draw_pneumothorax, "Consolidation": _draw_consolidation,
    "Edema": _draw_edema, "Emphysema": _draw_emphysema, "Fibrosis": _draw_fibrosis,
    "Pleural_Thickening": _draw_pleural_thickening, "Hernia": _draw_hernia,
}


def _distractors(c: _Chest, u) -> None:
    """Normal look-alikes of findings (nipple shadows, end-on vessels) so that a bright dot alone
    does not mean Nodule."""
    if u[0] < 0.3:
        for lung in c.lungs:
            px, py = lung.point(0.5 + 0.3 * lung.lateral * u[1], 0.8 + 0.1 * u[2], 0.1, 0.9)
            c.density += (0.05 + 0.08 * u[3]) * _blob(c.x, c.y, px, py, 0.035)
    if u[4] < 0.4:
        px, py = c.lungs[int(u[5] < 0.5)].point(u[6], u[7], 0.3, 0.8)
        c.density += (0.06 + 0.1 * u[8]) * _blob(c.x, c.y, px, py, 0.022)


def render(i: int, labels, seed: int = 0, size: int = 64, patient: int | None = None,
           view: str = "PA") -> np.ndarray:
    """Image ``i`` of the synthetic set ``seed`` drawn with the 14 NIH ``labels`` (0/1), float32
    size×size in [0, 1]. ``patient`` (default ``i``) fixes the shared anatomy."""
    labels = np.asarray(labels, dtype=bool)
    anatomy = _rng(seed, _ANATOMY, i if patient is None else int(patient)).random(12, dtype=np.float32)
    rng = _rng(seed, _IMAGE, i)
    jitter, look, extra = (rng.random(k, dtype=np.float32) for k in (4, 4, 9))
    finding_u = rng.random((len(NIH14), 12), dtype=np.float32)
    noise = rng.standard_normal((3, 12, 12), dtype=np.float32) * 0.6
    pixel_noise = rng.standard_normal((size, size), dtype=np.float32)
    chest = _Chest(size, anatomy, jitter, noise, ap=view == "AP")
    present = [(name, finding_u[j]) for j, name in enumerate(NIH14.names) if labels[j]]
    for name, u in present:
        if name in _SHAPE:
            _SHAPE[name](chest, u)
    chest.layout()
    chest.draw_anatomy()
    _distractors(chest, extra)
    for name, u in present:
        _DRAW[name](chest, u)
    return chest.finish(look, pixel_noise).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------ datasets

class SyntheticReader:
    """``Records.reader`` of a synthetic set: row ``i`` → its rendered image (picklable)."""

    def __init__(self, seed: int, size: int, labels: np.ndarray, patients: np.ndarray, views: np.ndarray):
        self.seed, self.size = seed, size
        self.labels, self.patients, self.views = labels.astype(bool), patients, views

    def __call__(self, i: int) -> np.ndarray:
        return render(i, self.labels[i], self.seed, self.size, int(self.patients[i]), str(self.views[i]))


def make_records(n: int, seed: int = 0, size: int = 64, temperature: float = 1.0) -> Records:
    """Records of ``n`` synthetic images (labels and metadata; images rendered on read)."""
    _check(n, seed, size)
    labels = sample_labels(n, seed, temperature)
    patients, follow_up = sample_patients(n, seed)
    views = sample_views(labels, seed)
    patient_id = pd.Series([f"s{seed}p{p:06d}" for p in patients], dtype="str")
    meta = pd.DataFrame({
        "path": pd.Series([f"synthetic://{seed}/{i}" for i in range(n)], dtype="str"),
        "patient_id": patient_id,
        "study_id": patient_id + pd.Series([f"_{f:03d}" for f in follow_up], dtype="str"),
        "view": pd.Series(views, dtype="str"),
        "frontal_lateral": pd.Series(["frontal"] * n, dtype="str"),
    })
    return Records("synthetic", NIH14, labels, meta, SyntheticReader(seed, size, labels, patients, views))


def generate(n: int, size: int = 64, seed: int = 0, temperature: float = 1.0) -> tuple[np.ndarray, Records]:
    """``n`` rendered images (float32 N×size×size in [0, 1]) and their Records."""
    records = make_records(n, seed, size, temperature)
    images = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        images[i] = records.read(i)
    return images, records


def load_synthetic(spec: str) -> Records:
    """Records for a ``synthetic:`` source spec (see the module docstring for the grammar)."""
    options = parse_spec(spec)
    return make_records(options.pop("n"), **options)


def parse_spec(spec: str) -> dict:
    """``"3000,seed=1"`` → {"n": 3000, "seed": 1, "size": 64, "temperature": 1.0}."""
    parts = [p.strip() for p in str(spec).split(",")]
    where = f"synthetic source {spec!r} (expected N[,seed=S][,size=PX][,temperature=T])"
    n = _number(parts[0], int, "N", where) if parts[0] else DEFAULT_N
    out = {"n": n, "seed": 0, "size": 64, "temperature": 1.0}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or key not in SPEC_KEYS:
            hint = closest(key, SPEC_KEYS) if key not in SPEC_KEYS else None
            raise CxrlabError(f"{where}: bad option {part!r}"
                              + (f"; did you mean {hint!r}?" if hint else "")
                              + f" (options: {', '.join(k + '=' for k in SPEC_KEYS)})")
        out[key] = _number(value.strip(), float if key == "temperature" else int, key, where)
    _check(out["n"], out["seed"], out["size"])
    if not out["temperature"] > 0:
        raise CxrlabError(f"{where}: temperature must be > 0")
    return out


def _number(text: str, kind, what: str, where: str):
    try:
        return kind(text)
    except ValueError:
        raise CxrlabError(f"{where}: {what} must be {'an integer' if kind is int else 'a number'}, "
                          f"got {text!r}") from None


def _check(n: int, seed: int, size: int) -> None:
    if n < 1:
        raise CxrlabError(f"synthetic: need at least 1 image, got N={n}")
    if seed < 0:
        raise CxrlabError(f"synthetic: seed must be >= 0, got {seed}")
    if size < 16:
        raise CxrlabError(f"synthetic: size must be >= 16 pixels, got {size}")
