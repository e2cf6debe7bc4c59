"""read_image on the real fixtures (PNG, RGB JPEG, JPEG-compressed DICOM, MONOCHROME1) and on broken files."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile

import cxrlab
from cxrlab.data.images import read_image
from cxrlab.errors import CxrlabError


def test_exported_at_package_level():
    assert cxrlab.read_image is read_image


def test_nih_png_is_8bit_over_255(shared_data):
    path = shared_data / "nih" / "00000001_000.png"
    image = read_image(path)
    expected = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255
    assert image.dtype == np.float32 and image.shape == (512, 512)
    np.testing.assert_array_equal(image, expected)


def test_16bit_png_uses_the_full_16bit_range(tmp_path):
    pixels = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    np.testing.assert_allclose(read_image(tmp_path / "x.png"), pixels / 65535.0, atol=1e-6)


def test_rgb_jpeg_becomes_luminance(shared_data):
    path = shared_data / "covid" / "16747_3_1.jpg"
    rgb = np.asarray(Image.open(path), dtype=np.float64)
    assert rgb.ndim == 3 and rgb.shape[2] == 3
    image = read_image(path)
    assert image.shape == (885, 1036) and image.dtype == np.float32
    luminance = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255
    assert np.abs(image - luminance).max() <= 1.0 / 255 + 1e-6  # PIL's integer rounding only


def test_gray_jpeg_matches_the_png_it_was_made_from(shared_data, tmp_path):
    png = shared_data / "nih" / "00000001_000.png"
    Image.open(png).convert("L").save(tmp_path / "x.jpg", quality=95)
    image = read_image(tmp_path / "x.jpg")
    assert image.shape == (512, 512)
    assert np.abs(image - read_image(png)).mean() < 0.01  # JPEG loss only


def test_jpeg_compressed_dicom(shared_data):
    path = shared_data / "dicom" / "siim_pneumothorax_example.dcm"
    image = read_image(path)
    raw = pydicom.dcmread(path).pixel_array  # 8 bits stored, no rescale, no window: value / 255
    assert image.shape == (1024, 1024) and image.dtype == np.float32
    np.testing.assert_allclose(image, raw / 255.0, atol=1e-6)


def test_monochrome1_is_inverted_to_monochrome2(shared_data):
    normal = read_image(shared_data / "dicom" / "siim_pneumothorax_example.dcm")
    inverted = read_image(shared_data / "dicom" / "monochrome1_example.dcm")
    np.testing.assert_allclose(inverted, 1.0 - normal, atol=1e-6)


def _dicom_12bit(shared_data, tmp_path, name, **elements):
    """A 2×2 12-bit uncompressed DICOM (stored values 0, 1000, 2000, 4095) built from the real one."""
    ds = pydicom.dcmread(shared_data / "dicom" / "siim_pneumothorax_example.dcm")
    ds.set_pixel_data(np.array([[0, 1000], [2000, 4095]], dtype=np.uint16), "MONOCHROME2", 12)
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.save_as(tmp_path / name)
    return tmp_path / name


def test_dicom_12bit_scaled_by_its_bit_range(shared_data, tmp_path):
    image = read_image(_dicom_12bit(shared_data, tmp_path, "plain.dcm"))
    np.testing.assert_allclose(image, np.array([[0, 1000], [2000, 4095]]) / 4095, atol=1e-6)


def test_dicom_window_maps_the_window_onto_0_1(shared_data, tmp_path):
    # DICOM linear window, centre 1000 width 1000: 500.5 and below → 0, 1499.5 and above → 1,
    # 1000 → (1000 - 999.5) / 999 + 0.5 = 0.5005
    image = read_image(_dicom_12bit(shared_data, tmp_path, "win.dcm", WindowCenter=1000, WindowWidth=1000))
    np.testing.assert_allclose(image, [[0.0, 0.5 + 0.5 / 999], [1.0, 1.0]], atol=1e-6)


def test_dicom_rescale_is_applied_before_the_window(shared_data, tmp_path):
    # slope 2, intercept -1000: stored 1000 → 1000 (window centre), stored 0 → -1000, 2000 → 3000
    path = _dicom_12bit(shared_data, tmp_path, "resc.dcm", WindowCenter=1000, WindowWidth=1000,
                        RescaleSlope=2, RescaleIntercept=-1000)
    np.testing.assert_allclose(read_image(path), [[0.0, 0.5 + 0.5 / 999], [1.0, 1.0]], atol=1e-6)


def test_dicom_without_suffix_is_recognised(shared_data, tmp_path):
    target = tmp_path / "1.2.840.113619"  # PACS exports often have no suffix
    target.write_bytes((shared_data / "dicom" / "siim_pneumothorax_example.dcm").read_bytes())
    assert read_image(target).shape == (1024, 1024)


def test_missing_image_names_the_file(tmp_path):
    with pytest.raises(CxrlabError, match="image not found: .*nothere.png"):
        read_image(tmp_path / "nothere.png")


@pytest.mark.parametrize("source", ["nih/00000001_000.png", "covid/16747_3_1.jpg",
                                    "dicom/siim_pneumothorax_example.dcm"])
@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_files_fail_naming_the_file(shared_data, tmp_path, source, keep):
    data = (shared_data / source).read_bytes()
    broken = tmp_path / ("broken" + (shared_data / source).suffix)
    broken.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CxrlabError, match="broken"):
        read_image(broken)


def test_truncated_uncompressed_dicom(shared_data, tmp_path):
    data = _dicom_12bit(shared_data, tmp_path, "full.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:-3])
    with pytest.raises(CxrlabError, match="cut.dcm.*truncated"):
        read_image(tmp_path / "cut.dcm")


def test_truncation_detected_even_if_pil_is_set_to_tolerate_it(shared_data, tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = (shared_data / "nih" / "00000001_000.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(CxrlabError, match="cut.png"):
        read_image(tmp_path / "cut.png")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


@pytest.mark.parametrize("name, content", [("fake.png", b"this is not an image"), ("notes.txt", b"hello"),
                                           ("empty.dcm", b"")])
def test_corrupt_or_unsupported_files(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CxrlabError, match=name):
        read_image(tmp_path / name)
