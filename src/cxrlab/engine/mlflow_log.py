"""The ``mlflow`` logger of ``train.loggers``: one MLflow run per training run, holding the recipe as
params (flattened: ``optim.lr``, ``loss.bce``, ...), every epoch's numbers as metrics (step = epoch), the
test metrics (``test/macro_auc``, ``test/auc/Edema``, ...) and the report folder and ``log.csv`` as artifacts.

``train.mlflow: {tracking_uri, experiment, run_name}`` says where; unset, the tracking URI is
``$MLFLOW_TRACKING_URI`` or ``file:./mlruns``, the experiment ``$MLFLOW_EXPERIMENT_NAME`` or the recipe's
name, the run name the run folder's. The run's id is kept in ``<run folder>/mlflow.json``, so ``--resume``
continues the same MLflow run. Only MLflow's client is used (``mlflow-skinny``, extra ``cxrlab[track]``):
a ``file:`` store or a tracking server (``http(s)://``); a ``sqlite:`` store needs the full ``mlflow``.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

from ..errors import CxrlabError, unknown
from ..serialization import to_jsonable

STATE_FILE = "mlflow.json"
KEYS = ("tracking_uri", "experiment", "run_name")
_BAD_CHARS = re.compile(r"[^\w\-. :/]")  # what MLflow accepts in a metric or param name
_MAX_PARAM = 6000  # MLflow's longest param value
_INSTALL = "pip install 'cxrlab[track]'"


def check(cfg) -> None:
    """``train.mlflow`` holds only known keys, and MLflow is installed."""
    if not isinstance(cfg, dict):
        raise CxrlabError(f"train.mlflow must be a mapping with keys {', '.join(KEYS)}, got {cfg!r}")
    for key in cfg:
        if key not in KEYS:
            raise unknown("train.mlflow key", str(key), KEYS)
    _client_class()


def _client_class():
    try:
        from mlflow.tracking import MlflowClient  # lazy: optional dependency (extra track)
    except ImportError:
        raise CxrlabError(f"train.loggers names mlflow, which is not installed: {_INSTALL}") from None
    return MlflowClient


def _client(uri: str):
    if uri.startswith("file:"):
        # MLflow 3 keeps its file store in maintenance mode behind this switch; a file: URI asks for it
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return _client_class()(tracking_uri=uri)


def tracking_uri(cfg: dict) -> str:
    """The configured URI with a relative ``file:`` path made absolute (the run may resume elsewhere)."""
    uri = cfg.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or "file:./mlruns"
    if "://" not in uri and not uri.startswith("file:"):  # a plain folder is a file store
        uri = "file:" + uri
    if uri.startswith("file:") and not uri.startswith("file://"):
        uri = "file:" + str(Path(uri[len("file:"):]).expanduser().resolve())
    return uri


def name(key: str) -> str:
    return _BAD_CHARS.sub("_", key)


def flatten(value, prefix: str = "", sep: str = ".") -> dict:
    """Nested dicts as ``{a.b.c: leaf}``; lists stay leaves."""
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{sep}{k}" if prefix else str(k), sep))
        return out
    return {prefix: value}


class MlflowLog:
    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def open(cls, trainer) -> "MlflowLog":
        """A new MLflow run, or (a resumed training run) the one ``mlflow.json`` names."""
        cfg = dict(trainer.cfg.mlflow)
        uri = tracking_uri(cfg)
        client = _client(uri)
        state_file = trainer.out_dir / STATE_FILE
        state = _read_state(state_file)
        if trainer.epoch > 0 and state and state.get("tracking_uri") == uri:
            client.update_run(state["run_id"], status="RUNNING")
            return cls(client, state["run_id"])
        recipe = trainer.recipe
        experiment = cfg.get("experiment") or os.environ.get("MLFLOW_EXPERIMENT_NAME") or recipe.name
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
        run = client.create_run(experiment_id, run_name=cfg.get("run_name") or trainer.out_dir.resolve().name,
                                tags={"cxrlab.recipe": recipe.name, "cxrlab.run_folder": str(trainer.out_dir.resolve())})
        run_id = run.info.run_id
        params = flatten(to_jsonable(recipe.to_dict()))
        params = [(name(k), json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in params.items()]
        _log_batch(client, run_id, params=[(k, v[:_MAX_PARAM]) for k, v in params])
        trainer.out_dir.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({"tracking_uri": uri, "experiment_id": experiment_id, "run_id": run_id}))
        return cls(client, run_id)

    def epoch(self, trainer, row: dict) -> None:
        numbers = {k: v for k, v in row.items() if not k.startswith("_") and k not in ("epoch", "step")
                   and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        _log_batch(self.client, self.run_id, metrics=[(name(k), v, int(row["epoch"])) for k, v in numbers.items()])

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def finish(out_dir: Path, metrics: dict, report_dir: Path) -> None:
    """Add a finished run's test metrics (numbers of metrics.json, ``test/...``), its report folder and
    ``log.csv`` to the MLflow run its training logged to."""
    state = _read_state(out_dir / STATE_FILE)
    if not state:
        return
    client = _client(state["tracking_uri"])
    numbers = {f"test/{k}": v for k, v in flatten(to_jsonable(metrics), sep="/").items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    _log_batch(client, state["run_id"], metrics=[(name(k), float(v), 0) for k, v in numbers.items()])
    if report_dir.is_dir():
        client.log_artifacts(state["run_id"], str(report_dir), "report")
    if (out_dir / "log.csv").is_file():
        client.log_artifact(state["run_id"], str(out_dir / "log.csv"))


def _read_state(path: Path) -> dict | None:
    try:
        state = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return state if isinstance(state, dict) and {"tracking_uri", "run_id"} <= set(state) else None


def _log_batch(client, run_id: str, params=(), metrics=()) -> None:
    from mlflow.entities import Metric, Param  # lazy: optional dependency (extra track)

    now = int(time.time() * 1000)
    params = [Param(k, v) for k, v in params]
    metrics = [Metric(k, float(v), now, step) for k, v, step in metrics]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[i:i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
