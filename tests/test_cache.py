"""The prepared cache (prepare / open_cache / fit_image / the prepare command) and the ImageSet that
training reads it through."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from cxrlab.data.cache import open_cache, prepare
from cxrlab.data.preprocess import fit_image
from cxrlab.data.dataset import ImageSet
from cxrlab.data.records import Records
from cxrlab.data.synthetic import load_synthetic
from cxrlab.errors import CxrlabError
from cxrlab.labels import LabelSpace

TWO = LabelSpace("two", ("a", "b"))


def gradient(i: int, h: int = 20, w: int = 30) -> np.ndarray:
    """A distinct non-square image per row (its value range encodes the row)."""
    return (np.linspace(0, 1, h * w, dtype=np.float32).reshape(h, w) * 0.5 + (i % 10) / 20)


class CountingReader:
    """Images from ``gradient``; rows in ``broken`` raise, ``stop_after`` reads interrupt the run."""

    def __init__(self, broken=(), stop_after=None):
        self.calls, self.broken, self.stop_after = [], set(broken), stop_after

    def __call__(self, i: int) -> np.ndarray:
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            raise KeyboardInterrupt
        self.calls.append(i)
        if i in self.broken:
            raise CxrlabError(f"cannot read image /data/img{i}.png: truncated")
        return gradient(i)


def table(n: int, reader) -> Records:
    meta = pd.DataFrame({"path": [f"/data/img{i}.png" for i in range(n)],
                         "patient_id": [f"{i // 2:05d}" for i in range(n)],
                         "study_id": [f"s{i}" for i in range(n)], "view": ["PA"] * n,
                         "split": ["train", "test"] * (n // 2) + ["train"] * (n % 2)})
    values = np.tile(np.array([[1, np.nan], [0, -1]], dtype=np.float32), (n // 2 + 1, 1))[:n]
    return Records("table", TWO, values, meta, reader)


def test_round_trip_keeps_meta_labels_and_pixels(tmp_path):
    records = table(41, lambda i: gradient(i))                  # a lambda reader: no pickling needed
    info = prepare(records, tmp_path / "c", size=16, workers=1, progress=False)
    assert (info.n, info.n_failed, info.size, info.mode, info.reused) == (41, 0, 16, "pad", False)
    images, index, labels, opened = open_cache(tmp_path / "c")
    assert labels == TWO and images.shape == (41, 16, 16) and images.dtype == np.uint8
    assert index["patient_id"].iloc[1] == "00000"                # ids stay strings
    assert list(index.columns[:5]) == ["path", "patient_id", "study_id", "view", "split"]
    np.testing.assert_array_equal(index[["a", "b"]].to_numpy(), records.values)   # NaN and -1 kept
    np.testing.assert_array_equal(images[7], fit_image(gradient(7), 16))
    saved = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert saved["labels"] == TWO.to_json() and saved["source"] == "table" and saved["status"] == "complete"
    assert not (tmp_path / "c.partial").exists() and not (tmp_path / "c" / "status.u8").exists()


def test_parallel_workers_write_the_same_cache(tmp_path):
    records = load_synthetic("300,seed=4,size=32")
    prepare(records, tmp_path / "one", size=24, workers=1, progress=False)
    prepare(records, tmp_path / "two", size=24, workers=2, progress=False)
    assert (tmp_path / "one" / "images.u8").read_bytes() == (tmp_path / "two" / "images.u8").read_bytes()


def test_fit_image_pads_or_crops_keeping_aspect():
    wide = np.ones((20, 40), dtype=np.float32)
    padded = fit_image(wide, 32)                                 # 16×32 image centred on black
    assert padded.shape == (32, 32) and padded.dtype == np.uint8
    assert (padded[8:24] == 255).all() and (padded[:7] == 0).all() and (padded[25:] == 0).all()
    assert (fit_image(wide, 32, mode="crop") == 255).all()
    stripes = np.tile(np.array([0, 255], dtype=np.uint8), (64, 32))    # antialiased: stripes average out
    assert abs(int(fit_image(stripes, 16)[8, 8]) - 128) < 10
    with pytest.raises(CxrlabError, match="resize mode"):
        fit_image(wide, 32, mode="stretch")


def test_unreadable_images_are_listed_skipped_and_compacted(tmp_path, capsys):
    records = table(30, CountingReader(broken={0, 13}))
    info = prepare(records, tmp_path / "c", size=16, workers=1, progress=False)
    assert (info.n, info.n_failed) == (28, 2)
    assert "2 of 30 images could not be read" in capsys.readouterr().err
    failed = pd.read_csv(tmp_path / "c" / "failed.csv")
    assert failed["path"].tolist() == ["/data/img0.png", "/data/img13.png"]
    assert failed["error"].str.contains("truncated").all()
    images, index, _, _ = open_cache(tmp_path / "c")
    kept = [i for i in range(30) if i not in (0, 13)]
    assert index["path"].tolist() == [f"/data/img{i}.png" for i in kept]
    for position, row in enumerate(kept):                        # each image still next to its labels
        np.testing.assert_array_equal(images[position], fit_image(gradient(row), 16))


def test_fail_mode_stops_and_a_rerun_resumes(tmp_path):
    reader = CountingReader(broken={20})
    with pytest.raises(CxrlabError, match="img20.png"):
        prepare(table(40, reader), tmp_path / "c", size=16, workers=1, on_error="fail", progress=False)
    assert not (tmp_path / "c").exists() and (tmp_path / "c.partial").is_dir()
    fixed = CountingReader()
    info = prepare(table(40, fixed), tmp_path / "c", size=16, workers=1, on_error="fail", progress=False)
    assert info.n == 40 and len(fixed.calls) < 40                # chunks finished before were kept


def test_interrupted_run_continues_where_it_stopped(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        prepare(table(100, CountingReader(stop_after=70)), tmp_path / "c", size=16, workers=1, progress=False)
    resumed = CountingReader()
    prepare(table(100, resumed), tmp_path / "c", size=16, workers=1, progress=False)
    assert 0 < len(resumed.calls) <= 100 - 25                    # chunks of 25 finished before were kept
    prepare(table(100, CountingReader()), tmp_path / "clean", size=16, workers=1, progress=False)
    assert (tmp_path / "c" / "images.u8").read_bytes() == (tmp_path / "clean" / "images.u8").read_bytes()


def test_finished_cache_is_reused_and_never_overwritten(tmp_path):
    prepare(table(20, CountingReader()), tmp_path / "c", size=16, workers=1, progress=False)
    again = CountingReader()
    info = prepare(table(20, again), tmp_path / "c", size=16, workers=1, progress=False)
    assert info.reused and again.calls == []
    before = (tmp_path / "c" / "images.u8").read_bytes()
    with pytest.raises(CxrlabError, match="it is kept"):
        prepare(table(20, CountingReader()), tmp_path / "c", size=32, workers=1, progress=False)
    with pytest.raises(CxrlabError, match="it is kept"):
        prepare(table(21, CountingReader()), tmp_path / "c", size=16, workers=1, progress=False)
    assert (tmp_path / "c" / "images.u8").read_bytes() == before


def test_open_cache_rejects_broken_caches(tmp_path):
    with pytest.raises(CxrlabError, match="not a prepared cache"):
        open_cache(tmp_path / "nothing")
    prepare(table(10, CountingReader()), tmp_path / "c", size=16, workers=1, progress=False)
    path = tmp_path / "c" / "images.u8"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CxrlabError, match=r"images\.u8.*truncated"):
        open_cache(tmp_path / "c")


def test_real_png_jpeg_dicom_and_a_missing_file(shared_data, tmp_path):
    files = [shared_data / "nih" / "00000001_000.png", shared_data / "covid" / "16747_3_1.jpg",
             shared_data / "dicom" / "siim_pneumothorax_example.dcm", tmp_path / "missing.png"]
    meta = pd.DataFrame({"path": [str(f) for f in files], "patient_id": list("abcd"), "study_id": list("abcd"),
                         "view": ["PA"] * 4})
    records = Records("real", TWO, np.zeros((4, 2), np.float32), meta)     # default reader: read_image
    info = prepare(records, tmp_path / "c", size=32, workers=1, progress=False)
    assert (info.n, info.n_failed) == (3, 1)
    images, index, _, _ = open_cache(tmp_path / "c")
    assert all(images[k].std() > 10 for k in range(3))            # real radiographs, not blank
    assert "missing.png" in pd.read_csv(tmp_path / "c" / "failed.csv")["path"].iloc[0]


def test_prepare_command(tmp_path, capsys):
    from cxrlab.cli import main

    out = tmp_path / "syn"
    assert main(["prepare", "synthetic:30", "--size", "24", "--out", str(out), "--workers", "1", "--quiet"]) == 0
    assert "30 images of 24×24" in capsys.readouterr().out
    assert open_cache(out)[0].shape == (30, 24, 24)


# ------------------------------------------------------------------------------------------ ImageSet

@pytest.fixture()
def cached(tmp_path):
    records = load_synthetic("120,seed=2,size=32")
    prepare(records, tmp_path / "c", size=32, workers=1, progress=False)
    images, index, labels, _ = open_cache(tmp_path / "c")
    return images, index[list(labels.names)].to_numpy(np.float32)


def test_imageset_samples(cached):
    images, target = cached
    rows = np.array([5, 3, 100, 7])
    mask = np.ones_like(target[rows])
    data = ImageSet(images, target[rows], mask, rows=rows, full_target=target[rows] * 2)
    sample = data[2]
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (1, 32, 32)
    assert torch.equal(sample["image"][0], torch.from_numpy(np.array(images[100])))
    assert sample["index"].item() == 2 and sample["target"].dtype == torch.float32
    torch.testing.assert_close(sample["full_target"], torch.from_numpy(target[100] * 2))


def test_batches_equal_single_samples_and_memory_stays_on_disk(cached):
    images, target = cached
    data = ImageSet(images, target, np.ones_like(target))
    in_ram = ImageSet(np.array(images), target, np.ones_like(target))
    batch = next(iter(DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))))
    assert batch["image"].shape == (16, 1, 32, 32)
    for j, i in enumerate(batch["index"].tolist()):
        assert torch.equal(batch["image"][j], data[i]["image"]) and torch.equal(batch["image"][j], in_ram[i]["image"])
        assert torch.equal(batch["target"][j], torch.from_numpy(target[i]))
    assert data._file is not None and in_ram._file is None          # the memmap is read from its file
    assert len(pickle.dumps(data)) < images.nbytes / 4              # workers get the file name, not bytes
    clone = pickle.loads(pickle.dumps(data))
    assert torch.equal(clone[9]["image"], data[9]["image"])


def test_imageset_rejects_bad_inputs(cached):
    images, target = cached
    with pytest.raises(CxrlabError, match="uint8"):
        ImageSet(images.astype(np.float32), target, target)
    with pytest.raises(CxrlabError, match="mask"):
        ImageSet(images, target, target[:, :3])
    with pytest.raises(CxrlabError, match="rows"):
        ImageSet(images, target[:2], target[:2], rows=[0, len(images)])
