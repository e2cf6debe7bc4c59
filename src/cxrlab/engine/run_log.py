"""What a run logs besides its checkpoints: ``log.csv`` (one row per epoch, rewritten whole and
renamed into place) and TensorBoard scalars when TensorBoard is installed; rank 0 only."""
from __future__ import annotations

import csv
import os


def open_tensorboard(trainer):
    """A TensorBoard writer into ``out_dir/tensorboard`` on rank 0; None elsewhere or without TensorBoard."""
    if not trainer.dist.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: CSV only
        return None
    return SummaryWriter(str(trainer.out_dir / "tensorboard"))


def write_log(trainer, row: dict, writer) -> None:
    """Rewrite ``log.csv`` from the trainer's history; ``row`` (the last epoch) to TensorBoard too."""
    rows = [public(r) for r in trainer.history]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    trainer.out_dir.mkdir(parents=True, exist_ok=True)
    tmp = trainer.out_dir / ".log.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, trainer.out_dir / "log.csv")
    if writer is not None:
        for k, v in public(row).items():
            if isinstance(v, (int, float)) and k not in ("epoch", "step") and v is not None:
                writer.add_scalar(k.replace("_", "/", 1), v, row["epoch"])
        writer.flush()


def public(row: dict | None) -> dict | None:
    return None if row is None else {k: v for k, v in row.items() if not k.startswith("_")}

