"""The PyTorch backend of :class:`~cxrlab.inference.predictor.Predictor`: a model in eval mode (a
checkpoint's, an ensemble, or one built in your own loop), with a calibrated temperature dividing its
logits as the ONNX graph does; native heatmaps and Grad-CAM / Grad-CAM++ (one at a time: they hook the
model)."""
from __future__ import annotations

import threading

import numpy as np
import torch
from torch import nn

from ..errors import CxrlabError
from .heatmaps import gradcam_maps, label_heatmaps


class TorchBackend:
    def __init__(self, model: nn.Module, size: int, device: str | None = None, temperature=None):
        self.size = int(size)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.temperature = None if temperature is None else torch.as_tensor(temperature, dtype=torch.float32)
        self.runtime = f"torch {torch.__version__}"
        self.identity: dict = {}
        self._cam_lock = threading.Lock()
        self._methods: tuple[str, ...] | None = None

    def _input(self, fitted: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(fitted)).float().div_(255.0).unsqueeze(1).to(self.device)

    @torch.no_grad()
    def probabilities(self, fitted: np.ndarray) -> np.ndarray:
        logits = self.model(self._input(fitted)).logits.float()
        if self.temperature is not None:
            logits = logits / self.temperature.to(logits.device)
        return torch.sigmoid(logits).cpu().numpy()

    @property
    def methods(self) -> tuple[str, ...]:
        """``native`` when the head (every member of an ensemble) has maps of its own; Grad-CAM always."""
        if self._methods is None:
            try:
                label_heatmaps(self.model, torch.zeros(1, 1, self.size, self.size, device=self.device))
                native = ("native",)
            except CxrlabError:
                native = ()
            self._methods = native + ("gradcam", "gradcampp")
        return self._methods

    def heatmaps(self, fitted: np.ndarray, labels: list[int], method: str) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities L, heatmaps K×S×S in [0, 1]) of one fitted image for the labels asked."""
        x = self._input(fitted[None])
        if method == "native":
            maps = label_heatmaps(self.model, x)[1][0, labels]
        else:
            with self._cam_lock:
                maps = gradcam_maps(self.model, x.expand(len(labels), -1, -1, -1), list(labels), method)
        return self.probabilities(fitted[None])[0], maps

