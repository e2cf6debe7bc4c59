"""The training dataset: samples from a cached uint8 image array, with their targets and masks.

Images stay uint8 until they reach the training device (4× less to copy than float32); the trainer
scales them to [0, 1] there. A file-backed memmap (``open_cache``) is read with ``preadv`` straight
into the batch buffer instead of through the mapping: the bytes then live in the OS page cache, shared
by every worker and rank, and the process's resident memory stays flat however large the cache is.
"""
from __future__ import annotations

import mmap
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import CxrlabError


class ImageSet(Dataset):
    """Sample ``i`` is image ``rows[i]`` of ``images`` (N×H×W uint8; default rows: all, in order)
    with ``target[i]`` and ``mask[i]`` (L floats each) and optionally ``full_target[i]``.

    ``dataset[i]`` is ``{"image": uint8 1×H×W, "target", "mask"[, "full_target"]: float32 L,
    "index": int64 i}``. ``__getitems__`` (used by DataLoader for a whole batch) reads the batch's
    images in one pass, so default collation of 64 samples costs little more than one copy.
    """

    def __init__(self, images: np.ndarray, target, mask, rows=None, full_target=None):
        if images.ndim != 3 or images.dtype != np.uint8:
            raise CxrlabError(f"ImageSet needs an N×H×W uint8 image array, got {images.dtype} {images.shape}")
        self.images = images
        self.rows = np.arange(len(images), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.target = _labels(target, "target", len(self.rows))
        self.mask = _labels(mask, "mask", len(self.rows), like=self.target)
        self.full_target = None if full_target is None else _labels(full_target, "full_target", len(self.rows),
                                                                    like=self.target)
        if len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= len(images)):
            raise CxrlabError(f"ImageSet rows must lie in [0, {len(images)}), got {self.rows.min()}..{self.rows.max()}")
        self._file = _backing_file(images)
        self._fd: tuple[int, int] | None = None     # (pid, descriptor): reopened in each worker process

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices) -> list[dict]:
        """The samples at ``indices`` as a list of dicts whose tensors are views of batch tensors."""
        batch = self.batch(indices)
        keys = list(batch)
        return [{k: batch[k][j] for k in keys} for j in range(len(indices))]

    def batch(self, indices) -> dict:
        """The samples at ``indices`` already stacked: image B×1×H×W uint8, the rest B×L / B."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < -len(self) or indices.max() >= len(self)):
            raise IndexError(f"index out of range for an ImageSet of {len(self)} samples")
        out = {"image": torch.from_numpy(self._read(self.rows[indices])).unsqueeze(1),
               "target": torch.from_numpy(self.target[indices]),
               "mask": torch.from_numpy(self.mask[indices]),
               "index": torch.from_numpy(indices % max(len(self), 1))}
        if self.full_target is not None:
            out["full_target"] = torch.from_numpy(self.full_target[indices])
        return out

    def _read(self, rows: np.ndarray) -> np.ndarray:
        """Images ``rows`` as a new B×H×W array; file reads in ascending row order, runs merged."""
        h, w = self.images.shape[1:]
        out = np.empty((len(rows), h, w), dtype=np.uint8)
        if self._file is None:
            out[:] = self.images[rows]
            return out
        fd = self._descriptor()
        path, offset = self._file
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        staged = out if np.array_equal(order, np.arange(len(rows))) else np.empty_like(out)
        row_bytes = h * w
        start = 0
        while start < len(sorted_rows):
            stop = start + 1
            while stop < len(sorted_rows) and sorted_rows[stop] == sorted_rows[stop - 1] + 1:
                stop += 1
            view = memoryview(staged[start:stop].reshape(-1))
            got = os.preadv(fd, [view], offset + int(sorted_rows[start]) * row_bytes)
            if got != len(view):
                raise CxrlabError(f"{path}: short read at row {sorted_rows[start]} (file truncated?)")
            start = stop
        if staged is not out:
            out[order] = staged
        return out

    def _descriptor(self) -> int:
        if self._fd is None or self._fd[0] != os.getpid():
            self._fd = (os.getpid(), os.open(self._file[0], os.O_RDONLY))
        return self._fd[1]

    def __getstate__(self) -> dict:
        """Pickled for spawned loader workers: a file-backed memmap travels as its file name, not its bytes."""
        state = dict(self.__dict__, _fd=None)
        if self._file is not None:
            state["images"] = ("memmap", self._file, self.images.shape)
        return state

    def __setstate__(self, state: dict) -> None:
        images = state["images"]
        if isinstance(images, tuple) and images[0] == "memmap":
            (path, offset), shape = images[1], images[2]
            state["images"] = np.memmap(path, np.uint8, "r", offset=offset, shape=shape)
        self.__dict__.update(state)

    def __del__(self):
        if getattr(self, "_fd", None) and self._fd[0] == os.getpid():
            try:
                os.close(self._fd[1])
            except OSError:
                pass


def _labels(values, name: str, n: int, like: np.ndarray | None = None) -> np.ndarray:
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim != 2 or len(values) != n or (like is not None and values.shape != like.shape):
        want = f"{n}×L" if like is None else f"{like.shape[0]}×{like.shape[1]}"
        raise CxrlabError(f"ImageSet {name} must be {want}, got shape {values.shape}")
    return values


def _backing_file(images: np.ndarray) -> tuple[str, int] | None:
    """(file, byte offset) when ``images`` is a whole C-contiguous memmap of a file (not a view of
    one, whose recorded offset would be stale) and ``preadv`` exists; else None."""
    if not (isinstance(images, np.memmap) and isinstance(images.base, mmap.mmap) and images.filename
            and images.flags.c_contiguous and hasattr(os, "preadv")):
        return None
    return str(images.filename), int(images.offset)
