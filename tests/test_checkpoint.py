"""Checkpoints: safetensors + JSON only, model rebuilt from JSON, corrupt files named, exact state."""
from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from test_trainer import LABELS, ToySet, toy_recipe, toy_run

from cxrlab import checkpoint as ckpt
from cxrlab.engine.trainer import make_loader
from cxrlab.errors import CxrlabError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    trainer, result, _ = toy_run(tmp, toy_recipe(epochs=2, ema=0.8), n_train=48, n_val=24)
    return trainer, result, tmp / "run"


def test_layout_and_json(run):
    _, result, run_dir = run
    for name in ("last", "best"):
        folder = run_dir / name
        assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.json", "model.safetensors",
                                                            "state.safetensors"]
        info = json.loads((folder / "checkpoint.json").read_text())
        assert info["format"] == "cxrlab-checkpoint" and info["version"] == 1
        assert info["labels"] == list(LABELS) and info["thresholds"] is None
        assert info["recipe"]["model"]["backbone"] == "test_resnet"
        assert {"epoch", "step", "metrics", "ema", "files", "trainer"} <= set(info)
        for file in ("model.safetensors", "state.safetensors"):
            raw = (folder / file).read_bytes()
            (header_len,) = struct.unpack("<Q", raw[:8])
            assert raw[8:9] == b"{" and 8 + header_len < len(raw) == info["files"][file]["bytes"]
    last = json.loads((run_dir / "last" / "checkpoint.json").read_text())
    assert last["epoch"] == 2 and last["step"] == 2 * (48 // 16)
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".") and p.is_dir()]  # no temp folders
    from safetensors import safe_open

    with safe_open(str(run_dir / "last" / "state.safetensors"), "pt") as f:
        keys = list(f.keys())
        structure = json.loads(f.metadata()["structure"])
    assert any(k.startswith("optim.") for k in keys) and any(k.startswith("ema.") for k in keys)
    assert any(k.startswith("rng.0.torch") for k in keys) and "ema_rng" in keys
    assert {"optimizer", "scheduler"} <= set(structure)


def test_load_model_matches_trainer_predictions(run):
    trainer, result, run_dir = run
    model, info = ckpt.load_model(run_dir)  # a run folder resolves to best/
    assert info["epoch"] == result.best_epoch
    loader = make_loader(ToySet(24, 2), 8, shuffle=False)
    probs, _, _ = trainer.predict(loader)  # the trainer predicts with its EMA weights
    with torch.no_grad():
        mine = torch.cat([torch.sigmoid(model(b["image"].float() / 255).logits) for b in loader]).numpy()
    np.testing.assert_allclose(mine, probs, atol=1e-6)
    raw, _ = ckpt.load_model(run_dir / "best", ema=False)
    ema_sd, raw_sd = model.state_dict(), raw.state_dict()
    assert any(not torch.equal(ema_sd[k], raw_sd[k]) for k in ema_sd)


def test_set_thresholds(run, tmp_path):
    _, _, run_dir = run
    folder = tmp_path / "best"
    shutil.copytree(run_dir / "best", folder)
    ckpt.set_thresholds(folder, [0.2, 0.5, 0.7])
    _, info = ckpt.load_model(folder)
    assert info["thresholds"] == [0.2, 0.5, 0.7]
    with pytest.raises(CxrlabError, match="thresholds"):
        ckpt.set_thresholds(folder, [0.5])


@pytest.mark.parametrize("file", ["model.safetensors", "state.safetensors", "checkpoint.json"])
@pytest.mark.parametrize("checksums", [True, False])
def test_truncated_file_is_named(run, tmp_path, file, checksums):
    _, _, run_dir = run
    folder = tmp_path / "best"
    shutil.copytree(run_dir / "best", folder)
    if not checksums:  # the safetensors reader alone must also refuse a truncated file
        info = json.loads((folder / "checkpoint.json").read_text())
        info.pop("files")
        (folder / "checkpoint.json").write_text(json.dumps(info))
    raw = (folder / file).read_bytes()
    (folder / file).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CxrlabError, match=file.replace(".", r"\.")):
        ckpt.load_model(folder, ema=file == "state.safetensors")  # the file that holds the weights


def test_flipped_byte_is_caught(run, tmp_path):
    _, _, run_dir = run
    folder = tmp_path / "best"
    shutil.copytree(run_dir / "best", folder)
    raw = bytearray((folder / "state.safetensors").read_bytes())
    raw[-5] ^= 0xFF
    (folder / "state.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CxrlabError, match="state.safetensors.*corrupt"):
        ckpt.load_model(folder)


def test_resume_from_corrupt_state_is_named(tmp_path):
    recipe = toy_recipe(epochs=2)
    toy_run(tmp_path, toy_recipe(epochs=1), n_train=32, n_val=16)
    state = tmp_path / "run" / "last" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CxrlabError, match="state.safetensors"):
        toy_run(tmp_path, recipe, n_train=32, n_val=16, resume=True)


def test_missing_and_foreign(tmp_path):
    with pytest.raises(CxrlabError, match="not found"):
        ckpt.load_model(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "checkpoint.json").write_text('{"format": "other"}')
    with pytest.raises(CxrlabError, match="not a cxrlab checkpoint"):
        ckpt.load_model(tmp_path / "x")


def test_crash_between_renames_still_resumable(run, tmp_path):
    _, _, run_dir = run
    shutil.copytree(run_dir / "last", tmp_path / ".last.old")  # `last` moved aside, new one not yet in
    assert ckpt.latest(tmp_path) == tmp_path / ".last.old"
    assert ckpt.find_checkpoint(tmp_path) == tmp_path / ".last.old"


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizer_state_roundtrip(name):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = (torch.optim.AdamW(net.parameters(), lr=0.1, betas=(0.8, 0.95)) if name == "adamw"
           else torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True))
    for _ in range(3):
        net(torch.randn(5, 3)).sum().backward()
        opt.step()
    tensors, structure = ckpt.flatten_optimizer(opt.state_dict())
    structure = ckpt._decode(json.loads(json.dumps(ckpt._encode(structure))))
    back = ckpt.unflatten_optimizer(tensors, structure)
    fresh = type(opt)(net.parameters(), lr=1.0)
    fresh.load_state_dict(back)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for idx in a["state"]:
        for key, value in a["state"][idx].items():
            assert torch.equal(value, b["state"][idx][key]), (idx, key)


def test_rng_roundtrip():
    random.random(), np.random.normal(), torch.rand(1)  # leave a cached gaussian in numpy's state
    saved = ckpt.capture_rng()
    assert all(t.dtype == torch.uint8 for t in saved.values())
    expected = (random.random(), random.gauss(0, 1), np.random.normal(), np.random.rand(), torch.rand(3))
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    ckpt.restore_rng(saved)
    got = (random.random(), random.gauss(0, 1), np.random.normal(), np.random.rand(), torch.rand(3))
    assert got[:4] == expected[:4] and torch.equal(got[4], expected[4])


def test_no_pickle_anywhere():
    src = Path(ckpt.__file__).parent
    for name in ("checkpoint.py", "engine/trainer.py", "engine/distributed.py"):
        text = (src / name).read_text()
        assert "torch.load(" not in text and "import pickle" not in text, name
