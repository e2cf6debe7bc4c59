"""Export a checkpoint to ONNX with torch's own exporter, checked against ONNX Runtime before writing.

The graph takes ``image`` (batch×1×S×S float32 in [0, 1]; the backbone's input normalisation is inside
it) and returns ``probabilities`` and ``logits`` (batch×L) and, when the head has spatial maps,
``maps`` (batch×L×h×w: the head's per-label attention or the linear head's CAM, before upsampling),
since ONNX Runtime has no autograd: native heatmaps are then built from ``maps`` in numpy. A per-label
temperature recorded by ``calibrate`` divides the logits inside the graph.

We use the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``): it traces these models
(convolutional backbones, attention heads written with matmuls and two-operand einsums) to a plain
graph with a dynamic batch axis. Tracing runs at batch 2 so no size-1 dimension is baked in, and with
``nn.MultiheadAttention``'s fused inference fast path switched off (it has no ONNX mapping).

Nothing is written unless ONNX Runtime reproduces eager PyTorch's probabilities on the check images
within ``tolerance`` (1e-4), at the whole batch and at batch 1. The check images go through the one
preprocessing path (:func:`cxrlab.data.preprocess.preprocess`) that both backends use when they serve,
so the figure is the one a user of either sees. The sidecar holds the checkpoint's model card
(:mod:`cxrlab.model_card`, one codec for both files) with the export's versions added.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..checkpoint import INFO_FILE, MODEL_FILE, STATE_FILE, find_checkpoint, load_model, read_card
from ..data.locking import pid_alive
from ..data.preprocess import preprocess
from ..data.sources import parse_source
from ..data.sources.generic import collect_images
from ..errors import CxrlabError
from ..model_card import InputSpec, card_to_json
from ..serialization import sha256_file
from .heatmaps import native_maps
from .onnx_backend import INPUT_NAME, LABELS_KEY, SIDECAR_FORMAT, SIDECAR_VERSION, sidecar_path

TOLERANCE = 1e-4
OPSET = 17


class ExportGraph(nn.Module):
    """``x -> (probabilities, logits[, maps])`` of a CxrModel or an ensemble (:mod:`cxrlab.ensemble`), as
    exported. An ensemble's ``maps`` are the weighted mean of its members' maps, each upsampled to the
    input and scaled to [0, 1] in the graph (as :func:`cxrlab.ensemble.ensemble_heatmaps` does)."""

    def __init__(self, model: nn.Module, size: int, temperature=None):
        super().__init__()
        self.model = model
        self._native_maps = native_maps
        t = torch.ones(0) if temperature is None else torch.as_tensor(temperature, dtype=torch.float32)
        self.register_buffer("temperature", t)
        with torch.no_grad():
            self.has_maps = self._maps(torch.zeros(2, 1, size, size))[1] is not None

    def _maps(self, x):
        if hasattr(self.model, "members"):
            return self._ensemble(x)
        fmap = self.model.features(x)
        out = self.model.head(fmap)
        return out.logits, self._native_maps(self.model, fmap, out)

    def _ensemble(self, x):
        """EnsembleModel.forward with each member run once for both the probabilities and the maps
        (the parity check compares the result with EnsembleModel.forward itself)."""
        import torch.nn.functional as F

        ens, probs, maps = self.model, [], []
        for k, member in enumerate(ens.members):
            fmap = member.features(x)
            out = member.head(fmap)
            cols = ens.member_columns(k)
            probs.append(torch.sigmoid(out.logits.float()[:, cols]))
            raw = self._native_maps(member, fmap, out)
            if raw is not None:
                m = F.interpolate(raw[:, cols], size=x.shape[-2:], mode="bilinear", align_corners=False)
                low, high = m.amin(dim=(2, 3), keepdim=True), m.amax(dim=(2, 3), keepdim=True)
                maps.append((m - low) / (high - low).clamp_min(1e-12) * ens.weights[k])
        p = (torch.stack(probs, dim=1) * ens.weights[None, :, None]).sum(1).clamp(ens.eps, 1 - ens.eps)
        total = sum(maps[1:], maps[0]) if len(maps) == len(ens.members) else None
        return torch.log(p) - torch.log1p(-p), total

    def _scaled(self, logits):
        logits = logits.float()
        return logits / self.temperature if self.temperature.numel() else logits

    def forward(self, x: torch.Tensor):
        logits, maps = self._maps(x)
        logits = self._scaled(logits)
        probs = torch.sigmoid(logits)
        return (probs, logits, maps) if self.has_maps else (probs, logits)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The probabilities of the model's own forward (what the export must reproduce)."""
        return torch.sigmoid(self._scaled(self.model(x).logits))


@contextlib.contextmanager
def _no_mha_fastpath():
    """``nn.MultiheadAttention``'s fused inference path has no ONNX mapping: off while tracing."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    previous = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(previous)


def check_images(paths, spec: InputSpec) -> tuple[np.ndarray, list[str]]:
    """Model inputs (uint8 N×S×S) for the parity check, through the one preprocessing path: the given
    files, or, without any, eight of the embedded synthetic radiographs."""
    if paths:
        files = collect_images(paths)
        return np.stack([preprocess(spec, f) for f in files]), [str(f) for f in files]
    records = parse_source(f"synthetic:8,size={spec.size}")
    return (np.stack([preprocess(spec, np.asarray(records.read(i))) for i in range(len(records))]),
            [f"synthetic:8,size={spec.size} #{i}" for i in range(len(records))])


def export_onnx(checkpoint, out, check: list | None = None, tolerance: float = TOLERANCE,
                opset: int = OPSET) -> dict:
    """Write ``out`` (ONNX) and ``out.json`` (sidecar) for a checkpoint; return the sidecar.

    ``check``: image files/folders for the parity check (default: synthetic radiographs). Raises a
    CxrlabError, writing nothing, when ONNX Runtime and PyTorch differ by more than ``tolerance``.
    """
    import onnx
    import onnxruntime as ort

    check_tolerance(tolerance)
    folder = find_checkpoint(Path(checkpoint))
    model, info = load_model(folder)
    model = model.float().eval()
    card = read_card(folder)
    if not card.input.mean:  # a checkpoint older than the card: the normalisation its weights hold
        backbones = _backbones(model)
        card = card.replace(input=replace(card.input, mean=tuple(float(b.input_mean) for b in backbones),
                                          std=tuple(float(b.input_std) for b in backbones)))
    size, temperature = card.input.size, card.temperature
    graph = ExportGraph(model, size, temperature).eval()
    names = ["probabilities", "logits"] + (["maps"] if graph.has_maps else [])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    dummy = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    try:
        with _no_mha_fastpath(), torch.no_grad(), warnings.catch_warnings():
            # the tracer warns about Python-side shape checks; they hold for every batch size
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (dummy,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=names,
                              dynamic_axes={n: {0: "batch"} for n in [INPUT_NAME] + names})
        _label_metadata(onnx, tmp, card.labels)
        onnx.checker.check_model(str(tmp))
        images, image_names = check_images(check, card.input)
        parity = _parity(graph, tmp, images, names, tolerance)
        parity["images"] = image_names
        if not np.isfinite(parity["max_abs_diff"]) or not np.isfinite(parity.get("maps_max_rel_diff", 0.0)):
            raise CxrlabError(f"ONNX export of {folder} failed its parity check: the probabilities or maps are not "
                              f"finite (difference {parity['max_abs_diff']}) on {len(images)} images; the checkpoint's "
                              "weights may hold NaN or inf; nothing was written")
        if not parity["max_abs_diff"] <= tolerance:
            raise CxrlabError(f"ONNX export of {folder} failed its parity check: ONNX Runtime and PyTorch "
                              f"probabilities differ by up to {parity['max_abs_diff']:.2e} (> {tolerance:g}) "
                              f"on {len(images)} images; nothing was written")
        weights_file = STATE_FILE if info.get("ema") else MODEL_FILE
        weights = {"weights_file": weights_file + (" (EMA weights)" if info.get("ema") else ""),
                   "weights_sha256": info.get("files", {}).get(weights_file, {}).get("sha256")}
        if info.get("kind") == "ensemble":  # its checkpoint.json lists every member's files and SHA-256
            weights = {"weights_file": f"{len(info['members'])} ensemble members (see members)",
                       "weights_sha256": None,
                       "members": [{"path": e["path"], "weight": e["weight"], "sha256": e["sha256"]}
                                   for e in info["members"]]}
        versions = {**card.versions, "cxrlab": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                    "onnxruntime": ort.__version__}
        sidecar = {
            "format": SIDECAR_FORMAT, "version": SIDECAR_VERSION,
            **card_to_json(card.replace(versions=versions)),  # thresholds unscaled: the card's convention
            "exporter": f"torch.onnx.export (TorchScript tracer, dynamo=False), opset {opset}",
            "model_file": out.name, "model_sha256": sha256_file(tmp),
            "checkpoint": str(folder), **weights, "checkpoint_json_sha256": sha256_file(folder / INFO_FILE),
            "graph_input": {"name": INPUT_NAME, "shape": ["batch", 1, size, size], "dtype": "float32",
                            "range": [0.0, 1.0], "from": "the model card's input spec (cxrlab.data.preprocess), / 255",
                            "temperature": "applied inside the graph" if temperature is not None else None},
            "outputs": {"probabilities": "batch×L sigmoid(logits)", "logits": "batch×L",
                        **({"maps": "batch×L×h×w raw per-label maps (attention or CAM)"} if graph.has_maps else {})},
            "parity": parity,
        }
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    side = sidecar_path(out)
    side_tmp = side.with_name(f".{side.name}.tmp-{os.getpid()}")
    side_tmp.write_text(json.dumps(sidecar, indent=1))
    os.replace(side_tmp, side)
    return sidecar


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the ``.NAME.tmp-PID`` files of ``out`` and its sidecar left by an export that was killed
    (kill -9, OOM) before it could clean up: those whose process no longer runs on this machine."""
    removed = []
    for name in (out.name, sidecar_path(out).name):
        for path in out.parent.glob(f".{glob.escape(name)}.tmp-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _label_metadata(onnx, path: Path, labels) -> None:
    """The label names inside the graph's metadata, so a loader can check the sidecar against them."""
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {LABELS_KEY: json.dumps(list(labels))})
    onnx.save(proto, str(path))


def check_tolerance(tolerance) -> float:
    """The parity tolerance: a finite number > 0 (NaN would turn the check off: nothing compares > NaN)."""
    try:
        value = float(tolerance)
    except (TypeError, ValueError):
        raise CxrlabError(f"--tolerance {tolerance!r}: expected a number, e.g. 1e-4") from None
    if not np.isfinite(value) or value <= 0:
        raise CxrlabError(f"--tolerance {tolerance!r}: must be a finite number > 0, e.g. 1e-4")
    return value


def _backbones(model) -> list:
    if hasattr(model, "members"):  # an ensemble
        return [b for member in model.members for b in _backbones(member)]
    backbone = model.backbone
    return list(backbone) if isinstance(backbone, nn.ModuleList) else [backbone]


def _parity(graph: ExportGraph, path: Path, images: np.ndarray, names: list[str], tolerance: float) -> dict:
    """Max |ORT - eager| of the probabilities (whole batch and batch 1; eager: the model's own forward)
    and of the raw maps (eager: the exported graph)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images.astype(np.float32)[:, None] / np.float32(255.0)
    with torch.no_grad():
        eager = [t.numpy() for t in graph(torch.from_numpy(x))]
        reference = graph.reference(torch.from_numpy(x)).numpy()
    ours = session.run(names, {INPUT_NAME: x})
    single = session.run(["probabilities"], {INPUT_NAME: x[:1]})[0]
    prob_diff = max(float(np.abs(ours[0] - reference).max()), float(np.abs(single - reference[:1]).max()))
    result = {"max_abs_diff": prob_diff, "n": int(len(images)), "batch_sizes": [1, int(len(images))],
              "tolerance": tolerance}
    if "maps" in names:
        scale = max(float(np.abs(eager[2]).max()), 1e-12)
        result["maps_max_rel_diff"] = float(np.abs(ours[2] - eager[2]).max()) / scale
    return result
