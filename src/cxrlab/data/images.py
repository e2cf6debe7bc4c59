"""Decode one image file (PNG, JPEG, DICOM) into a grey H×W array.

``read_image`` gives the exact float32 image in [0, 1]; :func:`decode` is what the one preprocessing
path (:func:`cxrlab.data.preprocess.preprocess`, which every cache, model and backend sees) builds on:
8-bit data stays uint8, and a JPEG may be decoded at a reduced DCT scale. All the format quirks (16-bit
PNGs, RGB JPEGs of gray images, MONOCHROME1, rescale and windowing, compressed DICOM) are handled once,
here. Any failure is a ``CxrlabError`` naming the file: a corrupt image in a 200k-image dataset must be
findable from the message alone.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from pathlib import Path

import numpy as np

from ..errors import CxrlabError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
DICOM_SUFFIXES = (".dcm", ".dicom")
_BITS_16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


# ``decode(path, fit=(size, mode))`` decodes a JPEG at a reduced DCT scale (1/2, 1/4, 1/8) that keeps at
# least this many source pixels per output pixel along the side the fit scales, so the antialiased
# resize that follows still averages >= 2 pixels. Against the exact path (full decode, then fit) at
# 224 px the prepared pixels then differ by 0.2-0.4 grey levels on average, <= 1 at the 99th percentile
# and up to 6 at sharp edges (burnt-in markers) on the real fixtures: TOLERANCE is what
# tests/test_read_fitted.py enforces and benchmarks/bench_data.py reports.
DRAFT_GAP = 2.0
TOLERANCE = {"mean": 0.5, "p99": 2, "max": 8}  # grey levels (of 255), preprocess vs the exact path


def read_image(path) -> np.ndarray:
    """The image at ``path`` as float32 H×W in [0, 1] (0 = black, MONOCHROME2 convention), decoded in
    full. Models see files through :func:`cxrlab.data.preprocess.preprocess`, not through this."""
    return decode(Path(path))[0]


def decode(path: Path, fit: tuple[int, str] | None = None, uint8: bool = False):
    """(image, (H, W) of the full image): float32 in [0, 1], or uint8 for 8-bit data when ``uint8``;
    smaller than the full image when ``fit`` allowed a reduced decode."""
    if not path.is_file():
        raise CxrlabError(f"image not found: {path}")
    try:
        image, shape = (_read_dicom if is_dicom(path) else _read_pil)(path, fit, uint8)
    except CxrlabError:
        raise
    except Exception as exc:  # PIL, pydicom and the JPEG plugins raise many unrelated types
        raise CxrlabError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    if image.ndim != 2 or image.size == 0:
        raise CxrlabError(f"cannot read image {path}: expected a 2-D image, got shape {image.shape}")
    return image, shape


def is_dicom(path: Path) -> bool:
    """DICOM by suffix, or by the ``DICM`` marker at byte 128 (MIMIC and PACS exports often lack one)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return False
    with open(path, "rb") as f:
        f.seek(128)
        return f.read(4) == b"DICM"


# --- PNG / JPEG -------------------------------------------------------------------------------------

_TRUNCATION_LOCK = threading.Lock()


@contextlib.contextmanager
def _strict_truncation():
    """PIL silently pads truncated files when LOAD_TRUNCATED_IMAGES is on (some libraries turn it on
    globally). Then switch it off for this read, under a lock so that threads decoding in parallel
    do not restore each other's setting; with PIL's default (off) nothing is touched."""
    from PIL import ImageFile

    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    with _TRUNCATION_LOCK:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _read_pil(path: Path, fit: tuple[int, str] | None = None, uint8: bool = False):
    from PIL import ExifTags, Image, ImageOps

    with _strict_truncation(), Image.open(path) as im:
        w, h = im.size
        if fit is not None and im.format == "JPEG":
            _draft(im, *fit)
        im.load()  # decodes every byte now, so a truncated file fails here and not later
        transposed = im
        if im.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # (exif_transpose copies even when not)
            transposed = ImageOps.exif_transpose(im)
            if transposed.size != im.size:  # rotated by 90°: so is the full size
                w, h = h, w
        if uint8 and transposed.mode not in _BITS_16_MODES + ("I", "F"):
            gray = transposed if transposed.mode == "L" else transposed.convert("L")
            return np.asarray(gray), (h, w)
        return _pil_to_gray(transposed), (h, w)


def _draft(im, size: int, mode: str) -> None:
    """Ask the JPEG decoder for a DCT-scaled grayscale image that keeps ``DRAFT_GAP × size`` pixels
    along the side ``mode`` scales to ``size`` (the long side for pad, the short side for crop). For a
    colour JPEG, "L" decodes only the stored luma (JFIF's Y is the ITU-R 601 luminance convert uses)."""
    w, h = im.size
    side = max(w, h) if mode == "pad" else min(w, h)
    keep = DRAFT_GAP * size / side
    if keep < 0.5:  # below that, no DCT scale step fits
        im.draft("L", (max(1, int(np.ceil(w * keep))), max(1, int(np.ceil(h * keep)))))


def _pil_to_gray(im) -> np.ndarray:
    """8-bit → /255, 16-bit → /65535 (the bit depth's range, not the image's min–max, so intensities
    stay comparable between images); colour → ITU-R 601 luminance."""
    if im.mode in _BITS_16_MODES:
        return (np.asarray(im, dtype=np.float32) / 65535.0).astype(np.float32)
    if im.mode == "I":  # 16-bit PNGs on some Pillow versions, 32-bit TIFF-like data otherwise
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if arr.min() >= 0 and arr.max() <= 65535 else None
        return _minmax(arr, 0.0 if top else arr.min(), top or arr.max())
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        return _minmax(arr, arr.min(), arr.max())
    if im.mode != "L":
        im = im.convert("L")  # RGB, RGBA, P, LA, 1, CMYK: luminance L = .299 R + .587 G + .114 B
    return np.asarray(im, dtype=np.float32) / np.float32(255.0)


def _minmax(arr: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto [0, 1] (clipping outside values); a flat range gives zeros."""
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        return np.zeros(np.shape(arr), dtype=np.float32)
    # float64 arithmetic (exact for 16-bit values), done in place on one array: a 3k² film is 72 MB
    out = np.array(arr, dtype=np.float64)
    out -= low
    out /= high - low
    np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32)


# --- DICOM ------------------------------------------------------------------------------------------

def _read_dicom(path: Path, fit: tuple[int, str] | None = None, uint8: bool = False):
    """(image, (H, W)). Stored values → modality LUT (rescale) → VOI LUT / window → [0, 1] over the
    range those transforms can produce (not the image's own min–max) → inverted if MONOCHROME1.

    With ``uint8``, plain 8-bit data (no rescale, no window) comes back as its stored values, which is
    exactly that; a baseline-JPEG frame of such data is then decoded by Pillow (libjpeg-turbo, about
    5× faster than the pylibjpeg plugin, same pixels within 1 grey level) at the draft scale ``fit``
    allows."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(path)
    ended_early = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
    if ended_early:
        raise CxrlabError(f"cannot read image {path}: truncated DICOM file ({ended_early[0]})")
    if "PixelData" not in ds:
        raise CxrlabError(f"cannot read image {path}: the DICOM file holds no pixel data")
    _check_pixel_data_length(ds, path)
    monochrome1 = str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1"
    plain = uint8 and _plain_8bit(ds)
    if plain and _baseline_jpeg_gray(ds):
        arr = _pil_jpeg_frame(ds, fit)
        return (255 - arr if monochrome1 else arr), (int(ds.Rows), int(ds.Columns))
    arr = ds.pixel_array  # compressed transfer syntaxes decode through the pylibjpeg plugins
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    if int(ds.get("SamplesPerPixel", 1)) > 1:  # colour DICOM (pydicom already converted YBR → RGB)
        top = 2.0 ** int(ds.BitsStored) - 1
        lum = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
        return _minmax(lum, 0.0, top), lum.shape
    if plain and arr.dtype == np.uint8:
        return (255 - arr if monochrome1 else arr), arr.shape

    def transform(values: np.ndarray) -> np.ndarray:
        return apply_voi_lut(apply_modality_lut(values, ds), ds)

    low, high = _output_range(ds, transform, arr)
    image = _minmax(transform(arr), low, high)
    if monochrome1:
        image = 1.0 - image
    return image.astype(np.float32), image.shape


def _baseline_jpeg_gray(ds) -> bool:
    return (ds.file_meta.get("TransferSyntaxUID") == "1.2.840.10008.1.2.4.50"
            and int(ds.get("SamplesPerPixel", 1)) == 1)


def _pil_jpeg_frame(ds, fit: tuple[int, str] | None) -> np.ndarray:
    """The first frame of baseline-JPEG pixel data, decoded by Pillow (draft-scaled for ``fit``)."""
    import io

    from PIL import Image
    from pydicom.encaps import generate_frames

    frame = next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
    with _strict_truncation(), Image.open(io.BytesIO(frame)) as im:
        if fit is not None:
            _draft(im, *fit)
        im.load()
        return np.asarray(im if im.mode == "L" else im.convert("L"))


def _plain_8bit(ds) -> bool:
    """Unsigned 8 bits stored, no rescale and no window: the [0, 1] image is the stored value / 255."""
    return (int(ds.get("BitsStored", 0) or 0) == 8 and int(ds.get("PixelRepresentation", 0) or 0) == 0
            and float(ds.get("RescaleSlope", 1) or 1) == 1 and float(ds.get("RescaleIntercept", 0) or 0) == 0
            and "ModalityLUTSequence" not in ds and "VOILUTSequence" not in ds and "WindowCenter" not in ds)


def _output_range(ds, transform, arr: np.ndarray) -> tuple[float, float]:
    """The range of ``transform`` over every value the stored bits can hold: the window's range when
    windowing is present, the rescaled bit range otherwise. Falls back to the image's own range for
    unusual bit depths."""
    bits = int(ds.get("BitsStored", 0) or 0)
    if not 1 <= bits <= 16:
        out = transform(arr)
        return float(np.min(out)), float(np.max(out))
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    every = np.arange(low, high + 1, dtype=np.int32 if signed else np.uint16 if bits == 16 else np.int32)
    out = transform(every)
    return float(np.min(out)), float(np.max(out))


def _check_pixel_data_length(ds, path: Path) -> None:
    """A truncated uncompressed DICOM can still parse; its pixel data is then shorter than the
    rows × columns × bytes it declares. (Truncated compressed data fails in the decoder.)"""
    if ds.file_meta.get("TransferSyntaxUID") is None or ds.file_meta.TransferSyntaxUID.is_compressed:
        return
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    bytes_per = max(1, int(ds.get("BitsAllocated", 8)) // 8)
    need = rows * cols * bytes_per * int(ds.get("SamplesPerPixel", 1)) * int(ds.get("NumberOfFrames", 1) or 1)
    have = len(ds.PixelData)
    if have < need:
        raise CxrlabError(f"cannot read image {path}: truncated DICOM pixel data ({have} of {need} bytes)")
