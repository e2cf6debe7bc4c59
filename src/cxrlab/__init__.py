"""cxrlab: multi-label chest X-ray classification."""
__version__ = "0.1.0"

from .data.images import read_image  # noqa: E402,F401
