"""Shared test fixtures. Tests use small images and few steps; real fixtures are read from ../shared/data."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real fixtures not found at {SHARED_DATA}")
    return SHARED_DATA


# a tiny `cxrlab train demo` run shared by the CLI and workflow tests (trained once per session)
TINY = ["data.source=synthetic:160", "data.image_size=32", "train.epochs=1", "train.batch_size=32",
        "eval.bootstrap=20", "data.val_fraction=0.2", "data.test_fraction=0.25"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """``(root, overrides)``: ``root / "run"`` is a finished demo run on 160 synthetic 32 px images."""
    from cxrlab.cli import main

    root = tmp_path_factory.mktemp("cli")
    overrides = TINY + [f"data.cache_dir={root / 'cache'}"]
    assert main(["train", "demo", "--out", str(root / "run"), *overrides]) == 0
    return root, overrides
