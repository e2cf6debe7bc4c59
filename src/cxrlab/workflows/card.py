"""``cxrlab card RUN_OR_EXPORT --out MODEL_CARD.md``: find a model's own files and write its card page
(``evaluation.model_card_md``). ``train`` and ``export`` write one too (report/MODEL_CARD.md and
``<model.onnx>.card.md``).

A run folder gives best/checkpoint.json and report/metrics.json; a checkpoint folder the report/ beside
it; a ``model.onnx`` its sidecar and, through the checkpoint the sidecar names, that run's report. No
torch: the files are read as JSON.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import CxrlabError
from ..evaluation.model_card_md import card_markdown
from ..model_card import card_from_json
from ..paths import check_output_file
from ..serialization import sha256_file

INFO_FILE = "checkpoint.json"  # checkpoint.INFO_FILE, named here so this module stays torch-free
CARD_SUFFIX = ".card.md"


def find_model_files(path: Path) -> dict:
    """``{"info": path of checkpoint.json or the sidecar, "metrics": report/metrics.json or None, "onnx":
    the ONNX file or None}`` for a run folder, a checkpoint folder or a ``model.onnx``."""
    path = Path(path)
    onnx = None
    if path.suffix.lower() == ".onnx":
        onnx, info = path, path.with_name(path.name + ".json")
        if not info.is_file():
            raise CxrlabError(f"{path}: its sidecar {info.name} is missing; export it again with `cxrlab export`")
        checkpoint = Path(json.loads(info.read_text()).get("checkpoint") or "")
    elif (path / INFO_FILE).is_file():
        checkpoint = info = path
        info = path / INFO_FILE
    elif (path / "best" / INFO_FILE).is_file():
        checkpoint, info = path / "best", path / "best" / INFO_FILE
    else:
        raise CxrlabError(f"{path}: not a run folder (best/{INFO_FILE}), a checkpoint folder ({INFO_FILE}) or a "
                          "model.onnx with its sidecar")
    metrics = checkpoint.parent / "report" / "metrics.json" if str(checkpoint) else None
    return {"info": info, "metrics": metrics if metrics and metrics.is_file() else None, "onnx": onnx}


def model_card_text(path: Path) -> str:
    """The card page of the run, checkpoint or export at ``path``."""
    found = find_model_files(path)
    try:
        info = json.loads(found["info"].read_text())
        metrics = json.loads(found["metrics"].read_text()) if found["metrics"] else None
    except json.JSONDecodeError as exc:
        raise CxrlabError(f"{found['info'] if metrics is None else found['metrics']}: not valid JSON ({exc})") from None
    card = card_from_json(info, found["info"])
    files = {}
    if found["onnx"] is not None:
        files["ONNX model"] = (found["onnx"], sha256_file(found["onnx"]))
        files["sidecar"] = (found["info"], sha256_file(found["info"]))
    else:
        files["checkpoint"] = (found["info"], sha256_file(found["info"]))
    for name, entry in (info.get("files") or {}).items():  # the weights as checkpoint.json recorded them
        files[name] = (found["info"].parent / name, entry.get("sha256"))
    if info.get("weights_sha256"):  # an export's record of the weights it was made from
        files["weights exported"] = (info.get("weights_file", "weights"), info["weights_sha256"])
    if found["metrics"]:
        files["test metrics"] = (found["metrics"], sha256_file(found["metrics"]))
    export = info if found["onnx"] is not None else None
    return card_markdown(card, metrics, files, export)


def write_model_card(path: Path, out: Path, overwrite: bool = True) -> Path:
    """Write the card of ``path`` to ``out`` (refused if it exists, unless ``overwrite``)."""
    check_output_file(out, overwrite=overwrite, what="model card")
    text = model_card_text(path)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def card_beside_export(onnx: Path) -> Path:
    """``model.onnx`` -> ``model.onnx.card.md``, written next to every export."""
    onnx = Path(onnx)
    return write_model_card(onnx, onnx.with_name(onnx.name + CARD_SUFFIX))
