"""``cxrlab heatmap``: PNGs of per-label heatmaps over the images as the model sees them."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..data.sources.generic import collect_images
from ..errors import CxrlabError, unknown
from ..inference.batch import error_text, tolerant_batches
from ..inference.predictor import METHODS, Predictor
from ..paths import check_new_dir


def write_heatmaps(checkpoint: Path, inputs: list[Path], out_dir: Path, labels: list[str] | None = None,
                   top: int = 3, method: str = "native", overwrite: bool = True,
                   failures: list | None = None) -> list[Path]:
    """One PNG per image and label: the image with the label's heatmap over it, probability in the title.
    ``labels`` picks labels by name; otherwise each image's ``top`` most probable labels. ``method``:
    ``native`` (the head's attention or CAM), ``gradcam`` or ``gradcampp`` (any head). Images are read
    by the tolerant batch predictor of ``cxrlab predict``: an unreadable one is named on stderr, skipped
    and appended to ``failures`` as ``(path, reason)``. The probabilities are the model's as ``predict``
    gives them (a calibrated temperature too). Everything is checked before any work (the model is a
    checkpoint, ``top`` >= 1, ``out_dir`` not a file, not a folder with files unless ``overwrite``), and
    ``out_dir`` is made only when the first PNG is ready."""
    if method not in METHODS:
        raise unknown("heatmap method", method, METHODS)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise CxrlabError(f"--top must be a whole number >= 1 (labels drawn per image), got {top!r}")
    if Path(checkpoint).suffix.lower() == ".onnx":
        raise CxrlabError(f"heatmap needs a checkpoint (a checkpoint or run folder): {checkpoint} is an ONNX "
                          "export, which gives probabilities only; pass the checkpoint it was exported from")
    out_dir = check_new_dir(Path(out_dir), overwrite, "heatmap folder")
    files = collect_images(inputs)
    import matplotlib  # lazy: an optional plotting dependency, loaded only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    predictor = Predictor.from_checkpoint(checkpoint)
    names = predictor.label_names
    if labels:
        unknown_names = [n for n in labels if n not in names]
        if unknown_names:
            raise unknown("label", unknown_names[0], names)
    written = []
    failures = [] if failures is None else failures
    for start, fitted, probs, errors in tolerant_batches(predictor, len(files), lambda i: predictor.fit(files[i])):
        for k, (image, p, exc) in enumerate(zip(fitted, probs, errors)):
            path = files[start + k]
            if exc is not None:
                print(f"heatmap: cannot read {path}: {error_text(exc)}", file=sys.stderr)
                failures.append((path, error_text(exc)))
                continue
            chosen = [names.index(n) for n in labels] if labels else [int(j) for j in np.argsort(-p)[:top]]
            _, maps = predictor.heatmaps(image, chosen, method)
            out_dir.mkdir(parents=True, exist_ok=True)
            for j, heat in zip(chosen, maps):
                fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
                ax.imshow(image, cmap="gray")
                ax.imshow(heat, cmap="jet", alpha=0.35, vmin=0, vmax=1)
                ax.set_title(f"{names[j]}: p = {p[j]:.3f} ({method})", fontsize=10)
                ax.axis("off")
                suffix = "" if method == "native" else f"_{method}"
                target = out_dir / f"{path.stem}_{names[j].replace(' ', '_')}{suffix}.png"
                fig.savefig(target, bbox_inches="tight")
                plt.close(fig)
                written.append(target)
    return written
