"""The HTTP service against a real uvicorn server on a loopback port: every endpoint's happy path and
each bad input (oversized body, not an image, undecodable image, decompression bomb, unknown label,
full pool, timeout), for an ONNX export and for a checkpoint; a model that fails to load stops the start."""
from __future__ import annotations

import io
import json
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
from test_export import LABELS, one_thread, tiny_checkpoint  # noqa: F401 (autouse)

from cxrlab.errors import CxrlabError

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app):
    """A real uvicorn server for ``app`` on a free loopback port, in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, shared_data):
    from cxrlab.inference.export import export_onnx

    tmp = tmp_path_factory.mktemp("serve")
    ckpt = tiny_checkpoint(tmp / "ckpt", "lcl")
    export_onnx(ckpt, tmp / "model.onnx", check=[shared_data / "nih" / "00000001_000.png"])
    return ckpt, tmp / "model.onnx"


@pytest.fixture(scope="module")
def onnx_server(model_files, tmp_path_factory):
    from cxrlab.inference.server import create_app

    uploads = tmp_path_factory.mktemp("uploads")
    app = create_app(model_files[1], workers=2, queue=2, max_upload_bytes=3 * 2**20, max_pixels=20_000_000,
                     tmp_dir=uploads)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client, uploads


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width``×``height`` and holds almost no data (a decompression-bomb shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_predict_one_and_several(onnx_server, shared_data, model_files):
    from cxrlab.inference.predictor import Predictor

    client, _ = onnx_server
    files = [shared_data / "nih" / "00000001_000.png", shared_data / "covid" / "16747_3_1.jpg",
             shared_data / "dicom" / "siim_pneumothorax_example.dcm"]
    # content types and names say nothing: the server goes by content
    response = client.post("/predict", files=[("files", (f.name, f.read_bytes(), "application/octet-stream"))
                                               for f in files])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["format"] == "onnx" and body["model"]["sha256"]
    assert [r["file"] for r in body["results"]] == [f.name for f in files]
    expected = Predictor.from_onnx(model_files[1]).predict_paths(files)
    for result, probs in zip(body["results"], expected):
        assert [e["label"] for e in result["labels"]] == list(LABELS)
        got = np.array([e["probability"] for e in result["labels"]])
        np.testing.assert_allclose(got, probs, atol=1e-6)
        thresholds = np.array([e["threshold"] for e in result["labels"]])
        np.testing.assert_allclose(thresholds, [0.3, 0.5, 0.6])
        assert [e["positive"] for e in result["labels"]] == list(got >= thresholds)
    assert "not a medical device" in body["disclaimer"]


def test_one_unreadable_file_among_several_gets_its_error(onnx_server, shared_data):
    """The tolerant batch predictor of `cxrlab predict`: the readable files are answered, the other
    carries its reason (by the name it was uploaded under) and no probabilities."""
    client, _ = onnx_server
    data = (shared_data / "nih" / "00000001_000.png").read_bytes()
    response = client.post("/predict", files=[("files", ("a.png", data)), ("files", ("cut.png", data[:200])),
                                              ("files", ("b.png", data))])
    assert response.status_code == 200, response.text
    a, cut, b = response.json()["results"]
    assert a["error"] is None and b["error"] is None and a["labels"] == b["labels"]
    assert cut["labels"] is None and "cut.png" in cut["error"] and "upload-" not in cut["error"]


def test_untrained_labels_are_null(onnx_server, shared_data):
    client, _ = onnx_server
    data = (shared_data / "nih" / "00000001_000.png").read_bytes()
    body = client.post("/predict", params={"labels": "Effusion,Hernia"}, files={"files": ("a.png", data)}).json()
    effusion, hernia = body["results"][0]["labels"]
    assert effusion["label"] == "Effusion" and effusion["trained"] and 0 < effusion["probability"] < 1
    assert hernia == {"label": "Hernia", "probability": None, "threshold": None, "positive": None, "trained": False}


def test_heatmap_png(onnx_server, shared_data):
    from PIL import Image

    client, _ = onnx_server
    data = (shared_data / "dicom" / "siim_pneumothorax_example.dcm").read_bytes()
    response = client.post("/heatmap", files={"file": ("x.dcm", data)}, data={"label": "Cardiomegaly"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-label"] == "Cardiomegaly" and 0 < float(response.headers["x-probability"]) < 1
    image = Image.open(io.BytesIO(response.content))
    assert image.size == (64, 64) and image.mode == "RGB"
    assert np.asarray(image).std() > 1  # a picture, not a blank


def test_labels_health_version_docs(onnx_server):
    client, _ = onnx_server
    labels = client.get("/labels").json()
    assert [x["label"] for x in labels["labels"]] == list(LABELS)
    assert [x["threshold"] for x in labels["labels"]] == [0.3, 0.5, 0.6]
    assert "validation" in labels["threshold_source"] and labels["heatmap_methods"] == ["native"]
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ready"
    version = client.get("/version").json()
    assert version["runtime"].startswith("onnxruntime") and version["cxrlab"]
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/heatmap", "/labels", "/health", "/version"} <= set(schema["paths"])
    docs = client.get("/docs")  # the API reference, drawn from the schema, with nothing from a CDN
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    for path in schema["paths"]:
        assert f"</span> {path}</h2>" in docs.text
    assert "<script" not in docs.text and "cdn" not in docs.text.lower()
    assert "<code>files</code>" in docs.text and "multipart/form-data" in docs.text  # /predict upload field
    assert client.get("/redoc").status_code == 404
    page = client.get("/")
    assert page.status_code == 200 and "not a medical device" in page.text
    assert "http" not in client.get("/static/app.js").text.replace("http-equiv", "")  # nothing from a CDN


def test_oversized_body_is_413(onnx_server):
    client, _ = onnx_server
    big = b"\x89PNG\r\n\x1a\n" + bytes(4 * 2**20)
    response = client.post("/predict", files={"files": ("big.png", big)})
    assert response.status_code == 413 and "exceeds the limit" in response.json()["detail"]

    def chunks():  # no Content-Length: the middleware counts the streamed bytes
        for _ in range(8):
            yield bytes(2**19)

    response = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413
    assert client.get("/health").status_code == 200  # and the server is still up


def test_not_an_image_is_415(onnx_server):
    client, _ = onnx_server
    response = client.post("/predict", files={"files": ("scan.png", b"hello, this is text", "image/png")})
    assert response.status_code == 415
    assert "scan.png: not a PNG, JPEG or DICOM" in response.json()["detail"]


def test_undecodable_image_is_422(onnx_server, shared_data):
    client, _ = onnx_server
    data = (shared_data / "nih" / "00000001_000.png").read_bytes()
    response = client.post("/predict", files={"files": ("cut.png", data[: len(data) // 2])})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "cut.png" in detail and "upload-" not in detail  # the user's name, not the temporary path


def test_decompression_bomb_refused_before_decoding(onnx_server):
    client, _ = onnx_server
    response = client.post("/predict", files={"files": ("bomb.png", png_header_only(6_000, 6_000))})
    assert response.status_code == 422  # over this server's limit (20 MP)
    assert "6000×6000" in response.json()["detail"] and "decompression bomb" in response.json()["detail"]
    response = client.post("/predict", files={"files": ("huge.png", png_header_only(60_000, 60_000))})
    assert response.status_code == 422  # over Pillow's own limit, which it checks when opening
    assert "huge.png" in response.json()["detail"] and "decompression bomb" in response.json()["detail"]


def test_unknown_label_and_method_are_422(onnx_server, shared_data):
    client, _ = onnx_server
    data = (shared_data / "nih" / "00000001_000.png").read_bytes()
    response = client.post("/heatmap", files={"file": ("a.png", data)}, data={"label": "Cardiomegally"})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "did you mean 'Cardiomegaly'" in detail and "Atelectasis, Cardiomegaly, Effusion" in detail
    response = client.post("/heatmap", files={"file": ("a.png", data)}, data={"label": "Effusion", "method": "gradcam"})
    assert response.status_code == 422 and "available: native" in response.json()["detail"]
    assert client.post("/predict").status_code == 422  # no file at all


def test_uploads_leave_no_file_behind(onnx_server, shared_data):
    client, uploads = onnx_server
    data = (shared_data / "nih" / "00000001_000.png").read_bytes()
    assert client.post("/predict", files={"files": ("a.png", data)}).status_code == 200
    assert client.post("/predict", files={"files": ("b.png", data[:100])}).status_code == 422
    assert list(uploads.iterdir()) == []


def test_full_pool_is_503_and_slow_is_504(model_files, shared_data):
    from cxrlab.inference.server import create_app

    data = (shared_data / "nih" / "00000001_000.png").read_bytes()
    app = create_app(model_files[1], workers=1, queue=0, timeout=0.8, delay=0.5)
    with running(app) as url:
        def post(_):
            with httpx.Client(base_url=url, timeout=30) as c:
                return c.post("/predict", files={"files": ("a.png", data)}).status_code

        with ThreadPoolExecutor(4) as ex:
            codes = sorted(ex.map(post, range(4)))
        assert codes.count(200) >= 1 and codes.count(503) >= 1 and set(codes) <= {200, 503}
    app = create_app(model_files[1], workers=1, queue=0, timeout=0.2, delay=0.5)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        response = c.post("/predict", files={"files": ("a.png", data)})
        assert response.status_code == 504 and "longer than 0.2 s" in response.json()["detail"]
        time.sleep(0.5)  # the slow job ends and frees its slot
        assert c.get("/health").json()["in_flight"] == 0


def test_checkpoint_backend_with_gradcam(model_files, shared_data):
    from cxrlab.inference.server import create_app

    data = (shared_data / "nih" / "00027426_000.png").read_bytes()
    with running(create_app(model_files[0], workers=1)) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/labels").json()["heatmap_methods"] == ["native", "gradcam", "gradcampp"]
        assert c.get("/version").json()["runtime"].startswith("torch")
        body = c.post("/predict", files={"files": ("a.png", data)}).json()
        assert len(body["results"][0]["labels"]) == len(LABELS)
        for method in ("native", "gradcam", "gradcampp"):
            response = c.post("/heatmap", files={"file": ("a.png", data)}, data={"label": "Effusion", "method": method})
            assert response.status_code == 200 and response.headers["x-method"] == method


def test_bad_model_refuses_to_start(model_files, tmp_path):
    import shutil

    from cxrlab.inference.server import create_app

    model = tmp_path / "model.onnx"
    shutil.copy(model_files[1], model)
    shutil.copy(model_files[1].with_name("model.onnx.json"), tmp_path / "model.onnx.json")
    raw = bytearray(model.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    model.write_bytes(bytes(raw))
    with pytest.raises(CxrlabError, match=r"model\.onnx does not match its sidecar"):
        create_app(model)
    (tmp_path / "model.onnx.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CxrlabError, match=r"model\.onnx\.json is not a cxrlab ONNX sidecar"):
        create_app(model)
    with pytest.raises(CxrlabError, match="checkpoint not found"):
        create_app(tmp_path / "missing_checkpoint")


def test_cli_serve_defaults_and_refusal(model_files, tmp_path, capsys):
    import shutil

    from cxrlab.cli import build_parser, main

    args = build_parser().parse_args(["serve", "model.onnx"])
    assert (args.host, args.port, args.workers, args.max_upload_mb) == ("127.0.0.1", 8000, 2, 50.0)
    model = tmp_path / "model.onnx"
    shutil.copy(model_files[1], model)  # no sidecar beside it
    assert main(["serve", str(model), "--port", str(free_port())]) == 2
    assert f"ONNX sidecar missing: {model}.json" in capsys.readouterr().err


def test_ensemble_checkpoint_backend(tmp_path, shared_data):
    from cxrlab.workflows.ensemble import build_ensemble
    from cxrlab.inference.predictor import Predictor
    from cxrlab.inference.server import load_backend

    members = [tiny_checkpoint(tmp_path / "a", "linear"), tiny_checkpoint(tmp_path / "b", "prototype", seed=1)]
    folder = build_ensemble(members, tmp_path / "ens")
    backend = load_backend(folder, threads=1)
    assert backend.identity["head"] == "ensemble"
    assert backend.methods == ("gradcam", "gradcampp")  # the prototype member has no native maps
    fitted = backend.fit(shared_data / "nih" / "00000001_000.png")
    np.testing.assert_allclose(backend.predict_fitted(fitted[None]),
                               Predictor.from_checkpoint(folder, device="cpu").predict_fitted(fitted[None]), atol=1e-6)
    probs, cam = backend.heatmaps(fitted, [1], "gradcam")
    assert cam.shape == (1, 64, 64) and 0 <= cam.min() and cam.max() <= 1 + 1e-6


def test_a_failing_request_does_not_take_the_server_down(model_files, shared_data):
    from cxrlab.inference.server import create_app

    data = (shared_data / "nih" / "00000001_000.png").read_bytes()
    app = create_app(model_files[1], workers=1)
    backend = app.app_state.backend
    real, calls = backend.predict_fitted, []

    def flaky(fitted, batch_size=32):
        calls.append(1)
        if len(calls) == 2:  # the first request after the start's warm-up inference
            raise RuntimeError("simulated failure inside inference")
        return real(fitted, batch_size)

    backend.predict_fitted = flaky
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        first = c.post("/predict", files={"files": ("a.png", data)})
        assert first.status_code == 500 and "simulated failure" in first.json()["detail"]
        assert c.post("/predict", files={"files": ("a.png", data)}).status_code == 200
        assert c.get("/health").json() == {"status": "ready", "in_flight": 0, "capacity": 9}


# ---------------------------------------------------------------- issue 27: the page's endpoints, schema, no torch

def test_preview_is_the_model_preprocessing_at_a_readable_size(onnx_server, shared_data):
    """/preview renders the upload through the one preprocessing path at `size` px (a DICOM too)."""
    from PIL import Image

    from cxrlab.data.preprocess import preprocess
    from cxrlab.model_card import InputSpec

    client, _ = onnx_server
    for path in (shared_data / "dicom" / "siim_pneumothorax_example.dcm", shared_data / "covid" / "16747_3_1.jpg"):
        response = client.post("/preview", files={"file": (path.name, path.read_bytes())}, data={"size": "256"})
        assert response.status_code == 200 and response.headers["content-type"] == "image/png", response.text
        picture = np.asarray(Image.open(io.BytesIO(response.content)))
        np.testing.assert_array_equal(picture, preprocess(InputSpec(256, "pad"), path))
    response = client.post("/preview", files={"file": ("a.png", b"not an image")})
    assert response.status_code == 415 and response.json()["detail"].startswith("a.png: not a PNG")
    response = client.post("/preview", files={"file": ("a.jpg", b"x")}, data={"size": "5000"})
    assert response.status_code == 422 and "size must be 64 to 1024 pixels, got 5000" in response.json()["detail"]


def test_heatmap_at_display_size_leaves_the_letterbox_uncoloured(onnx_server, shared_data):
    """The 1036×885 JPEG fills rows 18..236 of a 256² fit (219 = round(885·256/1036), top = (256-219)//2):
    those rows carry colour, the padding above and below stays grey (black, as the model saw it)."""
    from PIL import Image

    client, _ = onnx_server
    data = (shared_data / "covid" / "16747_3_1.jpg").read_bytes()
    response = client.post("/heatmap", files={"file": ("c.jpg", data)}, data={"label": "Effusion", "size": "256"})
    assert response.status_code == 200, response.text
    rgb = np.asarray(Image.open(io.BytesIO(response.content))).astype(int)
    assert rgb.shape == (256, 256, 3)
    colour = np.abs(rgb[..., 0] - rgb[..., 2]) + np.abs(rgb[..., 1] - rgb[..., 2])
    assert colour[:18].max() == 0 and colour[237:].max() == 0 and rgb[:18].max() == 0
    assert (colour[18:237] > 0).mean() > 0.9


def test_predict_takes_a_single_file_field_and_says_which_field(onnx_server, shared_data):
    client, _ = onnx_server
    data = (shared_data / "nih" / "00000001_000.png").read_bytes()
    single = client.post("/predict", files={"file": ("one.png", data)})
    several = client.post("/predict", files={"files": ("one.png", data)})
    assert single.status_code == 200 and single.json()["results"] == several.json()["results"]
    wrong = client.post("/predict", files={"image": ("one.png", data)})
    assert wrong.status_code == 422
    assert wrong.json()["detail"] == "no file uploaded: send the image(s) as the multipart field 'files' (or one as 'file')"


def test_openapi_lists_every_answer_with_its_meaning(onnx_server):
    client, _ = onnx_server
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/predict", "/heatmap", "/preview"):
        responses = paths[path]["post"]["responses"]
        assert {"200", "413", "415", "422", "500", "503", "504"} <= set(responses), path
        assert "before parsing" in responses["413"]["description"]
        assert "content" in responses["415"]["description"] and "busy" in responses["503"]["description"]
    assert "loading" in paths["/health"]["get"]["responses"]["503"]["description"]
    ref = paths["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    body = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert {"files", "file"} <= set(body["properties"]) and not body.get("required")
    docs = client.get("/docs").text
    assert "<b>413</b> request body over the upload limit" in docs and "<b>504</b> inference took longer" in docs
    assert "<code>file</code>" in docs and "<code>size</code>" in docs


def test_version_provenance_and_favicon(onnx_server, model_files):
    client, _ = onnx_server
    sidecar = json.loads(model_files[1].with_name("model.onnx.json").read_text())
    origin = client.get("/version").json()["provenance"]
    assert origin["source"] == sidecar["training"]["source"] and origin["source"].startswith("synthetic:")
    assert origin["data_kind"] == "synthetic" and origin["dataset"] == "synthetic radiographs"
    assert origin["date"] == time.strftime("%Y-%m-%d", time.gmtime()) and origin["date_from"] == "card"
    assert origin["model_sha256"] == sidecar["model_sha256"]
    assert origin["summary"].startswith(f"trained on synthetic radiographs ({origin['source']})")
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert icon.text.startswith("<svg")


def test_provenance_of_real_data_and_of_an_old_card(tmp_path):
    """A real source reads 'real'; a card without a date takes the model file's date, and says so."""
    import os

    from cxrlab.inference.provenance import data_kind, provenance
    from cxrlab.model_card import InputSpec, ModelCard, Training

    assert [data_kind(s) for s in ("nih:/data/x", "csv:a.csv", "synthetic:300", "", "odd")] == \
        ["real", "real", "synthetic", "unknown", "unknown"]
    model = tmp_path / "model.onnx"
    model.write_bytes(b"x")
    os.utime(model, (86400 * 365, 86400 * 365))  # 1971-01-01
    card = ModelCard(labels=("A",), input=InputSpec(64), training=Training(recipe="nih_bce", source="nih:/data/x"))
    origin = provenance(card, {"format": "onnx", "sha256": "ab" * 32}, model)
    assert (origin["data_kind"], origin["date"], origin["date_from"]) == ("real", "1971-01-01", "file")
    assert origin["summary"] == ("trained on NIH ChestX-ray14 (nih:/data/x) · recipe nih_bce · file dated 1971-01-01 · "
                                 "model abababababab")


NO_TORCH = """
import sys
class Block:  # torch, torchvision and timm cannot be imported, as on a `pip install 'cxrlab[serve]'` box
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm"):
            raise ImportError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from fastapi.testclient import TestClient
from cxrlab.inference.server import create_app
model, image = sys.argv[1], open(sys.argv[2], "rb").read()
with TestClient(create_app(model, workers=1, threads=1)) as client:
    assert client.get("/health").json()["status"] == "ready"
    body = client.post("/predict", files={"files": ("a.png", image)}).json()
    assert body["results"][0]["error"] is None, body
    heat = client.post("/heatmap", files={"file": ("a.png", image)}, data={"label": "Effusion", "size": "128"})
    assert heat.status_code == 200, heat.text
    assert client.post("/preview", files={"file": ("a.png", image)}).status_code == 200
    assert client.get("/version").json()["provenance"]["data_kind"] == "synthetic"
from cxrlab.cli import main
work = sys.argv[3]
assert main(["predict", model, sys.argv[2], "--out", work + "/p.csv"]) == 0  # the command line's ONNX path too
assert main(["train", "demo", "--out", work + "/run"]) == 2  # a torch command: one line naming the extra
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "timm")))
"""


def test_serving_an_onnx_model_imports_no_torch(model_files, shared_data, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "serve_without_torch.py"
    script.write_text(NO_TORCH)
    done = subprocess.run([sys.executable, str(script), str(model_files[1]), str(shared_data / "nih" / "00000001_000.png"),
                           str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                            "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "p.csv").read_text().count("\n") == 2  # header + the image
    assert ("cxrlab: error: this command needs PyTorch, which is not installed (torch): pip install 'cxrlab[train]'"
            in done.stderr), done.stderr
