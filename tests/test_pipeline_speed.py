"""Speed fixes in the training data path keep its results: the batch affine grid equals torch's."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cxrlab.data.transforms import affine_grid, build_augment


def test_affine_grid_equals_torchs_for_any_map_and_shape():
    g = torch.Generator().manual_seed(0)
    for h, w in ((224, 224), (31, 48), (1, 5)):
        theta = torch.randn(6, 2, 3, generator=g)
        expected = F.affine_grid(theta, [6, 1, h, w], align_corners=False)
        got = affine_grid(theta, h, w)
        assert got.shape == expected.shape == (6, h, w, 2)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_weak_augment_with_identity_parameters_returns_the_image():
    # zero rotation/shift, unit scale: the one-grid resampling must land exactly on the pixel centres
    augment = build_augment({"name": "weak", "rotate": 0.0, "translate": 0.0, "scale": [1.0, 1.0], "hflip": 1.0})
    x = torch.rand(3, 1, 17, 24, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(augment(x), x.flip(-1), rtol=0, atol=1e-5)
