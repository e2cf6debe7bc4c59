"""Checkpoints as safetensors + JSON: nothing is pickled and loading never executes code from a file.

A checkpoint is a folder (written to a temporary folder, then renamed into place, so a crash never
leaves a half-written one):

``model.safetensors``  ``model.*`` (the CxrModel), ``regime.*`` (training-only regime modules),
                       ``objective.*`` (loss-term state, e.g. ROLE's label matrix)
``state.safetensors``  what resuming needs: ``optim.*`` optimiser state tensors, ``ema.*`` EMA
                       weights, ``ema_rng``, ``rng.<rank>.*`` RNG states as uint8 tensors; its
                       metadata ``structure`` (JSON) describes the optimiser state around those
                       tensors and holds the scheduler / grad-scaler states
``checkpoint.json``    format and version, the model card's fields (:mod:`cxrlab.model_card`: labels,
                       thresholds and their source, temperature, input spec, backbones, head,
                       provenance, versions), the resolved recipe, metrics, epoch, step, trainer
                       state and each safetensors file's size and SHA-256

Inference reads a checkpoint through its card (:func:`read_card`), never through the recipe; a
checkpoint written before the card existed is read into one from its recipe by the card's codec.
"""
from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .ensemble import KIND as ENSEMBLE
from .ensemble import load_ensemble
from .errors import CxrlabError
from .model_card import ModelCard, card_from_json, card_to_json
from .models import build_from_config
from .serialization import sha256_file, to_jsonable

FORMAT = "cxrlab-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
INFO_FILE = "checkpoint.json"


# ----------------------------------------------------------------------------------------- writing

def module_tensors(modules: dict[str, nn.Module | None]) -> dict[str, torch.Tensor]:
    """``{prefix: module}`` -> ``{"prefix.key": tensor}`` over the modules' state dicts."""
    out = {}
    for prefix, module in modules.items():
        if module is not None:
            out.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
    return out


def flatten_optimizer(state_dict: dict, prefix: str = "optim") -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser state dict as named tensors plus a JSON-able description that points at them."""
    tensors, state = {}, {}
    for idx, entry in state_dict["state"].items():
        slots = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                name = f"{prefix}.{idx}.{key}"
                tensors[name] = value
                slots[key] = {"tensor": name}
            else:
                slots[key] = {"value": _encode(value)}
        state[str(idx)] = slots
    return tensors, {"state": state, "param_groups": _encode(state_dict["param_groups"])}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    state = {}
    for idx, slots in structure["state"].items():
        state[int(idx)] = {key: tensors[slot["tensor"]] if "tensor" in slot else _decode(slot["value"])
                           for key, slot in slots.items()}
    return {"state": state, "param_groups": _decode(structure["param_groups"])}


def save_checkpoint(folder: Path, weights: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                    structure: dict, info: dict, also: Path | None = None) -> Path:
    """Write a checkpoint folder atomically; ``also`` gets the same checkpoint (files hard-linked)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    tmp_also = None if also is None else Path(also).parent / f".{Path(also).name}.tmp-{os.getpid()}"
    try:
        _write_folder(folder, tmp, weights, state, structure, info, also, tmp_also)
    except OSError as exc:
        # e.g. a full disk: the temporary folders go, the previous checkpoint (never touched) stays
        for t in (tmp, tmp_also):
            if t is not None:
                shutil.rmtree(t, ignore_errors=True)
        raise CxrlabError(f"cannot write checkpoint {folder}: {exc.strerror or exc}"
                          + (" (disk full)" if exc.errno == errno.ENOSPC else "")
                          + f"; the previous checkpoint in {folder} is intact") from exc
    return folder


def _write_folder(folder: Path, tmp: Path, weights, state, structure, info, also, tmp_also) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = {}
    for name, tensors, meta in ((MODEL_FILE, weights, {"format": FORMAT}),
                                (STATE_FILE, state, {"format": FORMAT, "structure": json.dumps(_encode(structure))})):
        files[name] = _write_tensors(tmp / name, tensors, meta)
    info = {"format": FORMAT, "version": VERSION, **info, **card_to_json(_training_card(info, weights)),
            "files": files}
    _write_json(tmp / INFO_FILE, info)
    if also is not None:
        also = Path(also)
        shutil.rmtree(tmp_also, ignore_errors=True)
        tmp_also.mkdir()
        for name in (MODEL_FILE, STATE_FILE, INFO_FILE):
            try:
                os.link(tmp / name, tmp_also / name)
            except OSError:
                shutil.copy2(tmp / name, tmp_also / name)
        _commit(tmp_also, also)
    _commit(tmp, folder)


def _training_card(info: dict, weights: dict[str, torch.Tensor]) -> ModelCard:
    """The card of a checkpoint being written: from its info (the recipe, for a trainer's), with the
    backbones' input normalisation read from the weights and the versions that wrote it."""
    card = card_from_json(info, INFO_FILE)
    stats = {key: [float(v) for k, v in weights.items() if k.startswith("model.") and k.endswith(f".input_{key}")]
             for key in ("mean", "std")}
    spec = replace(card.input, mean=tuple(stats["mean"]), std=tuple(stats["std"])) if stats["mean"] else card.input
    training = replace(card.training, date=card.training.date or time.strftime("%Y-%m-%d", time.gmtime()))
    return card.replace(input=spec, training=training,
                        versions={**card.versions, "cxrlab": __version__, "torch": torch.__version__})


def set_thresholds(checkpoint: Path, thresholds, source: str = "") -> None:
    """Record decision thresholds (fitted on validation data) in a checkpoint's card."""
    folder = find_checkpoint(checkpoint)
    info = read_info(folder)
    card = card_from_json(info, folder / INFO_FILE)
    card = card.replace(thresholds=tuple(float(t) for t in thresholds),
                        threshold_source=source or "fitted per label on the training run's validation part")
    write_card(folder, card, info)


def write_card(folder: Path, card: ModelCard, info: dict | None = None) -> None:
    """Replace the card's fields in ``folder``'s checkpoint.json (atomically)."""
    info = read_info(folder) if info is None else info
    _write_json(Path(folder) / INFO_FILE, {**info, **card_to_json(card)})


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> dict:
    from safetensors.torch import save_file

    seen, ready = set(), {}
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        key = t.untyped_storage().data_ptr()
        if t.numel() and key in seen:  # safetensors refuses tensors that share memory (tied weights)
            t = t.clone()
        seen.add(key)
        ready[name] = t
    try:
        save_file(ready, str(path), metadata=metadata)
    except OSError:
        raise
    except Exception as exc:  # safetensors reports I/O failures (a full disk) as its own error type
        code = errno.ENOSPC if "StorageFull" in str(exc) or "code: 28" in str(exc) else errno.EIO
        raise OSError(code, f"{os.strerror(code)} ({exc})", str(path)) from exc
    _fsync(path)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(to_jsonable(data), indent=1, allow_nan=False))
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _commit(tmp: Path, final: Path) -> None:
    """Swap ``tmp`` in as ``final``; a directory cannot be renamed over a non-empty one, so the old
    one is moved aside first (and found by :func:`find_checkpoint` if a crash hits in between)."""
    old = final.parent / f".{final.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------- reading

def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder from itself or from a run folder (its ``best/``, else ``last/``).

    A ``best/`` or ``last/`` folder without its ``checkpoint.json`` (deleted, or half-copied by hand) is
    refused rather than silently passed over for the other one, which is a different model."""
    path = Path(path)
    for name in ("best", "last"):
        part = path / name
        if part.is_dir() and not (part / INFO_FILE).is_file() and not (path / f".{name}.old" / INFO_FILE).is_file():
            raise CxrlabError(f"{part} is an incomplete checkpoint (no {INFO_FILE}): it cannot be used; pass "
                              "the other checkpoint folder of the run explicitly if that is the one you want")
    candidates = [path, path / "best", path / "last", path.parent / f".{path.name}.old",
                  path / ".best.old", path / ".last.old"]
    for candidate in candidates:
        if (candidate / INFO_FILE).is_file():
            return candidate
    if not path.exists():
        raise CxrlabError(f"checkpoint not found: {path}")
    raise CxrlabError(f"no checkpoint in {path} (expected {INFO_FILE}, or a best/ or last/ folder with one)")


def latest(run_dir: Path) -> Path | None:
    """The run's ``last/`` checkpoint to resume from (or the copy a crash mid-swap left), if any."""
    for candidate in (Path(run_dir) / "last", Path(run_dir) / ".last.old"):
        if (candidate / INFO_FILE).is_file():
            return candidate
    return None


def read_info(folder: Path) -> dict:
    path = Path(folder) / INFO_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise CxrlabError(f"checkpoint file missing: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CxrlabError(f"checkpoint file {path} is corrupt or truncated (not valid JSON: {exc})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CxrlabError(f"{path} is not a cxrlab checkpoint (format {info.get('format') if isinstance(info, dict) else None!r})")
    if int(info.get("version", 0)) > VERSION:
        raise CxrlabError(f"{path}: checkpoint format version {info['version']} is newer than this cxrlab "
                          f"reads ({VERSION}); upgrade cxrlab")
    return info


def read_card(checkpoint: Path) -> ModelCard:
    """The model card of a checkpoint (or run) folder; one from the recipe for a checkpoint older than
    the card."""
    folder = find_checkpoint(checkpoint)
    return card_from_json(read_info(folder), folder / INFO_FILE)


def read_tensors(folder: Path, name: str, info: dict, prefix: str | None = None,
                 with_metadata: bool = False):
    """Tensors of one checkpoint file (optionally only those under ``prefix.``, with it stripped),
    after checking the file's size and checksum against ``checkpoint.json``."""
    from safetensors import safe_open

    path = Path(folder) / name
    if not path.is_file():
        raise CxrlabError(f"checkpoint file missing: {path}")
    expected = info.get("files", {}).get(name)
    if expected:
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CxrlabError(f"checkpoint file {path} is truncated or corrupt ({size} bytes, expected "
                              f"{expected['bytes']})")
        if sha256_file(path) != expected["sha256"]:
            raise CxrlabError(f"checkpoint file {path} is corrupt (SHA-256 differs from {INFO_FILE})")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            keys = [k for k in f.keys() if prefix is None or k.startswith(prefix + ".")]
            cut = len(prefix) + 1 if prefix else 0
            tensors = {k[cut:]: f.get_tensor(k) for k in keys}
    except Exception as exc:  # safetensors raises its own error types for bad headers/lengths
        raise CxrlabError(f"checkpoint file {path} is corrupt or truncated ({exc})") from None
    return (tensors, metadata) if with_metadata else tensors


def load_module(module: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """``load_state_dict`` (strict) with an error that names the file and the mismatched keys."""
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CxrlabError(f"{where}: weights do not fit the model built from its recipe: {exc}") from None


def load_model(checkpoint: Path, ema: bool | None = None):
    """``(model, info)``: the model rebuilt from the checkpoint's recipe with its weights, in eval mode.

    ``ema`` None uses the EMA weights when the run kept them (they are what validation selected on).
    ``info`` is the checkpoint JSON: ``recipe``, ``labels``, ``thresholds``, ``metrics``, ...
    """
    folder = find_checkpoint(checkpoint)
    info = read_info(folder)
    if info.get("kind") == ENSEMBLE:  # a folder from `cxrlab ensemble`: one module over its members
        return load_ensemble(folder, info, load_model), info
    use_ema = info.get("ema", False) if ema is None else ema
    if use_ema:
        if not info.get("ema", False):
            raise CxrlabError(f"{folder}: the run kept no EMA weights")
        weights, where = read_tensors(folder, STATE_FILE, info, prefix="ema"), folder / STATE_FILE
    else:
        weights, where = read_tensors(folder, MODEL_FILE, info, prefix="model"), folder / MODEL_FILE
    try:
        m = info["recipe"]["model"]
        labels = info["labels"]
        # normalisation comes with the weights; their names settle head options added since the save
        model = build_from_config(m, len(labels), load_weights=False, weight_names=weights,
                                  image_size=(info["recipe"].get("data") or {}).get("image_size"))
    except KeyError as exc:
        raise CxrlabError(f"{folder / INFO_FILE} lacks {exc}") from None
    load_module(model, weights, where)
    return model.eval(), info


# ----------------------------------------------------------------------------------------- RNG

def capture_rng() -> dict[str, torch.Tensor]:
    """This process's torch/CUDA/numpy/python RNG states, each as a uint8 tensor."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    _, keys, pos, has_gauss, cached = np.random.get_state()
    out["numpy"] = _bytes(np.asarray(keys, dtype="<u4"))
    out["numpy_extra"] = _bytes(np.array([pos, has_gauss, cached], dtype="<f8"))
    version, internal, gauss = random.getstate()
    out["python"] = _bytes(np.asarray(internal, dtype="<u4"))
    out["python_extra"] = _bytes(np.array([version, gauss is not None, gauss or 0.0], dtype="<f8"))
    return out


def restore_rng(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    cuda = [states[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in states]
    if cuda and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    pos, has_gauss, cached = _unbytes(states["numpy_extra"], "<f8")
    np.random.set_state(("MT19937", _unbytes(states["numpy"], "<u4"), int(pos), int(has_gauss), float(cached)))
    version, has, gauss = _unbytes(states["python_extra"], "<f8")
    internal = tuple(int(v) for v in _unbytes(states["python"], "<u4"))
    random.setstate((int(version), internal, float(gauss) if has else None))


def _bytes(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array).view(np.uint8).copy())


def _unbytes(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    return tensor.numpy().view(dtype).copy()


# ----------------------------------------------------------------------------------------- JSON

def _encode(value):
    """JSON-able form of optimiser/scheduler state: tuples are tagged so they come back as tuples."""
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if torch.is_tensor(value) and value.numel() == 1:
        return value.item()
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    return value


def _decode(value):
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v) for v in value["__tuple__"])
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: _decode(v) for k, v in value.items()}
    return value
