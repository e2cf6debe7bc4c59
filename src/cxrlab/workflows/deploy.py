"""What the commands that use a trained model outside training do: ``export``, ``serve``, ``calibrate``,
``ensemble`` and ``prototypes``; each checks where its output goes before any work."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import CxrlabError
from .card import CARD_SUFFIX, card_beside_export, write_model_card
from ..paths import check_new_dir, check_output_file, removed_if_empty


def export(model: Path, out: Path, check=None, tolerance: float = 1e-4, overwrite: bool = True) -> dict:
    """``model.onnx`` + its sidecar + its model card page (``model.onnx.card.md``) from a checkpoint, refused
    (nothing written) unless ONNX Runtime matches PyTorch within ``tolerance``; returns the sidecar."""
    from ..inference.export import export_onnx  # lazy: torch and onnx, for this command only
    from ..inference.onnx_backend import sidecar_path

    check_output_file(out, overwrite=overwrite, what="ONNX file")
    check_output_file(sidecar_path(out), overwrite=overwrite, what="ONNX sidecar")
    check_output_file(Path(out).with_name(Path(out).name + CARD_SUFFIX), overwrite=overwrite, what="model card")
    sidecar = export_onnx(model, out, check=check, tolerance=tolerance)
    card_beside_export(out)
    return sidecar


def model_card(model: Path, out: Path, overwrite: bool = True) -> Path:
    """``cxrlab card``: the Markdown model card of a run, checkpoint or ONNX export (``workflows.card``)."""
    return write_model_card(model, out, overwrite=overwrite)


def serve(model: Path, token: str | None = None, **options) -> None:
    """Serve a checkpoint or an ONNX export over HTTP until interrupted (options: see ``server.serve``);
    without ``token``, the environment variable ``CXRLAB_TOKEN`` gives it (an empty one is no token)."""
    from ..inference.server import serve as run_server  # lazy: fastapi and uvicorn, for this command only

    if token is None:
        token = os.environ.get("CXRLAB_TOKEN") or None
    run_server(model, token=token, **options)


def calibrate(model: Path, data: str, out: Path, temperature: bool = False, method: str = "f1",
              policy: str | None = None, split: str = "all", holdout: str | None = None) -> dict:
    """A calibrated copy of ``model`` at ``out``; its record's ``before_after`` holds ECE and Brier before
    and after on the fitted data and, with ``holdout`` (a split of ``data`` or another source), there."""
    from ..inference.calibrate import calibrate as run_calibrate  # lazy: start-up time (torch)

    return run_calibrate(model, data, out, temperature=temperature, method=method, policy=policy, split=split,
                         holdout=holdout)


def before_after_lines(record: dict) -> list[str]:
    """``fitted data: mean ECE 0.081 -> 0.034, mean Brier 0.120 -> 0.112 (n=96, 10 equal-mass bins)``."""
    table = record.get("before_after") or {}
    lines = []
    for part in ("fitted", "holdout"):
        if part in table:
            b, a = table[part]["before"], table[part]["after"]
            where = "fitted data" if part == "fitted" else f"held-out {table[part]['source']}"
            num = (lambda x: "–" if x is None else f"{x:.3f}")
            lines.append(f"{where}: mean ECE {num(b['mean_ece'])} -> {num(a['mean_ece'])}, mean Brier "
                         f"{num(b['mean_brier'])} -> {num(a['mean_brier'])} (n={table[part]['n']}, "
                         f"{table['bins']} equal-mass bins)")
    return lines


def ensemble(checkpoints: list[Path], out: Path, weights: str | None = None,
             missing_thresholds: float | None = None) -> Path:
    """An ensemble folder of ``checkpoints``; ``weights``: comma-separated positive numbers, one each;
    ``missing_thresholds``: the threshold for a member that has none (else such a member is refused)."""
    from .ensemble import build_ensemble  # lazy: start-up time (torch)

    values = None
    if weights:
        try:
            values = [float(w) for w in weights.split(",")]
        except ValueError:
            raise CxrlabError(f"--weights {weights!r}: expected comma-separated numbers, e.g. 2,1") from None
    return build_ensemble(checkpoints, out, values, missing_thresholds)


def prototypes(model: Path, out: Path, overwrite: bool = True) -> dict:
    """The prototype report of ``model`` in the folder ``out``, checked first: not a file, not a folder
    holding files unless ``overwrite``, writable; a failed run leaves no empty folder."""
    from ..inference.prototypes import write_prototype_report  # lazy: start-up time (torch)

    check_new_dir(out, overwrite, "prototypes folder")
    with removed_if_empty(out):
        return write_prototype_report(model, out)
