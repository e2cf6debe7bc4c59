"""preprocess (what prepare stores and every model sees) against the exact path fit_image(read_image(...)):
identical where the fast path is exact (8-bit PNG, plain 8-bit DICOM values, windowed DICOM), within images.TOLERANCE where it
decodes JPEG at a reduced DCT scale; same geometry always; errors still name the file."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from cxrlab.data import cache, workers
from cxrlab.data.cache import open_cache, prepare
from cxrlab.data.images import TOLERANCE, decode, read_image
from cxrlab.data.preprocess import fit_image, preprocess
from cxrlab.data.records import Records
from cxrlab.errors import CxrlabError
from cxrlab.labels import NIH14
from cxrlab.model_card import InputSpec


def read_fitted(path, size, mode="pad"):
    return preprocess(InputSpec(size, mode), path)


def _diff(path, size=224, mode="pad"):
    exact = fit_image(read_image(path), size, mode)
    fast = read_fitted(path, size, mode)
    assert fast.shape == exact.shape == (size, size) and fast.dtype == np.uint8
    d = np.abs(fast.astype(np.int16) - exact)
    return d, exact, fast


def _within_tolerance(d):
    return (d.mean() <= TOLERANCE["mean"] and np.percentile(d, 99) <= TOLERANCE["p99"]
            and d.max() <= TOLERANCE["max"])


def _big_jpeg(shared_data, tmp_path, side=1024, rgb=False):
    """The real NIH film upscaled to side² as NIH ships it, saved as JPEG (optionally as an RGB file)."""
    im = Image.open(shared_data / "nih" / "00000001_000.png").convert("L")
    im = im.resize((side, side), Image.Resampling.BICUBIC)
    path = tmp_path / f"big{side}{'rgb' if rgb else ''}.jpg"
    (im.convert("RGB") if rgb else im).save(path, quality=92)
    return path


def test_8bit_png_is_exact(shared_data):
    d, _, _ = _diff(shared_data / "nih" / "00000001_000.png")
    assert d.max() == 0


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_large_jpeg_decodes_at_half_scale_within_tolerance(shared_data, tmp_path, mode):
    path = _big_jpeg(shared_data, tmp_path)
    image, shape = decode(path, fit=(224, mode), uint8=True)
    assert shape == (1024, 1024) and image.shape == (512, 512) and image.dtype == np.uint8  # 1/2 DCT scale
    d, _, _ = _diff(path, mode=mode)
    assert _within_tolerance(d), (d.mean(), d.max())
    assert d.max() > 0  # a different decoder path: if this were 0 the draft would not have been used


def test_small_target_uses_a_deeper_scale_and_stays_within_tolerance(shared_data, tmp_path):
    path = _big_jpeg(shared_data, tmp_path, side=2048, rgb=True)
    image, shape = decode(path, fit=(224, "pad"), uint8=True)
    assert shape == (2048, 2048) and image.shape == (512, 512)  # 1/4 DCT scale, luma only
    d, _, _ = _diff(path)
    assert _within_tolerance(d), (d.mean(), d.max())


def test_no_draft_when_the_image_is_not_large_enough(shared_data, tmp_path):
    path = _big_jpeg(shared_data, tmp_path, side=400)
    image, _ = decode(path, fit=(224, "pad"), uint8=True)
    assert image.shape == (400, 400)
    assert _diff(path)[0].max() == 0


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_non_square_rgb_jpeg_keeps_the_exact_geometry(shared_data, mode):
    # 1036×885: the 1/2-scale decode is 518×443 (443 = ceil(885 / 2)); the scaled size and the padding
    # must still come from 1036×885, else the image shifts by a row against the exact path
    d, exact, fast = _diff(shared_data / "covid" / "16747_3_1.jpg", mode=mode)
    assert _within_tolerance(d), (d.mean(), d.max())
    if mode == "pad":
        rows = np.flatnonzero(exact.max(axis=1) > 0)
        np.testing.assert_array_equal(np.flatnonzero(fast.max(axis=1) > 0), rows)
        assert len(rows) == round(885 * 224 / 1036)


def test_exif_rotation_turns_the_full_size_too(shared_data, tmp_path):
    im = Image.open(shared_data / "nih" / "00000001_000.png").convert("L").resize((1200, 800))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    im.save(tmp_path / "rot.jpg", quality=92, exif=exif)
    _, shape = decode(tmp_path / "rot.jpg", fit=(224, "pad"), uint8=True)
    assert shape == (1200, 800)  # H×W as displayed
    d, exact, fast = _diff(tmp_path / "rot.jpg")
    assert d.mean() <= TOLERANCE["mean"]
    np.testing.assert_array_equal(fast.max(axis=0) > 0, exact.max(axis=0) > 0)  # same padded columns


def test_jpeg_dicom_within_tolerance_and_monochrome1_is_the_exact_inverse(shared_data):
    d, _, normal = _diff(shared_data / "dicom" / "siim_pneumothorax_example.dcm")
    assert _within_tolerance(d), (d.mean(), d.max())
    inverted = read_fitted(shared_data / "dicom" / "monochrome1_example.dcm", 224)
    # inversion before the resize: equal to inverting afterwards up to the resize's rounding
    assert np.abs(inverted.astype(np.int16) - (255 - normal.astype(np.int16))).max() <= 1


def test_uncompressed_8bit_dicom_is_exact(shared_data, tmp_path):
    ds = pydicom.dcmread(shared_data / "dicom" / "siim_pneumothorax_example.dcm")
    ds.set_pixel_data(ds.pixel_array[:700], "MONOCHROME2", 8)  # uncompressed, non-square
    ds.save_as(tmp_path / "raw.dcm")
    assert _diff(tmp_path / "raw.dcm")[0].max() == 0


def test_windowed_dicom_takes_the_exact_float_path(shared_data, tmp_path):
    ds = pydicom.dcmread(shared_data / "dicom" / "siim_pneumothorax_example.dcm")
    ds.set_pixel_data(ds.pixel_array[:512, :512], "MONOCHROME2", 8)
    ds.WindowCenter, ds.WindowWidth = 100, 80  # a window: the stored values are not the image
    ds.save_as(tmp_path / "win.dcm")
    d, exact, fast = _diff(tmp_path / "win.dcm", size=64)
    assert d.max() == 0
    assert fast.max() == 255 and fast.min() == 0  # the window saturates, as the exact path does


@pytest.mark.parametrize("source", ["covid/16747_3_1.jpg", "dicom/siim_pneumothorax_example.dcm"])
def test_truncated_files_still_fail_naming_the_file(shared_data, tmp_path, source):
    data = (shared_data / source).read_bytes()
    broken = tmp_path / ("broken" + (shared_data / source).suffix)
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(CxrlabError, match="broken"):
        read_fitted(broken, 224)


def test_prepare_stores_read_fitted_pixels(shared_data, tmp_path):
    paths = [str(shared_data / "covid" / "16747_3_1.jpg"), str(shared_data / "dicom" / "siim_pneumothorax_example.dcm")]
    meta = pd.DataFrame({"path": paths, "patient_id": ["a", "b"], "study_id": ["a", "b"], "view": ["PA", "PA"]})
    records = Records("two", NIH14, np.zeros((2, len(NIH14)), np.float32), meta)
    prepare(records, tmp_path / "c", size=64, workers=1, progress=False)
    images = open_cache(tmp_path / "c")[0]
    for row, path in enumerate(paths):
        np.testing.assert_array_equal(images[row], read_fitted(path, 64))


def test_default_workers_follow_the_usable_cores(monkeypatch, tmp_path):
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert cache.available_cpus() == 16  # no cap at 8: a 16-core machine decodes with 16 processes
    seen = []

    class Recording:
        def __init__(self, real):
            self.real = real

        def __call__(self, workers, n_chunks):
            seen.append(workers)
            return self.real(1, n_chunks)  # decode here: the test checks the choice, not the pool

    monkeypatch.setattr(cache, "decoding_pool", Recording(cache.decoding_pool))
    from cxrlab.data.synthetic import load_synthetic

    prepare(load_synthetic("40,seed=0,size=16"), tmp_path / "s", size=16, progress=False)
    assert seen == [16]
