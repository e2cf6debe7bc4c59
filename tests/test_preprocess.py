"""One image-to-input path: the real PNG, JPEG, DICOM and 16-bit fixtures reach the model as the same
uint8 pixels through every path (prepare's cache, checkpoint and ONNX predict, serve, evaluate,
calibrate, heatmap), so a checkpoint and its ONNX export agree to 1e-5, with a temperature and without."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_export import LABELS, one_thread, tiny_checkpoint  # noqa: F401 (autouse)

from cxrlab.data.preprocess import preprocess
from cxrlab.errors import CxrlabError
from cxrlab.inference.predictor import Predictor
from cxrlab.model_card import InputSpec

pytest.importorskip("onnxruntime")

REAL = ("nih/00000001_000.png", "covid/16747_3_1.jpg", "dicom/siim_pneumothorax_example.dcm",
        "dicom/monochrome1_example.dcm")


@pytest.fixture(scope="module")
def files(shared_data, tmp_path_factory):
    """The real fixtures and a 16-bit PNG of the real NIH film (a 16-bit radiograph as PACS exports it)."""
    nih = np.asarray(Image.open(shared_data / REAL[0]).convert("L"), dtype=np.uint16)
    sixteen = tmp_path_factory.mktemp("sixteen") / "nih_16bit.png"
    Image.fromarray(nih * 257 + np.uint16(100)).save(sixteen)
    assert Image.open(sixteen).mode.startswith("I")
    return [shared_data / f for f in REAL] + [sixteen]


@pytest.fixture(scope="module")
def models(tmp_path_factory, files):
    """{"plain" | "calibrated": (checkpoint, model.onnx)}: one random linear-head model at 64 px, and a
    copy with a per-label temperature, each exported."""
    from cxrlab.checkpoint import read_card, write_card
    from cxrlab.inference.export import export_onnx

    tmp = tmp_path_factory.mktemp("models")
    plain = tiny_checkpoint(tmp / "plain", "linear")
    warm = tiny_checkpoint(tmp / "calibrated", "linear")
    write_card(warm, read_card(warm).replace(temperature=(2.0, 0.7, 1.5)))
    out = {}
    for name, ckpt in (("plain", plain), ("calibrated", warm)):
        export_onnx(ckpt, tmp / f"{name}.onnx", check=files)
        out[name] = (ckpt, tmp / f"{name}.onnx")
    return out


@pytest.fixture()
def seen(monkeypatch):
    """Every uint8 batch a Predictor hands its backend (whatever the path that read the images)."""
    batches = []
    real = Predictor.predict_fitted

    def recording(self, fitted, batch_size=32):
        batches.append(np.array(fitted))
        return real(self, fitted, batch_size)

    monkeypatch.setattr(Predictor, "predict_fitted", recording)
    return batches


def same_images(found, expected) -> bool:
    """The same images, whatever the order and batching."""
    found = [im for batch in found for im in batch]
    return len(found) == len(expected) and all(any(np.array_equal(e, f) for f in found) for e in expected)


def labelled_csv(files, folder) -> str:
    table = pd.DataFrame({"path": [str(f) for f in files], "patient_id": [f"p{i}" for i in range(len(files))]})
    for j, name in enumerate(LABELS):
        table[name] = [(i + j) % 2 for i in range(len(files))]
    table.to_csv(folder / "labels.csv", index=False)
    return f"csv:{folder / 'labels.csv'}"


def test_every_path_feeds_the_model_the_same_pixels(files, models, seen, tmp_path):
    from fastapi.testclient import TestClient

    from cxrlab.data.cache import open_cache, prepare
    from cxrlab.data.sources import parse_source
    from cxrlab.inference.calibrate import calibrate
    from cxrlab.inference.server import create_app
    from cxrlab.workflows.evaluate import evaluate_checkpoint
    from cxrlab.workflows.heatmap import write_heatmaps
    from cxrlab.workflows.predict import predict_files

    ckpt, onnx = models["plain"]
    expected = [preprocess(InputSpec(64), f) for f in files]
    assert len({e.tobytes() for e in expected}) == len(files)  # five different inputs
    # the check can fail: a full decode then fit (what ONNX predict, serve and evaluate used to do)
    # gives other pixels for the JPEG and the JPEG-compressed DICOMs
    from cxrlab.data.images import read_image
    from cxrlab.data.preprocess import fit_image

    exact = [fit_image(read_image(f), 64) for f in files]
    assert [not np.array_equal(a, b) for a, b in zip(exact, expected)] == [False, True, True, True, False]
    source = labelled_csv(files, tmp_path)

    prepare(parse_source(source), tmp_path / "cache", size=64, workers=1, progress=False)
    assert same_images([open_cache(tmp_path / "cache")[0]], expected), "prepare"
    paths = {
        "checkpoint predict": lambda: predict_files(ckpt, files, tmp_path / "a.csv"),
        "ONNX predict": lambda: predict_files(onnx, files, tmp_path / "b.csv"),
        "evaluate": lambda: evaluate_checkpoint(ckpt, source, tmp_path / "eval"),
        "calibrate": lambda: calibrate(ckpt, source, tmp_path / "calibrated"),
        "heatmap": lambda: write_heatmaps(ckpt, files, tmp_path / "maps", top=1),
    }
    for name, run in paths.items():
        seen.clear()
        run()
        assert same_images(seen, expected), name
    for model in (ckpt, onnx):
        with TestClient(create_app(model, workers=1)) as client:
            seen.clear()
            uploads = [("files", (f.name, f.read_bytes())) for f in files]
            assert client.post("/predict", files=uploads).status_code == 200
            assert same_images(seen, expected), f"serve {model.name}"


@pytest.mark.parametrize("name", ["plain", "calibrated"])
def test_onnx_checkpoint_and_server_agree(files, models, tmp_path, name):
    from fastapi.testclient import TestClient

    from cxrlab.inference.server import create_app
    from cxrlab.workflows.predict import predict_files

    ckpt, onnx = models[name]
    by_torch = Predictor.from_checkpoint(ckpt, device="cpu")
    by_onnx = Predictor.from_onnx(onnx)
    a, b = by_torch.predict_paths(files, workers=0), by_onnx.predict_paths(files)
    assert np.abs(a - b).max() <= 1e-5
    np.testing.assert_allclose(by_torch.thresholds, by_onnx.thresholds, atol=1e-12)
    if name == "calibrated":  # the temperature is applied, to the probabilities and the thresholds alike
        raw = Predictor.from_checkpoint(ckpt, device="cpu", calibrated=False)
        assert np.abs(raw.predict_paths(files, workers=0) - a).max() > 1e-3
        assert not np.allclose(raw.thresholds, by_torch.thresholds)
    # the CSVs hold the same decisions and (to their 6 decimals) the same probabilities
    ours, theirs = predict_files(ckpt, files, tmp_path / "c.csv"), predict_files(onnx, files, tmp_path / "o.csv")
    pd.testing.assert_frame_equal(ours.drop(columns=list(LABELS)), theirs.drop(columns=list(LABELS)))
    assert np.abs(ours[list(LABELS)].to_numpy() - theirs[list(LABELS)].to_numpy()).max() <= 1e-5
    with TestClient(create_app(onnx, workers=1)) as client:
        body = client.post("/predict", files=[("files", (f.name, f.read_bytes())) for f in files]).json()
    served = np.array([[e["probability"] for e in r["labels"]] for r in body["results"]])
    assert np.abs(served - a).max() <= 1e-5


def test_an_unreadable_file_is_named_or_kept_as_its_row(files, models, tmp_path):
    """predict_paths (strict) names the file; the tolerant batch predictor gives the others their rows."""
    from cxrlab.inference.batch import predict_tolerant

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(files[1].read_bytes()[:2000])
    predictor = Predictor.from_onnx(models["plain"][1])
    with pytest.raises(CxrlabError, match="cannot read image .*broken.jpg"):
        predictor.predict_paths([files[0], broken])
    paths = [files[0], broken, files[2]]
    probs, failures = predict_tolerant(predictor, 3, lambda i: predictor.fit(paths[i]), batch_size=2)
    assert np.isnan(probs[1]).all() and not np.isnan(probs[[0, 2]]).any()
    assert failures[0] is None and failures[2] is None and "broken.jpg" in str(failures[1])
    np.testing.assert_allclose(probs[[0, 2]], predictor.predict_paths([files[0], files[2]]), atol=1e-7)


def test_preprocess_of_arrays_and_bad_input(files):
    spec = InputSpec(32, "crop")
    gray = np.linspace(0, 1, 40 * 60, dtype=np.float32).reshape(40, 60)
    assert preprocess(spec, gray).shape == (32, 32) and preprocess(spec, gray).dtype == np.uint8
    np.testing.assert_array_equal(preprocess(spec, gray), preprocess(spec, np.round(gray * 255).astype(np.uint8)))
    with pytest.raises(CxrlabError, match="2-D grey image"):
        preprocess(spec, np.zeros((4, 4, 3)))
    with pytest.raises(CxrlabError, match="image not found: .*nothing.png"):
        preprocess(spec, files[0].with_name("nothing.png"))
    with pytest.raises(CxrlabError, match="unknown resize mode 'pda'; did you mean 'pad'"):
        InputSpec(32, "pda")
    with pytest.raises(CxrlabError, match="unknown image decoder 'exact'"):
        InputSpec(32, decoder="exact")


def test_sidecar_and_checkpoint_hold_the_same_card(models):
    from cxrlab.checkpoint import read_card
    from cxrlab.inference.onnx_backend import read_sidecar

    ckpt, onnx = models["calibrated"]
    card, (_, exported) = read_card(ckpt), read_sidecar(onnx)
    assert exported.replace(versions={}) == card.replace(versions={})
    assert exported.temperature == (2.0, 0.7, 1.5) and exported.input.mean and exported.input.std
    assert json.loads(onnx.with_name(onnx.name + ".json").read_text())["thresholds"] == [0.3, 0.5, 0.6]
