"""Uploaded image bytes -> the model's input, refusing what is not a PNG, JPEG or DICOM, and images whose
declared size is a decompression bomb, before any pixel is decoded.

An accepted upload is written to a temporary folder (removed when the call returns) and goes through
:func:`cxrlab.data.preprocess.preprocess`, the path the training cache and every backend use.
"""
from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np

from ..data.preprocess import preprocess_file
from ..errors import CxrlabError
from ..model_card import InputSpec

MAX_PIXELS = 64_000_000  # 8000×8000: above any radiograph (about 4k×4k at most)
SUFFIX = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}


class UploadError(CxrlabError):
    """A refused upload and the HTTP status that says why (413, 415 or 422)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def sniff(data: bytes) -> str | None:
    """The format by content, whatever the file name or content type says: png, jpeg, dicom or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


def declared_size(data: bytes, kind: str, name: str) -> tuple[int, int, int]:
    """(width, height, frames) from the header alone."""
    try:
        if kind == "dicom":
            import pydicom

            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            return int(ds.get("Columns", 0)), int(ds.get("Rows", 0)), int(ds.get("NumberOfFrames", 1) or 1)
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:  # lazy: reads the header only
            return im.size[0], im.size[1], 1
    except Exception as exc:
        if type(exc).__name__ == "DecompressionBombError":  # PIL's own limit, checked at open
            raise UploadError(422, f"{name}: refused before decoding, a decompression bomb? ({exc})") from None
        raise UploadError(422, f"{name}: cannot read the {kind.upper()} header: {type(exc).__name__}: {exc}") from None


def decode_upload(data: bytes, name: str, spec: InputSpec, max_pixels: int = MAX_PIXELS, tmp_root=None) -> np.ndarray:
    """The uploaded file as the uint8 input ``spec`` describes; an :class:`UploadError` naming ``name``
    otherwise."""
    return decode_upload_shaped(data, name, spec, max_pixels, tmp_root)[0]


def decode_upload_shaped(data: bytes, name: str, spec: InputSpec, max_pixels: int = MAX_PIXELS,
                         tmp_root=None) -> tuple[np.ndarray, tuple[int, int]]:
    """(:func:`decode_upload`'s image, the decoded image's full H×W: where the padding of the fit is)."""
    kind = sniff(data)
    if kind is None:
        start = data[:8].hex(" ") if data else "nothing"
        raise UploadError(415, f"{name}: not a PNG, JPEG or DICOM file (by its content, which starts with "
                               f"{start})")
    width, height, frames = declared_size(data, kind, name)
    if width * height * frames > max_pixels:
        raise UploadError(422, f"{name}: declared size {width}×{height}×{frames} frames = {width * height * frames:,} "
                               f"pixels exceeds the "
                               f"limit of {max_pixels:,} (refused before decoding: a decompression bomb?)")
    with tempfile.TemporaryDirectory(prefix="upload-", dir=tmp_root) as folder:
        path = Path(folder) / f"image{SUFFIX[kind]}"
        path.write_bytes(data)
        try:
            return preprocess_file(spec, path)
        except CxrlabError as exc:
            raise UploadError(422, str(exc).replace(str(path), name)) from None
