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


def test_checkpoint_holds_a_model_card(run):
    """What inference needs is in the card, from the recipe and the weights, not left in the recipe."""
    trainer, result, run_dir = run
    card = ckpt.read_card(run_dir)
    recipe = json.loads((run_dir / "best" / "checkpoint.json").read_text())["recipe"]
    assert card.labels == tuple(LABELS) and card.thresholds is None and "0.5" in card.threshold_source
    assert (card.input.size, card.input.resize, card.input.decoder) == (recipe["data"]["image_size"],
                                                                         recipe["data"]["resize"], "draft2")
    backbone = trainer.model.backbone
    assert card.input.mean == (pytest.approx(float(backbone.input_mean)),)
    assert card.input.std == (pytest.approx(float(backbone.input_std)),)
    assert card.backbones == ("test_resnet",) and card.head == recipe["model"]["head"]
    assert card.training.recipe == recipe["name"] and card.training.epochs == result.best_epoch
    assert card.training.policy == recipe["data"]["policy"] and card.training.metrics
    assert set(card.versions) == {"cxrlab", "torch"}


def test_a_checkpoint_json_from_before_the_card_still_loads(run, tmp_path):
    """The old layout (recipe, labels, thresholds, no card fields) is read into the same card, and the
    predictor built from it gives the same probabilities."""
    from cxrlab.inference.predictor import Predictor
    from cxrlab.model_card import CARD_KEYS

    _, _, run_dir = run
    old = tmp_path / "old"
    shutil.copytree(run_dir / "best", old)
    ckpt.set_thresholds(old, [0.2, 0.5, 0.7])
    new_card = ckpt.read_card(old)
    info = json.loads((old / "checkpoint.json").read_text())
    info = {k: v for k, v in info.items() if k not in CARD_KEYS or k in ("labels", "thresholds")}
    assert "input" not in info and "recipe" in info
    (old / "checkpoint.json").write_text(json.dumps(info))
    card = ckpt.read_card(old)
    assert card.input == new_card.input.__class__(new_card.input.size, new_card.input.resize)  # no mean/std kept
    assert card.thresholds == (0.2, 0.5, 0.7) and card.labels == new_card.labels
    assert (card.head, card.backbones, card.training.policy) == (new_card.head, new_card.backbones,
                                                                  new_card.training.policy)
    images = [np.random.default_rng(0).random((40, 50)) for _ in range(3)]
    np.testing.assert_array_equal(Predictor.from_checkpoint(old, device="cpu").predict(images),
                                  Predictor.from_checkpoint(run_dir / "best", device="cpu").predict(images))
    with pytest.raises(CxrlabError, match="checkpoint.json lacks 'input'"):
        from cxrlab.model_card import card_from_json

        card_from_json({"labels": ["a"]}, "checkpoint.json")


def test_card_codec_old_sidecar_and_temperature():
    """A version-1 sidecar stored thresholds on the temperature-scaled scale: the codec unscales them, so
    the decisions (``output_thresholds``) are the ones it made; a card round-trips through JSON."""
    from cxrlab.model_card import card_from_json, card_to_json, scaled_thresholds

    v1 = {"format": "cxrlab-onnx", "version": 1, "labels": ["a", "b"], "thresholds": [0.3, 0.8],
          "temperature": [2.0, 0.5], "image_size": 64, "resize": "crop", "head": "lcl",
          "normalisation": [{"backbone": "x", "mean": 0.4, "std": 0.2, "where": "inside the graph"}],
          "threshold_source": {"site": "A"}, "cxrlab_version": "0.1.0"}
    card = card_from_json(v1, "m.onnx.json")
    np.testing.assert_allclose(card.output_thresholds(), [0.3, 0.8], atol=1e-12)
    np.testing.assert_allclose(scaled_thresholds(card.thresholds, card.temperature), [0.3, 0.8], atol=1e-12)
    assert card.thresholds[0] < 0.3 and card.thresholds[1] < 0.8  # logit(t) * T: 2× further from 0.5, or half
    assert (card.input.size, card.input.resize, card.input.mean, card.input.std) == (64, "crop", (0.4,), (0.2,))
    assert card.threshold_source == '{"site": "A"}' and card.versions == {"cxrlab": "0.1.0"}
    assert card_from_json(json.loads(json.dumps(card_to_json(card))), "again") == card
    with pytest.raises(CxrlabError, match="m.onnx.json: model card: 1 thresholds for 2 labels"):
        card_from_json({**v1, "thresholds": [0.5]}, "m.onnx.json")


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
