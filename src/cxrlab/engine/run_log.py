"""What a run logs besides its checkpoints, through the loggers ``train.loggers`` names (rank 0 only):

- ``csv``: ``log.csv``, one row per epoch, rewritten whole and renamed into place;
- ``tensorboard``: scalars under ``tensorboard/`` when TensorBoard is installed (skipped otherwise, as
  it is in the default list);
- ``mlflow``: an MLflow run (``engine/mlflow_log.py``; extra ``cxrlab[track]``).

A logger has ``epoch(trainer, row)`` and ``close(failed)``; ``finish_run`` adds a finished run's test
metrics and report to the loggers that keep them (MLflow).
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from ..errors import CxrlabError, unknown
from . import mlflow_log

log = logging.getLogger(__name__)

LOGGERS = ("csv", "tensorboard", "mlflow")


def check_loggers(train_cfg) -> None:
    """Refuse an unknown logger name, and MLflow when it is not installed, before any data is read."""
    names = train_cfg.loggers
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise CxrlabError(f"train.loggers must be a list of logger names ({', '.join(LOGGERS)}), got {names!r}")
    for name in names:
        if name not in LOGGERS:
            raise unknown("logger in train.loggers", name, LOGGERS)
    if "mlflow" in names:
        mlflow_log.check(train_cfg.mlflow)
    elif train_cfg.mlflow:
        raise CxrlabError("train.mlflow is set but train.loggers does not name mlflow; add it, e.g. "
                          "train.loggers=[csv,mlflow]")


def open_loggers(trainer) -> list:
    """The loggers of ``train.loggers`` for this run (none on ranks other than 0)."""
    if not trainer.dist.is_main:
        return []
    check_loggers(trainer.cfg)
    loggers = []
    for name in dict.fromkeys(trainer.cfg.loggers):
        if name == "csv":
            loggers.append(CsvLog())
        elif name == "tensorboard":
            board = TensorBoardLog.open(trainer.out_dir)
            if board is not None:
                loggers.append(board)
        else:
            loggers.append(mlflow_log.MlflowLog.open(trainer))
    return loggers


def close_loggers(loggers: list, failed: bool) -> None:
    for logger in loggers:
        logger.close(failed)


def finish_run(recipe, out_dir: Path, metrics: dict, report_dir: Path) -> None:
    """After the report is written: a run's test metrics and its report folder to MLflow when logged there."""
    if "mlflow" in recipe.train.loggers:
        mlflow_log.finish(Path(out_dir), metrics, Path(report_dir))


class CsvLog:
    """``log.csv`` from the trainer's whole history (so a resumed run's file holds every epoch)."""

    def epoch(self, trainer, row: dict) -> None:
        rows = [public(r) for r in trainer.history]
        columns = list(dict.fromkeys(k for r in rows for k in r))
        trainer.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = trainer.out_dir / ".log.csv.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, trainer.out_dir / "log.csv")

    def close(self, failed: bool) -> None:
        pass


class TensorBoardLog:
    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, out_dir: Path) -> "TensorBoardLog | None":
        try:
            from torch.utils.tensorboard import SummaryWriter  # lazy: optional dependency (tensorboard)
        except Exception:  # tensorboard not installed: the other loggers only
            log.debug("tensorboard is not installed: no tensorboard/ log")
            return None
        return cls(SummaryWriter(str(Path(out_dir) / "tensorboard")))

    def epoch(self, trainer, row: dict) -> None:
        for k, v in scalars(row).items():
            self.writer.add_scalar(k.replace("_", "/", 1), v, row["epoch"])
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


def scalars(row: dict) -> dict:
    """The numbers of an epoch's row worth a curve (not the epoch and step counters themselves)."""
    return {k: float(v) for k, v in public(row).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step")}


def public(row: dict | None) -> dict | None:
    return None if row is None else {k: v for k, v in row.items() if not k.startswith("_")}
