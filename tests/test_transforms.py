"""Batch augmentation: shapes and range, identities, elastic deformation, per-sample randomness,
reproducibility and spec validation."""
from __future__ import annotations

import pytest
import torch

from cxrlab.data.transforms import build_augment, parse_spec
from cxrlab.errors import CxrlabError


def chest_batch(b: int = 8, size: int = 32) -> torch.Tensor:
    """Identical structured images (a bright disc and a gradient), so any difference is augmentation."""
    t = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(t, t, indexing="ij")
    image = 0.3 + 0.3 * (x + 1) / 2 + 0.3 * ((x - 0.3) ** 2 + y ** 2 < 0.1).float()
    return image.expand(b, 1, size, size).clone()


@pytest.mark.parametrize("name", ["none", "weak", "strong"])
def test_shape_dtype_and_range_are_kept(name):
    torch.manual_seed(0)
    batch = chest_batch()
    out = build_augment(name)(batch)
    assert out.shape == batch.shape and out.dtype == batch.dtype
    assert out.min() >= 0 and out.max() <= 1
    half = build_augment(name)(batch.half())
    assert half.dtype == torch.float16


def test_none_is_identity():
    batch = chest_batch()
    for spec in (None, "none", {"name": "none"}):
        assert torch.equal(build_augment(spec)(batch), batch)


def test_elastic_with_zero_alpha_is_identity():
    batch = chest_batch()
    assert torch.equal(build_augment({"name": "none", "elastic": 1.0, "elastic_alpha": 0})(batch), batch)
    torch.manual_seed(0)  # the resampling path itself, with a vanishing displacement, reproduces the image
    tiny = build_augment({"name": "none", "elastic": 1.0, "elastic_alpha": 1e-6})(batch)
    torch.testing.assert_close(tiny, batch, atol=1e-4, rtol=0)


def test_elastic_deforms_but_keeps_mean_intensity():
    torch.manual_seed(0)
    batch = chest_batch(16, 48)
    out = build_augment({"name": "none", "elastic": 1.0, "elastic_alpha": 40, "elastic_sigma": 4})(batch)
    moved = (out - batch).abs().mean(dim=(1, 2, 3))
    assert (moved > 1e-3).all()
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6))     # away from the zero-padded border
    torch.testing.assert_close(out[inner].mean(), batch[inner].mean(), atol=0.01, rtol=0)


def test_elastic_probability_is_per_sample():
    torch.manual_seed(1)
    batch = chest_batch(64)
    out = build_augment({"name": "none", "elastic": 0.5, "elastic_alpha": 40})(batch)
    changed = ((out - batch).abs().amax(dim=(1, 2, 3)) > 1e-4).float().mean()
    assert 0.25 < changed < 0.75


@pytest.mark.parametrize("name", ["weak", "strong"])
def test_parameters_differ_within_a_batch(name):
    torch.manual_seed(0)
    out = build_augment(name)(chest_batch(6))
    flat = out.flatten(1)
    distances = torch.cdist(flat, flat)
    off_diagonal = distances[~torch.eye(6, dtype=torch.bool)]
    assert (off_diagonal > 1e-3).all()


def test_reproducible_under_manual_seed():
    augment = build_augment("strong")
    torch.manual_seed(3)
    first = augment(chest_batch())
    torch.manual_seed(3)
    assert torch.equal(augment(chest_batch()), first)
    assert not torch.equal(augment(chest_batch()), first)


def test_flip_is_off_by_default_and_exact_when_asked():
    assert parse_spec("weak")["hflip"] == 0 and parse_spec("strong")["hflip"] == 0
    batch = chest_batch()
    flipped = build_augment({"name": "none", "hflip": 1.0})(batch)
    torch.testing.assert_close(flipped, batch.flip(-1), atol=1e-5, rtol=0)


def test_keys_override_pipeline_defaults():
    params = parse_spec({"name": "weak", "rotate": 3, "elastic": 0.2, "scale": [0.95, 1.05]})
    assert params["rotate"] == 3.0 and params["elastic"] == 0.2 and params["scale"] == (0.95, 1.05)
    assert parse_spec("strong")["elastic"] == 0.5


@pytest.mark.parametrize("spec, words", [
    ({"name": "weak", "elastik": 0.5}, "did you mean 'elastic'"),
    ({"name": "strnog"}, "did you mean 'strong'"),
    ({"name": "weak", "elastic": 1.5}, "probability"),
    ({"name": "weak", "scale": [1.1, 0.9]}, "low <= high"),
    ({"name": "weak", "rotate": "lots"}, "number"),
    (42, "pipeline name or a dict"),
])
def test_bad_specs_are_named(spec, words):
    with pytest.raises(CxrlabError, match=words):
        build_augment(spec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_runs_on_the_gpu():
    torch.manual_seed(0)
    out = build_augment("strong")(chest_batch().cuda())
    assert out.is_cuda and out.shape == (8, 1, 32, 32)
