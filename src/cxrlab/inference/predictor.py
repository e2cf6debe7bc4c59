"""Probabilities from a trained model, whichever runtime runs it.

A ``Predictor`` is a model card (:mod:`cxrlab.model_card`: labels, thresholds, temperature, input spec)
and a backend: :class:`~cxrlab.inference.torch_backend.TorchBackend` for a checkpoint, an ensemble or a
model of your own loop, :class:`~cxrlab.inference.onnx_backend.OnnxBackend` for an ONNX export (this
module and that one import no torch). Images reach either through the one preprocessing path
(:func:`cxrlab.data.preprocess.preprocess`, the pixels the training cache held), so a checkpoint and
its export give the same probabilities.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.preprocess import preprocess
from ..errors import CxrlabError, unknown
from ..model_card import InputSpec, ModelCard
from ..serialization import sha256_file
from .batch import predict_tolerant
from .onnx_backend import OnnxBackend

METHODS = ("native", "gradcam", "gradcampp")  # heatmaps: the head's own maps, Grad-CAM, Grad-CAM++


class Predictor:
    """``predict(images) -> probabilities`` (N×L numpy); decisions at ``thresholds`` (on the scale the
    backend outputs: a calibrated temperature is applied to both)."""

    def __init__(self, backend, card: ModelCard):
        self.backend, self.card = backend, card
        self.label_names = list(card.labels)
        self.thresholds = card.output_thresholds()

    # ------------------------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path, device: str | None = None, threads: int | None = None) -> "Predictor":
        """``*.onnx`` through ONNX Runtime (no torch), anything else as a checkpoint (or run) folder."""
        if Path(path).suffix.lower() == ".onnx":
            return cls.from_onnx(path, threads)
        if threads:
            import torch  # lazy: the checkpoint path only

            torch.set_num_threads(threads)
        return cls.from_checkpoint(path, device=device)

    @classmethod
    def from_onnx(cls, path, threads: int | None = None) -> "Predictor":
        backend = OnnxBackend(path, threads)
        return cls(backend, backend.card)

    @classmethod
    def from_checkpoint(cls, checkpoint, device: str | None = None, calibrated: bool = True) -> "Predictor":
        """The model of a checkpoint folder (or a run folder: its best checkpoint) with its card;
        ``calibrated=False`` leaves out a temperature from ``cxrlab calibrate`` (to refit it)."""
        # lazy: these import torch, which the ONNX path must not
        from ..checkpoint import INFO_FILE, MODEL_FILE, STATE_FILE, find_checkpoint, load_model, read_card
        from .torch_backend import TorchBackend

        folder = find_checkpoint(Path(checkpoint))
        model, info = load_model(folder)
        card = read_card(folder)
        if not calibrated:
            card = card.replace(temperature=None)
        backend = TorchBackend(model, card.input.size, device, card.temperature)
        weights = info.get("files", {}).get(STATE_FILE if info.get("ema") else MODEL_FILE, {})
        backend.identity = {"file": folder.name, "format": "checkpoint", "sha256": sha256_file(folder / INFO_FILE),
                            "weights_sha256": weights.get("sha256"), "head": card.head,
                            "backbones": list(card.backbones)}
        return cls(backend, card)

    @classmethod
    def from_model(cls, model, label_names, thresholds=None, image_size: int = 224, resize: str = "pad",
                   device: str | None = None, temperature=None) -> "Predictor":
        """A model of your own loop (any ``nn.Module`` returning an ``Output``), fed as the prepared cache
        fed it: images fitted to ``image_size`` by ``resize``."""
        from .torch_backend import TorchBackend  # lazy: torch, which the ONNX path must not import

        card = ModelCard(labels=tuple(label_names), input=InputSpec(int(image_size), resize),
                         thresholds=None if thresholds is None else tuple(float(t) for t in thresholds),
                         temperature=None if temperature is None else tuple(float(t) for t in temperature))
        return cls(TorchBackend(model, card.input.size, device, card.temperature), card)

    # ------------------------------------------------------------------------------------ what it is

    @property
    def spec(self) -> InputSpec:
        return self.card.input

    @property
    def image_size(self) -> int:
        return self.card.input.size

    @property
    def model(self):
        """The torch module (checkpoint and in-loop predictors only)."""
        if not hasattr(self.backend, "model"):
            raise CxrlabError(f"{self.backend.runtime} runs an exported graph: it has no torch model")
        return self.backend.model

    @property
    def threshold_source(self) -> str:
        return self.card.threshold_source

    @property
    def identity(self) -> dict:
        return self.backend.identity

    @property
    def runtime(self) -> str:
        return self.backend.runtime

    @property
    def methods(self) -> tuple[str, ...]:
        """The heatmap methods this backend draws (native, gradcam, gradcampp)."""
        return self.backend.methods

    # ------------------------------------------------------------------------------------ predicting

    def fit(self, source) -> np.ndarray:
        """A file or an in-memory image as this model's uint8 input (the one preprocessing path)."""
        return preprocess(self.card.input, source)

    def predict_fitted(self, fitted: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Probabilities for uint8 images already at the input size (N×S×S, e.g. a prepared cache's)."""
        out = [self.backend.probabilities(fitted[s:s + batch_size]) for s in range(0, len(fitted), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.label_names)), dtype=np.float32)

    def predict(self, images: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Probabilities for in-memory images (float [0, 1] or uint8, any size)."""
        if not len(images):
            return self.predict_fitted(np.zeros((0, self.image_size, self.image_size), np.uint8))
        return self.predict_fitted(np.stack([self.fit(im) for im in images]), batch_size)

    def predict_paths(self, paths, batch_size: int = 32, workers: int | None = None) -> np.ndarray:
        """Probabilities for image files (PNG, JPEG, DICOM); an unreadable one is an error naming it
        (:func:`cxrlab.inference.batch.predict_tolerant` keeps going past it instead)."""
        paths = list(paths)
        return predict_tolerant(self, len(paths), lambda i: self.fit(paths[i]), batch_size, workers,
                                strict=True)[0]

    def heatmaps(self, fitted: np.ndarray, labels: list[int], method: str = "native"):
        """(probabilities L, heatmaps K×S×S in [0, 1]) of one fitted image for the label indices asked."""
        if method not in METHODS:
            raise unknown("heatmap method", method, METHODS)
        return self.backend.heatmaps(fitted, list(labels), method)  # it says why a method does not apply
