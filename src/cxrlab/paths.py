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


def check_new_dir(path: Path, overwrite: bool = False, what: str = "output folder") -> Path:
    """As ``check_output_dir``, but nothing is created: a missing folder is checked through its nearest
    existing parent (a folder, writable), so a command that fails before writing leaves no empty folder.
    Create it with ``path.mkdir(parents=True, exist_ok=True)`` when the first file is ready."""
    path = Path(path)
    if path.exists():
        return check_output_dir(path, overwrite, what)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CxrlabError(f"{what} {path} cannot be made: {parent} is a file, not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CxrlabError(f"{what} {path} cannot be made: {parent} is not writable (permission denied)")
    return path


class removed_if_empty:  # noqa: N801 - used as a context manager, like a function
    """``with removed_if_empty(folder):`` a folder the block creates is removed again when the block fails
    and left it empty (no empty run or output folder after an error); a folder that existed is kept."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.existed = self.folder.exists()

    def __enter__(self) -> Path:
        return self.folder

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is not None and not self.existed and self.folder.is_dir():
            try:
                self.folder.rmdir()  # only when empty: anything written stays for the user to see
            except OSError:
                pass
        return False
