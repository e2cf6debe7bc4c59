"""train.loggers: csv / tensorboard / mlflow. MLflow is read back from a file store in tmp_path (no server)."""
from __future__ import annotations

import builtins
import csv
import json

import pytest

import cxrlab
from cxrlab.config import load_recipe
from cxrlab.errors import CxrlabError
from cxrlab.workflows.experiment import check_parts

from test_trainer import Interrupt, StopAt, toy_recipe, toy_run

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402


@pytest.fixture(autouse=True)
def file_store(monkeypatch):
    # unset: cxrlab turns MLflow 3's file store on for a file: URI itself (setenv records the value to restore)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


def tracked(tmp_path, **train):
    return toy_recipe(loggers=["csv", "mlflow"], mlflow={"tracking_uri": f"file:{tmp_path / 'mlruns'}",
                                                         "experiment": "toy"}, **train)


def the_run(tmp_path, out="run"):
    state = json.loads((tmp_path / out / "mlflow.json").read_text())
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    return client, client.get_run(state["run_id"])


def test_mlflow_run_holds_params_and_every_epoch(tmp_path):
    recipe = tracked(tmp_path, epochs=3)
    _, result, _ = toy_run(tmp_path, recipe, n_train=48, n_val=32)
    client, run = the_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "toy"
    params = run.data.params
    assert params["optim.lr"] == "0.003" and params["loss.bce"] == "1.0" and params["model.backbone"] == "test_resnet"
    assert params["train.loggers"] == '["csv", "mlflow"]'
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    for key in ("val_macro_auc", "val_loss", "train_loss", "lr"):
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2, 3], key
        assert [m.value for m in history] == pytest.approx([float(r[key]) for r in rows]), key
    assert "epoch" not in run.data.metrics and "step" not in run.data.metrics


def test_resume_continues_the_same_mlflow_run(tmp_path):
    recipe = tracked(tmp_path, epochs=3)
    with pytest.raises(Interrupt):  # dies in epoch 2, after epoch 1's checkpoint
        toy_run(tmp_path, recipe, n_train=32, n_val=16, regime=StopAt(2 + 1))
    client, run = the_run(tmp_path)
    first_id = run.info.run_id
    assert run.info.status == "FAILED"
    toy_run(tmp_path, recipe, n_train=32, n_val=16, resume=True)
    client, run = the_run(tmp_path)
    assert run.info.run_id == first_id and run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    steps = [m.step for m in client.get_metric_history(first_id, "val_loss")]
    assert sorted(steps) == [1, 2, 3]


def test_loggers_without_csv_write_no_log_csv(tmp_path):
    toy_run(tmp_path, toy_recipe(epochs=1, loggers=["mlflow"],
                                 mlflow={"tracking_uri": f"file:{tmp_path / 'mlruns'}"}), n_train=16, n_val=16)
    assert not (tmp_path / "run" / "log.csv").exists()
    client, run = the_run(tmp_path)
    assert client.get_experiment(run.info.experiment_id).name == "recipe"  # the recipe's name by default
    assert run.info.run_name == "run"


def test_train_logs_test_metrics_and_the_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default tracking URI file:./mlruns lands here
    result = cxrlab.train("demo", tmp_path / "run", **{
        "data.source": "synthetic:120", "data.image_size": 32, "data.cache_dir": str(tmp_path / "cache"),
        "model.backbone": "test_resnet", "train.epochs": 1, "eval.bootstrap": 0, "eval.subgroups": [],
        "train.loggers": ["csv", "mlflow"]})
    state = json.loads((tmp_path / "run" / "mlflow.json").read_text())
    assert state["tracking_uri"] == f"file:{tmp_path.resolve() / 'mlruns'}"
    client, run = the_run(tmp_path)
    metrics = json.loads((tmp_path / "run" / "report" / "metrics.json").read_text())
    assert run.data.metrics["test/macro_auc"] == pytest.approx(metrics["macro_auc"])
    assert run.data.metrics["test/map"] == pytest.approx(metrics["map"])
    assert result.metrics["macro_auc"] == pytest.approx(metrics["macro_auc"])
    report = {f.path for f in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/report.md", "report/metrics.json", "report/test_predictions.csv"} <= report
    assert "log.csv" in {f.path for f in client.list_artifacts(run.info.run_id)}
    assert run.data.params["data.source"] == "synthetic:120"


def test_bad_logger_names_and_keys_are_refused():
    with pytest.raises(CxrlabError, match="unknown logger in train.loggers 'mlfow'; did you mean 'mlflow'"):
        check_parts(load_recipe("demo", ["train.loggers=[csv,mlfow]"]))
    with pytest.raises(CxrlabError, match="unknown train.mlflow key 'uri'"):
        check_parts(load_recipe("demo", ["train.loggers=[mlflow]", "train.mlflow={uri: x}"]))
    with pytest.raises(CxrlabError, match="train.loggers does not name mlflow"):
        check_parts(load_recipe("demo", ["train.mlflow={experiment: x}"]))


def test_mlflow_missing_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError("No module named 'mlflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.raises(CxrlabError, match=r"^train.loggers names mlflow, which is not installed: "
                                          r"pip install 'cxrlab\[track\]'$"):
        check_parts(load_recipe("demo", ["train.loggers=[csv,mlflow]"]))
