"""Checks on where a command will write, made before any work starts.

Hours of training or inference must not end in "permission denied", and a finished run or an existing
output must not be replaced without an explicit ``--overwrite``. Every check raises a CxrlabError that
names the path and says what to do. (A training run's folder is checked by ``workflows.train.check_run_dir``,
which knows what a run holds.)
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import CxrlabError


def writable_dir(folder: Path, what: str = "output folder") -> Path:
    """Create ``folder`` (and its parents) if needed and prove a file can be written in it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CxrlabError(f"{what} {folder} is a file, not a folder; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".cxrlab-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CxrlabError(f"{what} {folder} is not writable ({exc.strerror or exc})") from None
    return folder


def check_output_file(path: Path, overwrite: bool = False, what: str = "output file") -> Path:
    """A file to be written at the end of a command: not a folder, not an existing file unless
    ``overwrite``, in a writable folder."""
    path = Path(path)
    if path.is_dir():
        raise CxrlabError(f"{what} {path} is a folder; --out needs a file name, e.g. {path / 'predictions.csv'}")
    if path.exists() and not overwrite:
        raise CxrlabError(f"{what} {path} already exists; pass --overwrite to replace it, or choose another --out")
    writable_dir(path.parent, f"folder of {what}")
    return path


def check_output_dir(path: Path, overwrite: bool = False, what: str = "output folder") -> Path:
    """A folder to be filled by a command: not a file, not a non-empty folder unless ``overwrite``,
    writable."""
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CxrlabError(f"{what} {path} already exists and is not empty; pass --overwrite to replace its "
                          "contents, or choose another --out")
    return writable_dir(path, what)
