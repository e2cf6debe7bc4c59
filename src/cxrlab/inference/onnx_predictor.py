"""Inference from an exported ONNX model with ONNX Runtime only: no torch is imported on this path.

An export (:mod:`cxrlab.inference.export`) is two files: ``model.onnx`` and its sidecar
``model.onnx.json`` (labels, thresholds and where they came from, input size, resize mode, the SHA-256
of the ONNX file and of the checkpoint weights it came from, the parity figure measured at export).
:class:`OnnxPredictor` refuses a model whose sidecar is missing, corrupt, of another format, or whose
ONNX file does not match the recorded SHA-256, naming the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import CxrlabError
from ..serialization import sha256_file  # noqa: F401 (re-exported for export and serve)
from .predictions import write_predictions

SIDECAR_FORMAT = "cxrlab-onnx"
SIDECAR_VERSION = 1
INPUT_NAME = "image"
REQUIRED_KEYS = ("labels", "thresholds", "image_size", "resize", "model_sha256", "outputs")


def sidecar_path(onnx_path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + ".json")


def read_sidecar(onnx_path) -> dict:
    """The sidecar of ``onnx_path``, checked: format, version, the keys inference needs, and the ONNX
    file's SHA-256 against the recorded one."""
    onnx_path = Path(onnx_path)
    side = sidecar_path(onnx_path)
    if not onnx_path.is_file():
        raise CxrlabError(f"ONNX model not found: {onnx_path}")
    try:
        meta = json.loads(side.read_text())
    except FileNotFoundError:
        raise CxrlabError(f"ONNX sidecar missing: {side} (export writes it next to the model)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CxrlabError(f"ONNX sidecar {side} is corrupt (not valid JSON: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CxrlabError(f"{side} is not a cxrlab ONNX sidecar (format {found!r})")
    if int(meta.get("version", 0)) > SIDECAR_VERSION:
        raise CxrlabError(f"{side}: sidecar version {meta['version']} is newer than this cxrlab reads "
                          f"({SIDECAR_VERSION}); upgrade cxrlab")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise CxrlabError(f"ONNX sidecar {side} lacks {', '.join(missing)}")
    if len(meta["thresholds"]) != len(meta["labels"]):
        raise CxrlabError(f"ONNX sidecar {side}: {len(meta['thresholds'])} thresholds for "
                          f"{len(meta['labels'])} labels")
    if sha256_file(onnx_path) != meta["model_sha256"]:
        raise CxrlabError(f"ONNX model {onnx_path} does not match its sidecar {side.name} (SHA-256 differs: "
                          "the file was changed or truncated after export)")
    return meta


class OnnxPredictor:
    """``predict(images) -> probabilities`` (N×L) through an ONNX Runtime CPU session.

    Images are fitted to the training size exactly as :class:`cxrlab.inference.predictor.Predictor`
    fits them (``read_image`` then ``fit_image``), so both give the same probabilities within 1e-4.
    ``threads``: ONNX Runtime's intra-op threads (None: its default, one per core).
    """

    backend = "onnxruntime"

    def __init__(self, path, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.meta = read_sidecar(self.path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
            raise CxrlabError(f"cannot load ONNX model {self.path}: {type(exc).__name__}: {exc}") from None
        outputs = [o.name for o in self.session.get_outputs()]
        if "probabilities" not in outputs or [i.name for i in self.session.get_inputs()] != [INPUT_NAME]:
            raise CxrlabError(f"ONNX model {self.path} is not a cxrlab export (inputs "
                              f"{[i.name for i in self.session.get_inputs()]}, outputs {outputs})")
        self.output_names = outputs
        self.label_names = list(self.meta["labels"])
        self.thresholds = np.asarray(self.meta["thresholds"], dtype=np.float64)
        self.threshold_source = self.meta.get("threshold_source", "unknown")
        self.image_size = int(self.meta["image_size"])
        self.resize = self.meta["resize"]
        self.has_maps = "maps" in outputs

    @property
    def identity(self) -> dict:
        """What the server reports as the model's identity."""
        return {"file": self.path.name, "format": "onnx", "sha256": self.meta["model_sha256"],
                "weights_sha256": self.meta.get("weights_sha256"), "head": self.meta.get("head"),
                "backbones": self.meta.get("backbones"), "cxrlab_version": self.meta.get("cxrlab_version")}

    def fit_size(self, image: np.ndarray) -> np.ndarray:
        from ..data.cache import fit_image

        return fit_image(image, self.image_size, self.resize)

    def run(self, fitted: np.ndarray) -> dict[str, np.ndarray]:
        """All outputs for uint8 images already at the input size (N×S×S)."""
        x = np.ascontiguousarray(np.asarray(fitted, dtype=np.float32)[:, None] / np.float32(255.0))
        return dict(zip(self.output_names, self.session.run(self.output_names, {INPUT_NAME: x})))

    def predict_cached(self, fitted: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """As ``Predictor.predict_cached``: probabilities for uint8 images at the input size."""
        return self.predict_fitted(fitted, batch_size)

    def predict_fitted(self, fitted: np.ndarray, batch_size: int = 32) -> np.ndarray:
        out = [self.session.run(["probabilities"], {INPUT_NAME: np.ascontiguousarray(
            np.asarray(fitted[s:s + batch_size], dtype=np.float32)[:, None] / np.float32(255.0))})[0]
            for s in range(0, len(fitted), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.label_names)), dtype=np.float32)

    def predict(self, images: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Probabilities for in-memory images (float [0, 1] or uint8, any size)."""
        if not len(images):
            return self.predict_fitted(np.zeros((0, self.image_size, self.image_size), np.uint8))
        return self.predict_fitted(np.stack([self.fit_size(im) for im in images]), batch_size)

    def predict_files(self, paths, batch_size: int = 32, workers: int | None = None) -> np.ndarray:
        """Probabilities for image files, decoded by ``workers`` threads one batch at a time."""
        from concurrent.futures import ThreadPoolExecutor

        from ..data.images import read_image

        paths = list(paths)
        workers = workers or min(4, os.cpu_count() or 1)
        out = []
        with ThreadPoolExecutor(workers) as pool:
            for start in range(0, len(paths), batch_size):
                batch = list(pool.map(lambda p: self.fit_size(read_image(p)), paths[start:start + batch_size]))
                out.append(self.predict_fitted(np.stack(batch), batch_size))
        return np.concatenate(out) if out else np.zeros((0, len(self.label_names)), dtype=np.float32)

    def native_heatmaps(self, fitted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities L, heatmaps L×S×S in [0, 1]) of one fitted image, from the exported map output."""
        from .overlay import normalise_maps, resize_maps

        if not self.has_maps:
            raise CxrlabError(f"ONNX model {self.path.name} has no heatmap output (its head "
                              f"{self.meta.get('head')!r} gives no spatial maps)")
        out = self.run(fitted[None])
        maps = normalise_maps(resize_maps(out["maps"], (self.image_size, self.image_size)))
        return out["probabilities"][0], maps[0]


def _read_tolerant(predictor: OnnxPredictor, path) -> tuple[np.ndarray, str]:
    from ..data.images import read_image

    size = predictor.image_size
    try:
        return predictor.fit_size(read_image(path)), ""
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this image's, reported in its row
        return np.zeros((size, size), np.uint8), f"{type(exc).__name__}: {exc}"


def predict_files(model_path, inputs, out_csv, batch_size: int = 32, workers: int | None = None):
    """``cxrlab predict model.onnx files...``: the checkpoint path's CSV, through ONNX Runtime only.
    An unreadable image keeps its row (blank probabilities, the reason in ``error``)."""
    from concurrent.futures import ThreadPoolExecutor

    from ..data.sources.generic import collect_images

    predictor = OnnxPredictor(model_path)
    files = collect_images(inputs)
    probs = np.full((len(files), len(predictor.label_names)), np.nan, dtype=np.float32)
    errors: list[str] = []
    with ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1)) as pool:
        for start in range(0, len(files), batch_size):
            batch = list(pool.map(lambda f: _read_tolerant(predictor, f), files[start:start + batch_size]))
            ok = np.array([e == "" for _, e in batch])
            if ok.any():
                images = np.stack([im for im, _ in batch])
                probs[start + np.flatnonzero(ok)] = predictor.predict_fitted(images[ok], batch_size)
            errors += [e for _, e in batch]
    return write_predictions(out_csv, files, probs, errors, predictor.label_names, predictor.thresholds)
