"""The lines a training run starts with (``train``, each run of ``cv`` and ``compare``, the demo): which
recipe from where, the data, the split in images / patients / studies, the model's size, the device and
precision, the threads and loader workers, and where the run goes. Said on the ``cxrlab`` logger (the
command line shows it on stderr), so a log file shows what ran before the first epoch ends."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..progress import plural

log = logging.getLogger("cxrlab.run")


def run_header(recipe, data, parts: dict, model: torch.nn.Module, device: torch.device,
               amp_dtype: torch.dtype | None, out_dir: Path, world_size: int = 1,
               fold: tuple[int, int] | None = None) -> list[str]:
    """The header's lines (see the module docstring); ``parts``: split part name -> rows of ``data.index``."""
    d, m, t = recipe.data, recipe.model, recipe.train
    run = f", run r{fold[0]}f{fold[1]}" if fold is not None else ""
    origin = getattr(recipe, "origin", None)  # set by config.load_recipe
    lines = [f"recipe  {recipe.name}{run}" + (f" ({origin})" if origin else "")]
    lines.append(f"data    {d.source}: {len(data.index):,} images at {d.image_size} px ({d.resize}), "
                 f"{plural(len(data.labels), 'label')}, policy {d.policy}")
    split = str(d.split) if fold is None else "cross-validation fold"
    lines.append(f"split   {split}: "
                 + "; ".join(f"{name} {_counts(data.index, rows)}" for name, rows in parts.items()))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    backbones = ", ".join(b if isinstance(b, str) else b.get("name", "?") for b in m.backbones) if m.backbones \
        else m.backbone
    lines.append(f"model   {backbones} + {m.head} head: {_millions(total)} parameters"
                 + (f" ({_millions(trainable)} trainable)" if trainable != total else ""))
    precision = "float32" if amp_dtype is None else f"autocast {str(amp_dtype).removeprefix('torch.')}"
    workers = "images loaded in the main process" if d.num_workers == 0 else f"{plural(d.num_workers, 'loader worker')}"
    ranks = f", {plural(world_size, 'process', 'processes')} (DDP)" if world_size > 1 else ""
    lines.append(f"device  {device}, {precision} (train.amp={t.amp}); {plural(torch.get_num_threads(), 'thread')}, "
                 f"{workers}{ranks}; batch {t.batch_size}, {plural(t.epochs, 'epoch')}")
    lines.append(f"out     {out_dir}")
    return lines


def say_header(lines: list[str]) -> None:
    for line in lines:
        log.info("%s", line)


def _counts(index, rows: np.ndarray) -> str:
    """``1,200 images / 310 patients / 800 studies`` (patients and studies where the source has them)."""
    part = index.iloc[rows]
    text = plural(len(part), "image")
    for column, word, words in (("patient_id", "patient", None), ("study_id", "study", "studies")):
        if column in part.columns:
            text += f" / {plural(int(part[column].nunique()), word, words)}"
    return text


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"
