"""The ONNX Runtime backend of :class:`~cxrlab.inference.predictor.Predictor`: no torch on this path.

An export (:mod:`cxrlab.inference.export`) is two files: ``model.onnx`` and its sidecar
``model.onnx.json``: the model card (:mod:`cxrlab.model_card`, the same codec as ``checkpoint.json``),
the SHA-256 of the ONNX file and of the checkpoint weights it came from, the outputs and the parity
figure measured at export. :func:`read_sidecar` refuses a sidecar that is missing, corrupt, of another
format, or whose ONNX file does not match the recorded SHA-256, naming the file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import CxrlabError
from ..model_card import ModelCard, card_from_json, check_card_fits
from ..serialization import sha256_file
from .overlay import normalise_maps, resize_maps

SIDECAR_FORMAT = "cxrlab-onnx"
SIDECAR_VERSION = 2  # 2: the model card's fields; 1 (still read): thresholds scaled by the temperature
INPUT_NAME = "image"
REQUIRED_KEYS = ("labels", "model_sha256", "outputs")
LABELS_KEY = "cxrlab.labels"  # the graph's metadata: its label names as JSON (exports since issue 25)


def sidecar_path(onnx_path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + ".json")


def read_sidecar(onnx_path) -> tuple[dict, ModelCard]:
    """(the sidecar of ``onnx_path``, its model card), checked: format, version, the keys inference needs,
    and the ONNX file's SHA-256 against the recorded one."""
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
    card = card_from_json(meta, f"ONNX sidecar {side}")
    if sha256_file(onnx_path) != meta["model_sha256"]:
        raise CxrlabError(f"ONNX model {onnx_path} does not match its sidecar {side.name} (SHA-256 differs: "
                          "the file was changed or truncated after export)")
    return meta, card


class OnnxBackend:
    """An exported graph through an ONNX Runtime CPU session; its temperature is inside the graph.
    ``threads``: ONNX Runtime's intra-op threads (None: its default, one per core)."""

    def __init__(self, path, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.meta, self.card = read_sidecar(self.path)
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
        self._check_card()
        self.methods = ("native",) if "maps" in outputs else ()
        self.runtime = f"onnxruntime {ort.__version__}"
        self.identity = {"file": self.path.name, "format": "onnx", "sha256": self.meta["model_sha256"],
                         "weights_sha256": self.meta.get("weights_sha256"), "head": self.card.head,
                         "backbones": list(self.card.backbones), "cxrlab_version": self.card.versions.get("cxrlab")}

    def _check_card(self) -> None:
        """The sidecar's card against the graph: output count, input size, label names (where the graph
        holds them); an edited or swapped sidecar must not shift labels onto other outputs."""
        shape = {o.name: o.shape for o in self.session.get_outputs()}["probabilities"]
        size = self.session.get_inputs()[0].shape[-1]
        size = size if isinstance(size, int) else None
        count = shape[-1] if shape and isinstance(shape[-1], int) else None
        if count is None:  # a symbolic label axis: ask the graph itself
            blank = np.zeros((1, size or self.card.input.size, size or self.card.input.size), np.uint8)
            count = self.probabilities(blank).shape[-1]
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            labels = json.loads(meta[LABELS_KEY]) if LABELS_KEY in meta else None
        except json.JSONDecodeError:
            raise CxrlabError(f"ONNX model {self.path}: its {LABELS_KEY} metadata is not JSON") from None
        check_card_fits(self.card, sidecar_path(self.path), self.path, outputs=count, input_size=size, labels=labels)

    def outputs(self, fitted: np.ndarray) -> dict[str, np.ndarray]:
        """All outputs for uint8 images already at the input size (N×S×S)."""
        x = np.ascontiguousarray(np.asarray(fitted, dtype=np.float32)[:, None] / np.float32(255.0))
        return dict(zip(self.output_names, self.session.run(self.output_names, {INPUT_NAME: x})))

    def probabilities(self, fitted: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(fitted, dtype=np.float32)[:, None] / np.float32(255.0))
        return self.session.run(["probabilities"], {INPUT_NAME: x})[0]

    def heatmaps(self, fitted: np.ndarray, labels: list[int], method: str) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities L, heatmaps K×S×S in [0, 1]) of one fitted image, from the exported map output."""
        if method != "native":
            raise CxrlabError(f"heatmap method {method!r} needs the PyTorch checkpoint: an ONNX export draws "
                              "the head's native maps only")
        if method not in self.methods:
            raise CxrlabError(f"ONNX model {self.path.name} has no heatmap output (its head "
                              f"{self.card.head!r} gives no spatial maps); a checkpoint serves Grad-CAM")
        out = self.outputs(fitted[None])
        maps = normalise_maps(resize_maps(out["maps"][:, labels], fitted.shape))
        return out["probabilities"][0], maps[0]
