"""Flat heatmaps are measured and reported (issue 27): the check itself on hand-made maps, and /heatmap's
X-Map-Range / X-Flat-Map headers for a model whose linear-head CAM is zero everywhere for one label
(ReLU of a map that is negative at every location) and varies for another, from a checkpoint and its ONNX
export."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_export import LABELS, one_thread, tiny_checkpoint  # noqa: F401 (autouse)

from cxrlab.inference.overlay import FLAT_RANGE, is_flat, map_range

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")


def test_constant_map_is_flat_and_one_hot_spot_is_not():
    constant = np.full((64, 64), 0.7, np.float32)
    assert map_range(constant) == 0.0 and is_flat(constant)
    assert is_flat(np.zeros((64, 64), np.float32))  # what min-max scaling makes of a constant map
    spot = np.zeros((64, 64), np.float32)
    spot[40, 20] = 1.0
    assert map_range(spot) == 1.0 and not is_flat(spot)
    # the threshold is one colour step of the 256-colour jet map: just below is flat, just above is not
    ramp = np.linspace(0, 1, 64, dtype=np.float32)[None, :].repeat(64, axis=0)
    assert is_flat(ramp * (FLAT_RANGE * 0.9)) and not is_flat(ramp * (FLAT_RANGE * 1.1))


def test_variation_only_in_the_letterbox_padding_is_flat():
    """The padding is drawn uncoloured, so a spot there is no evidence: measured inside the image box."""
    spot = np.zeros((64, 64), np.float32)
    spot[2, 30] = 1.0  # in the top band
    box = (8, 0, 48, 64)  # top, left, height, width of the image inside the letterbox
    assert not is_flat(spot) and is_flat(spot, box) and map_range(spot, box) == 0.0
    spot[30, 30] = 0.5
    assert map_range(spot, box) == 0.5


def _zero_and_varying_labels(checkpoint, image) -> tuple[str, str]:
    """The premise, checked on the raw maps: one label whose CAM is 0 everywhere, one whose CAM varies."""
    from cxrlab.inference.heatmaps import native_maps
    from cxrlab.inference.predictor import Predictor
    from cxrlab.inference.uploads import decode_upload

    predictor = Predictor.load(checkpoint)
    backend = predictor.backend
    x = backend._input(decode_upload(image.read_bytes(), image.name, predictor.spec)[None])
    with torch.no_grad():
        fmap = backend.model.features(x)
        raw = native_maps(backend.model, fmap, backend.model.head(fmap))[0]
    spread = (raw.amax(dim=(1, 2)) - raw.amin(dim=(1, 2))).tolist()
    zero = [LABELS[j] for j in range(len(LABELS)) if float(raw[j].abs().max()) == 0.0]
    varying = [LABELS[j] for j in range(len(LABELS)) if spread[j] > 0.01]
    assert zero and varying, f"tiny model's raw CAM ranges {spread}: needs one zero and one varying label"
    return zero[0], varying[0]


@pytest.mark.parametrize("runtime", ["checkpoint", "onnx"])
def test_heatmap_reports_a_flat_map(runtime, tmp_path, shared_data):
    from test_server import running

    from cxrlab.inference.server import create_app

    image = shared_data / "nih" / "00000001_000.png"
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", "linear")
    flat_label, varying_label = _zero_and_varying_labels(checkpoint, image)
    model = checkpoint
    if runtime == "onnx":
        from cxrlab.inference.export import export_onnx

        model = tmp_path / "model.onnx"
        export_onnx(checkpoint, model, check=[image])
    with running(create_app(model, workers=1)) as url, httpx.Client(base_url=url, timeout=60) as client:
        def ask(label):
            response = client.post("/heatmap", files={"file": (image.name, image.read_bytes())},
                                   data={"label": label, "size": 128})
            assert response.status_code == 200, response.text
            return response.headers

        flat, varying = ask(flat_label), ask(varying_label)
        assert flat["x-flat-map"] == "true" and float(flat["x-map-range"]) == 0.0
        assert varying["x-flat-map"] == "false" and float(varying["x-map-range"]) > 0.99  # min-max scaled
        assert flat["x-label"] == flat_label  # the earlier headers are still there
        described = client.get("/openapi.json").json()["paths"]["/heatmap"]["post"]["responses"]["200"]
        assert "X-Flat-Map" in described["description"] and "X-Map-Range" in described["description"]
