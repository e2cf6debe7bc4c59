"""ONNX export: parity with eager PyTorch for every registered head on the real fixture images, the
ORT predict CSV equals the checkpoint one, corrupt files are named, the ONNX path imports no torch,
and heatmaps (native in numpy, Grad-CAM through grad-cam) are checked against hand computations."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from cxrlab.errors import CxrlabError
from cxrlab.registry import HEADS

pytest.importorskip("onnxruntime")

LABELS = ("Atelectasis", "Cardiomegaly", "Effusion")
FIXTURES = ("nih/00000001_000.png", "nih/00027426_000.png", "covid/16747_3_1.jpg",
            "dicom/siim_pneumothorax_example.dcm", "dicom/monochrome1_example.dcm")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tiny models run far faster on one torch thread (no waking of a second on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_checkpoint(folder: Path, head: str = "linear", size: int = 64, seed: int = 0,
                    thresholds=(0.3, 0.5, 0.6)) -> Path:
    """A checkpoint of a small random model for ``head`` (two backbones for heads that take several),
    with non-trivial BatchNorm statistics so that eval and train mode differ."""
    from cxrlab.checkpoint import module_tensors, save_checkpoint
    from cxrlab.config import from_dict
    from cxrlab.models import build_model
    from cxrlab.models.heads.base import Capability

    torch.manual_seed(seed)
    head_cls = HEADS.get(head)
    several = head_cls.takes_several_maps()
    params = inspect.signature(head_cls).parameters
    args = {k: v for k, v in {"dim": 32, "num_heads": 4}.items() if k in params}
    backbone = ["test_resnet", "test_resnet"] if several else "test_resnet"
    model_cfg = {"head": head, "head_args": args, **({"backbones": backbone} if several else {"backbone": backbone})}
    recipe = from_dict({"model": model_cfg, "loss": {"bce": 1.0}, "data": {"image_size": size}})
    model = build_model(backbone, head, len(LABELS), head_args=args)
    if Capability.LABEL_TEXT in model.head.capabilities:
        model.head.set_label_text(np.random.default_rng(seed).normal(size=(len(LABELS), 16)))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    info = {"recipe": recipe.to_dict(), "labels": list(LABELS), "thresholds": list(thresholds), "metrics": {},
            "epoch": 1, "step": 1, "ema": False, "trainer": {}}
    save_checkpoint(folder, module_tensors({"model": model.eval()}), {}, {}, info)
    return folder


@pytest.fixture(scope="module")
def fixtures(shared_data) -> list[Path]:
    return [shared_data / f for f in FIXTURES]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, fixtures):
    """Every registered head exported once: {head: (checkpoint, onnx path, sidecar)}."""
    from cxrlab.inference.export import export_onnx

    tmp = tmp_path_factory.mktemp("export")
    out = {}
    for head in HEADS.names():
        ckpt = tiny_checkpoint(tmp / f"ckpt_{head}", head)
        onnx_path = tmp / f"{head}.onnx"
        out[head] = (ckpt, onnx_path, export_onnx(ckpt, onnx_path, check=fixtures))
    return out


@pytest.mark.parametrize("head", HEADS.names())
def test_parity_every_head(exported, fixtures, head):
    from cxrlab.inference.predictor import Predictor

    ckpt, onnx_path, sidecar = exported[head]
    parity = sidecar["parity"]
    assert parity["n"] == len(fixtures) and parity["batch_sizes"] == [1, len(fixtures)]
    assert 0 <= parity["max_abs_diff"] <= 1e-4
    # independently of the export's own check: the ORT predictor against the checkpoint predictor
    ort_probs = Predictor.from_onnx(onnx_path).predict_paths(fixtures)
    torch_probs = Predictor.from_checkpoint(ckpt, device="cpu").predict_paths(fixtures, workers=0)
    assert ort_probs.shape == (len(fixtures), len(LABELS))
    np.testing.assert_allclose(ort_probs, torch_probs, atol=1e-4, rtol=0)
    assert np.ptp(ort_probs, axis=0).max() > 1e-4  # the images give different answers (not a constant)


def test_sidecar_describes_the_model(exported):
    from cxrlab.serialization import sha256_file

    ckpt, onnx_path, sidecar = exported["lcl"]
    on_disk = json.loads((onnx_path.parent / "lcl.onnx.json").read_text())
    assert on_disk == sidecar
    assert sidecar["labels"] == list(LABELS) and sidecar["thresholds"] == [0.3, 0.5, 0.6]
    assert "validation" in sidecar["threshold_source"]
    assert sidecar["input"]["size"] == 64 and sidecar["input"]["resize"] == "pad"
    assert sidecar["input"]["decoder"] == "draft2" and sidecar["head"] == "lcl"
    assert sidecar["model_sha256"] == sha256_file(onnx_path)
    ckpt_info = json.loads((ckpt / "checkpoint.json").read_text())
    assert sidecar["weights_sha256"] == ckpt_info["files"]["model.safetensors"]["sha256"]
    assert sidecar["input"]["std"][0] > 0 and len(sidecar["input"]["mean"]) == len(sidecar["backbones"]) == 1
    assert "dynamo=False" in sidecar["exporter"]
    assert set(sidecar["outputs"]) == {"probabilities", "logits", "maps"}


def test_dynamic_batch_axis(exported):
    import onnx
    import onnxruntime as ort

    _, onnx_path, _ = exported["label_query"]
    graph = onnx.load(str(onnx_path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((5, 1, 64, 64), dtype=np.float32)
    whole = session.run(["probabilities"], {"image": x})[0]
    one_by_one = np.concatenate([session.run(["probabilities"], {"image": x[i:i + 1]})[0] for i in range(5)])
    np.testing.assert_allclose(whole, one_by_one, atol=1e-6)


def test_failed_parity_writes_nothing(tmp_path, fixtures, monkeypatch):
    import cxrlab.inference.export as export

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    measured = export._parity
    # the runtimes made to disagree by 1e-3 (a tolerance <= 0 is refused before any work)
    monkeypatch.setattr(export, "_parity", lambda *a: {**measured(*a), "max_abs_diff": 1e-3})
    with pytest.raises(CxrlabError, match="parity check.*1.00e-03.*nothing was written"):
        export.export_onnx(ckpt, tmp_path / "m.onnx", check=fixtures[:2], tolerance=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_mha_fast_path_off_while_exporting():
    from cxrlab.inference.export import _no_mha_fastpath

    before = torch.backends.mha.get_fastpath_enabled()
    with _no_mha_fastpath():
        assert torch.backends.mha.get_fastpath_enabled() is False
    assert torch.backends.mha.get_fastpath_enabled() == before


def test_temperature_divides_logits_in_the_graph(tmp_path, fixtures):
    from cxrlab.checkpoint import read_info
    from cxrlab.inference.export import export_onnx
    from cxrlab.inference.predictor import Predictor

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    plain = export_onnx(ckpt, tmp_path / "plain.onnx", check=fixtures[:2])
    info = read_info(ckpt)
    info["temperature"] = [2.0, 1.0, 0.5]
    (ckpt / "checkpoint.json").write_text(json.dumps(info))
    warm = export_onnx(ckpt, tmp_path / "warm.onnx", check=fixtures[:2])
    assert plain["temperature"] is None and warm["temperature"] == [2.0, 1.0, 0.5]
    fitted = Predictor.from_onnx(tmp_path / "plain.onnx").fit(np.random.default_rng(1).random((80, 70)))[None]
    a = Predictor.from_onnx(tmp_path / "plain.onnx").backend.outputs(fitted)["logits"]
    b = Predictor.from_onnx(tmp_path / "warm.onnx").backend.outputs(fitted)["logits"]
    np.testing.assert_allclose(b, a / np.array([2.0, 1.0, 0.5]), rtol=1e-5, atol=1e-6)


def test_onnx_predict_csv_equals_checkpoint_csv(exported, fixtures, tmp_path):
    from cxrlab.workflows.predict import predict_files

    ckpt, onnx_path, _ = exported["linear"]
    broken = tmp_path / "broken.png"
    broken.write_bytes(fixtures[0].read_bytes()[:300])
    inputs = [*fixtures, broken]
    predict_files(ckpt, inputs, tmp_path / "ckpt.csv")
    predict_files(onnx_path, inputs, tmp_path / "onnx.csv")
    a, b = pd.read_csv(tmp_path / "ckpt.csv"), pd.read_csv(tmp_path / "onnx.csv")
    assert list(a.columns) == list(b.columns)
    assert list(a.columns)[:1 + 2 * len(LABELS)] == ["path", *LABELS, *(f"{n}_positive" for n in LABELS)]
    assert a["path"].tolist() == b["path"].tolist()
    pd.testing.assert_frame_equal(a.drop(columns=list(LABELS)), b.drop(columns=list(LABELS)))  # decisions, errors
    assert b[list(LABELS)].iloc[-1].isna().all()  # the unreadable image: blank, its reason given
    a, b = a.iloc[:-1], b.iloc[:-1]
    np.testing.assert_allclose(a[list(LABELS)].to_numpy(), b[list(LABELS)].to_numpy(), atol=1e-4, rtol=0)


_BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Block())
from cxrlab.inference.predictor import Predictor
from cxrlab.workflows.predict import predict_files
table = predict_files(sys.argv[1], sys.argv[2:], sys.argv[1] + ".csv")
p = Predictor.load(sys.argv[1])
probs, maps = p.heatmaps(p.fit(sys.argv[2]), [0, 1, 2])
assert maps.shape == (3, 64, 64) and 0 <= maps.min() and maps.max() <= 1
print(len(table), "torch" in sys.modules)
"""


def test_onnx_path_imports_no_torch(exported, fixtures):
    _, onnx_path, _ = exported["lcl"]
    done = subprocess.run([sys.executable, "-c", _BLOCK_TORCH, str(onnx_path), *map(str, fixtures)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(len(fixtures)), "False"]


def _flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_corrupt_or_mismatched_files_are_named(exported, tmp_path):
    import shutil

    from cxrlab.inference.predictor import Predictor

    _, onnx_path, _ = exported["linear"]
    model = tmp_path / "m.onnx"
    side = tmp_path / "m.onnx.json"

    def fresh():
        shutil.copy(onnx_path, model)
        shutil.copy(onnx_path.parent / "linear.onnx.json", side)

    fresh()
    _flip_byte(model, model.stat().st_size // 2)
    with pytest.raises(CxrlabError, match=r"m\.onnx does not match its sidecar"):
        Predictor.from_onnx(model)
    fresh()
    side.write_text(side.read_text()[:50])
    with pytest.raises(CxrlabError, match=r"m\.onnx\.json is corrupt"):
        Predictor.from_onnx(model)
    fresh()
    side.unlink()
    with pytest.raises(CxrlabError, match=r"sidecar missing: .*m\.onnx\.json"):
        Predictor.from_onnx(model)
    fresh()
    meta = json.loads(side.read_text())
    model.write_bytes(b"not an onnx model")  # a corrupt model whose sidecar was made to match
    meta["model_sha256"] = __import__("hashlib").sha256(b"not an onnx model").hexdigest()
    side.write_text(json.dumps(meta))
    with pytest.raises(CxrlabError, match=r"cannot load ONNX model .*m\.onnx"):
        Predictor.from_onnx(model)


@pytest.mark.parametrize("head", ["linear", "lcl", "label_query"])
def test_native_heatmaps_numpy_equal_torch(exported, fixtures, head):
    from cxrlab.inference.heatmaps import label_heatmaps
    from cxrlab.inference.predictor import Predictor

    ckpt, onnx_path, _ = exported[head]
    ort_predictor = Predictor.from_onnx(onnx_path)
    fitted = ort_predictor.fit(fixtures[0])
    probs, maps = ort_predictor.heatmaps(fitted, range(len(LABELS)))
    model = Predictor.from_checkpoint(ckpt, device="cpu").model
    t_probs, t_maps = label_heatmaps(model, torch.from_numpy(fitted).float().div(255)[None, None])
    np.testing.assert_allclose(probs, t_probs[0], atol=1e-4)
    np.testing.assert_allclose(maps, t_maps[0], atol=1e-4)


def test_resize_maps_matches_torch_bilinear():
    from cxrlab.inference.overlay import resize_maps

    maps = np.random.default_rng(0).random((2, 3, 4, 5)).astype(np.float32)
    ours = resize_maps(maps, (13, 16))
    theirs = F.interpolate(torch.from_numpy(maps), size=(13, 16), mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_gradcam_of_linear_head_is_normalised_cam_without_bias(tmp_path):
    """For GAP + linear, the Grad-CAM weights are w_c / (h·w): the map is relu(w_c · F) min-max scaled,
    upsampled, and scaled again (grad-cam rescales after resizing)."""
    from cxrlab.inference.heatmaps import gradcam_maps
    from cxrlab.inference.overlay import normalise_maps, resize_maps
    from cxrlab.inference.predictor import Predictor

    model = Predictor.from_checkpoint(tiny_checkpoint(tmp_path / "c", size=128), device="cpu").model
    x = torch.rand(2, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    cams = gradcam_maps(model, x, [0, 2])
    with torch.no_grad():
        fmap = model.features(x)  # 2×96×4×4
        w = model.head.fc.weight
        raw = torch.relu(torch.stack([torch.einsum("d,dhw->hw", w[j], fmap[i]) for i, j in enumerate([0, 2])]))
    expected = normalise_maps(resize_maps(normalise_maps(raw.numpy()), (128, 128)))
    assert cams.shape == (2, 128, 128)
    np.testing.assert_allclose(cams, expected, atol=2e-3)


@pytest.mark.parametrize("head", HEADS.names())
def test_gradcam_every_head(exported, head):
    from cxrlab.inference.heatmaps import gradcam_maps
    from cxrlab.inference.predictor import Predictor

    model = Predictor.from_checkpoint(exported[head][0], device="cpu").model
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    cams = gradcam_maps(model, x, [1, 2], "gradcampp" if head == "linear" else "gradcam")
    assert cams.shape == (2, 64, 64) and np.isfinite(cams).all()
    assert cams.min() >= 0 and cams.max() <= 1 + 1e-6
    assert not model.training


_CLI_WITHOUT_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Block())
from cxrlab.cli import main
sys.exit(main(["predict", *sys.argv[1:]]))
"""


def test_cli_export_then_predict_onnx_without_torch(tmp_path, fixtures):
    from cxrlab.cli import main

    ckpt = tiny_checkpoint(tmp_path / "ckpt", "label_query")
    assert main(["export", str(ckpt), "--out", str(tmp_path / "m.onnx"), "--check", *map(str, fixtures[:2])]) == 0
    assert json.loads((tmp_path / "m.onnx.json").read_text())["parity"]["n"] == 2
    done = subprocess.run([sys.executable, "-c", _CLI_WITHOUT_TORCH, str(tmp_path / "m.onnx"), str(fixtures[0]),
                           "--out", str(tmp_path / "p.csv")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(tmp_path / "p.csv")
    assert table["path"].tolist() == [str(fixtures[0])] and table[list(LABELS)].notna().all().all()
    # a failed parity check is an error message naming the checkpoint, and no file
    assert main(["export", str(ckpt), "--out", str(tmp_path / "n.onnx"), "--tolerance", "-1"]) == 2
    assert not (tmp_path / "n.onnx").exists()
    # an existing export is replaced only with --overwrite
    before = (tmp_path / "m.onnx").read_bytes()
    assert main(["export", str(ckpt), "--out", str(tmp_path / "m.onnx")]) == 2
    assert (tmp_path / "m.onnx").read_bytes() == before
    assert main(["export", str(ckpt), "--out", str(tmp_path / "m.onnx"), "--overwrite"]) == 0
    assert json.loads((tmp_path / "m.onnx.json").read_text())["parity"]["n"] == 8


def test_write_heatmaps_methods(exported, fixtures, tmp_path):
    from PIL import Image

    from cxrlab.workflows.heatmap import write_heatmaps

    ckpt = exported["prototype"][0]  # a head without native maps: Grad-CAM still works
    written = write_heatmaps(ckpt, fixtures[:1], tmp_path, labels=["Effusion"], method="gradcam")
    assert [p.name for p in written] == ["00000001_000_Effusion_gradcam.png"]
    assert Image.open(written[0]).size[0] > 100
    with pytest.raises(CxrlabError, match="no spatial maps"):
        write_heatmaps(ckpt, fixtures[:1], tmp_path, labels=["Effusion"])
    with pytest.raises(CxrlabError, match="unknown heatmap method 'gradcam\\+\\+'"):
        write_heatmaps(ckpt, fixtures[:1], tmp_path, method="gradcam++")


def test_ensemble_export(exported, fixtures, tmp_path):
    from cxrlab.workflows.ensemble import build_ensemble
    from cxrlab.inference.export import export_onnx
    from cxrlab.inference.heatmaps import label_heatmaps
    from cxrlab.inference.predictor import Predictor

    folder = build_ensemble([exported["linear"][0], exported["lcl"][0]], tmp_path / "ens", weights=[1, 3])
    sidecar = export_onnx(folder, tmp_path / "ens.onnx", check=fixtures)
    assert sidecar["parity"]["max_abs_diff"] <= 1e-4 and sidecar["head"] == "ensemble"
    assert len(sidecar["members"]) == 2 and set(sidecar["outputs"]) == {"probabilities", "logits", "maps"}
    predictor = Predictor.from_checkpoint(folder, device="cpu")
    ours = Predictor.from_onnx(tmp_path / "ens.onnx")
    np.testing.assert_allclose(ours.predict_paths(fixtures), predictor.predict_paths(fixtures, workers=0), atol=1e-5)
    fitted = ours.fit(fixtures[2])
    probs, maps = ours.heatmaps(fitted, range(len(LABELS)))
    t_probs, t_maps = label_heatmaps(predictor.model, torch.from_numpy(fitted).float().div(255)[None, None])
    np.testing.assert_allclose(probs, t_probs[0], atol=1e-4)
    np.testing.assert_allclose(maps, t_maps[0], atol=1e-4)
