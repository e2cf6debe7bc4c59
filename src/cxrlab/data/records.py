"""Records: a loaded label file, one row per image, before any image is read."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..labels import LabelSpace
from .images import read_image


@dataclass
class Records:
    """``values`` (N×L float32) holds the raw label values: 1 positive, 0 negative, -1 uncertain,
    NaN unknown (blank/not mentioned). ``meta`` has one row per image with at least the columns
    ``path`` (absolute path or a source-specific locator), ``patient_id``, ``study_id``, ``view``;
    sources may add more (e.g. ``split`` for an official split). ``reader`` turns a row index into
    the image (float32 H×W in [0,1]); by default it decodes ``meta.path`` with ``read_image``.
    """

    name: str
    labels: LabelSpace
    values: np.ndarray
    meta: pd.DataFrame
    reader: Callable[[int], np.ndarray] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.meta)

    def read(self, i: int) -> np.ndarray:
        if self.reader is not None:
            return self.reader(i)
        return read_image(self.meta["path"].iloc[i])

    def take(self, rows) -> "Records":
        """The subset at integer positions ``rows`` (a reader is re-based onto the subset)."""
        rows = np.asarray(rows, dtype=np.int64)
        reader = None
        if self.reader is not None:
            base = self.reader
            reader = lambda i: base(int(rows[i]))  # noqa: E731
        return Records(self.name, self.labels, self.values[rows], self.meta.iloc[rows].reset_index(drop=True),
                       reader)
