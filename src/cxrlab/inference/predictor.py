"""Use a trained checkpoint: probabilities and thresholded labels for image files, or a scored
evaluation on a labelled source."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import CxrlabError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}


class Predictor:
    """A checkpoint ready for inference: ``predict(images) -> probabilities`` (N×L numpy).

    ``images`` are float arrays in [0,1] of any size; they are fitted to the training size the same
    way the prepared cache fitted the training images.
    """

    def __init__(self, checkpoint: Path, device: str | None = None):
        from ..engine.checkpoint import load_model

        self.model, self.info = load_model(Path(checkpoint))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        recipe = self.info["recipe"]
        self.image_size = int(recipe["data"]["image_size"])
        self.resize = recipe["data"].get("resize", "pad")  # fit images as the training cache did
        self.label_names = list(self.info["labels"])
        thresholds = self.info.get("thresholds")
        self.thresholds = np.asarray(thresholds if thresholds is not None else [0.5] * len(self.label_names))

    def fit_size(self, image: np.ndarray) -> np.ndarray:
        from ..data.cache import fit_image

        return fit_image(image, self.image_size, self.resize)

    @torch.no_grad()
    def predict(self, images: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Probabilities for in-memory images (float [0, 1] or uint8, any size)."""
        return self._predict_batches(
            np.stack([self.fit_size(im) for im in images[start:start + batch_size]])
            for start in range(0, len(images), batch_size))

    def predict_files(self, paths: list[Path], batch_size: int = 32, workers: int | None = None) -> np.ndarray:
        """Probabilities for image files (PNG, JPEG, DICOM)."""
        from ..data.images import read_image

        paths = list(paths)
        return self.predict_read(lambda i: read_image(paths[i]), len(paths), batch_size, workers)

    @torch.no_grad()
    def predict_read(self, read, n: int, batch_size: int = 32, workers: int | None = None) -> np.ndarray:
        """Probabilities for images ``read(0) .. read(n-1)``, decoded and resized in ``workers`` processes
        batch by batch: memory holds one batch of full-size images at a time, however many there are."""
        from torch.utils.data import DataLoader

        workers = min(4, os.cpu_count() or 1) if workers is None else workers
        loader = DataLoader(_Fitted(read, n, self.image_size, self.resize), batch_size=batch_size,
                            num_workers=workers if n > batch_size else 0)
        return self._predict_batches(batch.numpy() for batch in loader)

    def _predict_batches(self, batches) -> np.ndarray:
        out = []
        for chunk in batches:
            x = torch.from_numpy(chunk).float().div_(255.0).unsqueeze(1).to(self.device)
            out.append(torch.sigmoid(self.model(x).logits.float()).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.label_names)), dtype=np.float32)


class _Fitted(torch.utils.data.Dataset):
    """Images ``read(i)`` fitted to the model's input size (uint8)."""

    def __init__(self, read, n: int, size: int, mode: str):
        self.read, self.n, self.size, self.mode = read, n, size, mode

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        from ..data.cache import fit_image

        return fit_image(self.read(i), self.size, self.mode)


def collect_images(inputs: list[Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            raise CxrlabError(f"input not found: {item}")
    if not files:
        raise CxrlabError(f"no images (png, jpg, dcm) found in {', '.join(map(str, inputs))}")
    return files


def predict_files(checkpoint: Path, inputs: list[Path], out_csv: Path, batch_size: int = 32) -> pd.DataFrame:
    """Write a CSV: path, one probability column per label, and ``<label>_positive`` at the
    checkpoint's thresholds (fitted on validation data when it was trained)."""
    predictor = Predictor(checkpoint)
    files = collect_images(inputs)
    probs = predictor.predict_files(files, batch_size=batch_size)
    table = pd.DataFrame(probs, columns=predictor.label_names)
    positive = pd.DataFrame((probs >= predictor.thresholds).astype(int),
                            columns=[f"{n}_positive" for n in predictor.label_names])
    table = pd.concat([pd.DataFrame({"path": [str(f) for f in files]}), table, positive], axis=1)
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_csv, index=False, float_format="%.6f")
    return table


def evaluate_checkpoint(checkpoint: Path, source: str, out_dir: Path, policy: str | None = None,
                        split: str = "all") -> Path:
    """Score a checkpoint on a labelled source (at the checkpoint's thresholds) and write a report."""
    from ..data.policies import apply_policy
    from ..data.sources import parse_source
    from ..evaluation.metrics import multilabel_report
    from ..evaluation.report import write_report
    from ..labels import LabelSpace

    predictor = Predictor(checkpoint)
    records = parse_source(source)
    if split != "all":
        if "split" not in records.meta.columns:
            raise CxrlabError(f"--split {split}: source {source!r} has no official split")
        records = records.take(np.flatnonzero(records.meta["split"].to_numpy() == split))
    # a "No Finding" label that single-positive training added is not scored when the source lacks it
    scored = [n for n in predictor.label_names if n in records.labels.names or n != "No Finding"]
    missing = [n for n in scored if n not in records.labels.names]
    if missing:
        raise CxrlabError(f"the checkpoint predicts {missing}, which source {source!r} does not label")
    columns = [records.labels.index(n) for n in scored]
    outputs = [predictor.label_names.index(n) for n in scored]
    labels = LabelSpace("checkpoint", tuple(scored))
    result = apply_policy(records.values[:, columns], labels,
                          policy or predictor.info["recipe"]["data"]["policy"].replace("spml", "u_zeros"))
    rows = result.rows
    probs = predictor.predict_read(lambda i: records.read(int(rows[i])), len(rows))[:, outputs]
    metrics = multilabel_report(probs, result.target, result.mask, scored,
                                thresholds=predictor.thresholds[outputs])
    return write_report(Path(out_dir), metrics, probs, result.target, result.mask, scored,
                        config=predictor.info["recipe"])
