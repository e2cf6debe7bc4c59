"""Use a trained checkpoint: probabilities and thresholded labels for image files, or a scored
evaluation on a labelled source."""
from __future__ import annotations

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
        self.label_names = list(self.info["labels"])
        thresholds = self.info.get("thresholds")
        self.thresholds = np.asarray(thresholds if thresholds is not None else [0.5] * len(self.label_names))

    def fit_size(self, image: np.ndarray) -> np.ndarray:
        from ..data.cache import fit_image

        return fit_image(image, self.image_size)

    @torch.no_grad()
    def predict(self, images: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            chunk = np.stack([self.fit_size(im) for im in images[start:start + batch_size]])
            x = torch.from_numpy(chunk).float().div_(255.0).unsqueeze(1).to(self.device)
            out.append(torch.sigmoid(self.model(x).logits.float()).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.label_names)), dtype=np.float32)


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
    from ..data.images import read_image

    predictor = Predictor(checkpoint)
    files = collect_images(inputs)
    probs = predictor.predict([read_image(f) for f in files], batch_size=batch_size)
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

    predictor = Predictor(checkpoint)
    records = parse_source(source)
    if split != "all":
        if "split" not in records.meta.columns:
            raise CxrlabError(f"--split {split}: source {source!r} has no official split")
        records = records.take(np.flatnonzero(records.meta["split"].to_numpy() == split))
    missing = [n for n in predictor.label_names if n not in records.labels.names]
    if missing:
        raise CxrlabError(f"the checkpoint predicts {missing}, which source {source!r} does not label")
    columns = [records.labels.index(n) for n in predictor.label_names]
    from ..labels import LabelSpace

    labels = LabelSpace("checkpoint", tuple(predictor.label_names))
    result = apply_policy(records.values[:, columns], labels,
                          policy or predictor.info["recipe"]["data"]["policy"].replace("spml", "u_zeros"))
    rows = result.rows
    probs = predictor.predict([records.read(int(i)) for i in rows])
    metrics = multilabel_report(probs, result.target, result.mask, predictor.label_names,
                                thresholds=predictor.thresholds)
    return write_report(Path(out_dir), metrics, probs, result.target, result.mask, predictor.label_names,
                        config=predictor.info["recipe"])
