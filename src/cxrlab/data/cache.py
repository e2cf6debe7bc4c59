"""The prepared cache: any source decoded once into fixed-size uint8 images, memory-mapped for training.

Decoding a 1024² PNG costs more than a training step of a small model, so ``prepare`` decodes every
image once, fits it to ``size``×``size`` and stores it in one raw uint8 file. A cache directory holds

- ``images.u8``: N×size×size uint8, C order, no header (open with ``np.memmap``);
- ``index.csv``: one row per image, in ``images.u8`` order: the source's meta columns (path,
  patient_id, study_id, view, split if present, ...) then the raw label values (1, 0, -1, blank = NaN);
- ``cache.json``: size, mode, n, label space, source name and fingerprint, status, n_failed;
- ``failed.csv``: path and error of every image that could not be read (skipped, not in the index).

Work happens in ``<out>.partial/`` and is renamed to ``<out>`` only when complete, so a finished cache
is never half-overwritten; a per-image status file is flushed after every chunk so an interrupted run
resumes where it stopped. A lock beside the cache (:mod:`cxrlab.data.locking`) serialises concurrent
preparers (e.g. several ranks of one job): the second says whom it waits for, waits, and then reuses
the first one's cache. Images are decoded by :func:`cxrlab.data.preprocess.preprocess`, the path every
model input takes, in a pool of forked workers (:mod:`cxrlab.data.workers`).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import CxrlabError
from ..labels import LabelSpace
from ..model_card import RESIZE_MODES, InputSpec
from ..progress import Progress
from .locking import cache_lock
from .preprocess import preprocess_record
from .records import Records
from .workers import available_cpus, completed, decoding_pool

FORMAT = 1
IMAGES, INDEX, INFO, FAILED, STATUS = "images.u8", "index.csv", "cache.json", "failed.csv", "status.u8"
MODES = RESIZE_MODES  # prepare --resize
ON_ERROR = ("skip", "fail")
PENDING, DONE, BROKEN = 0, 1, 2
CHUNK_BYTES = 32 * 2**20          # a chunk of images is at most about this many bytes


@dataclass
class CacheInfo:
    """What ``cache.json`` says about a cache (``reused``: ``prepare`` found it already complete)."""

    path: Path
    size: int
    mode: str
    n: int
    n_source: int
    n_failed: int
    labels: LabelSpace
    source: str
    fingerprint: str
    status: str = "complete"
    reused: bool = False

    def to_json(self) -> dict:
        return {"format": FORMAT, "size": self.size, "mode": self.mode, "n": self.n, "n_source": self.n_source,
                "n_failed": self.n_failed, "labels": self.labels.to_json(), "source": self.source,
                "fingerprint": self.fingerprint, "status": self.status}

    @classmethod
    def from_json(cls, path: Path, data: dict) -> "CacheInfo":
        return cls(Path(path), int(data["size"]), data["mode"], int(data["n"]), int(data["n_source"]),
                   int(data["n_failed"]), LabelSpace.from_json(data["labels"]), data["source"],
                   data["fingerprint"], data["status"])


# ------------------------------------------------------------------------------------------ prepare

def fingerprint(records: Records) -> str:
    """Identity of a source's content: name, label space, paths and label values (not the images)."""
    h = hashlib.sha1()
    h.update(json.dumps([records.name, records.labels.to_json(), len(records)]).encode())
    h.update("\n".join(records.meta["path"].astype(str)).encode())
    h.update(np.nan_to_num(np.asarray(records.values, dtype=np.float32), nan=-9.0).tobytes())
    return h.hexdigest()[:16]


def prepare(records: Records, out_dir, size: int, mode: str = "pad", workers: int | None = None,
            on_error: str = "skip", progress: bool = True) -> CacheInfo:
    """Decode every image of ``records`` into a cache at ``out_dir`` (see the module docstring).

    ``workers``: decoding processes (forked; threads where fork is unavailable); None = one per CPU
    this process may use; 1 = in this process. ``on_error``: ``skip`` lists unreadable images in
    failed.csv and leaves them out, ``fail`` stops at the first one (what was done so far is kept for a re-run). A complete
    cache of the same source, size and mode is reused as is; one of anything else is an error.
    """
    _check_args(size, mode, on_error, workers)
    out_dir = Path(out_dir)
    key = fingerprint(records)
    try:  # said now, not as a traceback from the lock file or after an hour of decoding
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir.parent, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as exc:
        raise CxrlabError(f"cache folder {out_dir.parent} is not writable ({exc.strerror or exc})") from None
    with cache_lock(out_dir):
        if (out_dir / INFO).is_file():
            return _reuse(out_dir, key, size, mode)
        if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise CxrlabError(f"{out_dir} exists and is not a cxrlab cache; choose another output folder")
        partial = out_dir.with_name(out_dir.name + ".partial")
        info = _build(records, partial, key, size, mode, workers, on_error, progress)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(partial, out_dir)
    info.path = out_dir
    if info.n_failed:
        print(f"prepare: {info.n_failed} of {info.n_source} images could not be read and were skipped; "
              f"see {out_dir / FAILED}", file=sys.stderr)
    return info


def _check_args(size, mode, on_error, workers) -> None:
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise CxrlabError(f"cache size must be an integer >= 8 pixels, got {size!r}")
    if mode not in RESIZE_MODES:
        raise CxrlabError(f"unknown resize mode {mode!r} (valid: {', '.join(RESIZE_MODES)})")
    if on_error not in ON_ERROR:
        raise CxrlabError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    if workers is not None and workers < 1:
        raise CxrlabError(f"workers must be >= 1, got {workers}")


def _reuse(out_dir: Path, key: str, size: int, mode: str) -> CacheInfo:
    info = read_cache_info(out_dir)
    if (info.fingerprint, info.size, info.mode) != (key, size, mode):
        raise CxrlabError(f"{out_dir} already holds a finished cache of another source or size "
                          f"({info.source}, {info.size}px, {info.mode}); it is kept. Choose another output "
                          "folder, or delete that one to rebuild it.")
    info.reused = True
    return info


def _open_partial(partial: Path, records: Records, key: str, size: int, mode: str):
    """The work folder's images and per-image status memmaps: resumed if it is the same job, else new."""
    n = len(records)
    if n == 0:
        raise CxrlabError(f"source {records.name!r} has no images to prepare")
    job = {"format": FORMAT, "status": "partial", "fingerprint": key, "size": size, "mode": mode, "n_source": n}
    shape = (n, size, size)
    if _same_job(partial, job, n * size * size):
        return (np.memmap(partial / IMAGES, np.uint8, "r+", shape=shape),
                np.memmap(partial / STATUS, np.uint8, "r+", shape=(n,)))
    if partial.exists():
        shutil.rmtree(partial)  # an unfinished job of another source or size
    partial.mkdir(parents=True)
    images = np.memmap(partial / IMAGES, np.uint8, "w+", shape=shape)
    status = np.memmap(partial / STATUS, np.uint8, "w+", shape=(n,))
    status.flush()
    (partial / INFO).write_text(json.dumps(job, indent=1))
    return images, status


def _same_job(partial: Path, job: dict, n_bytes: int) -> bool:
    try:
        found = json.loads((partial / INFO).read_text())
        return (found == job and (partial / IMAGES).stat().st_size == n_bytes
                and (partial / STATUS).stat().st_size == job["n_source"])
    except (OSError, ValueError):
        return False


# The job the decoding workers see: set before the pool forks, so records never need pickling
# (their reader may be a lambda).
_JOB: dict = {}


def _decode_chunk(rows: np.ndarray) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode ``rows`` into the images file; returns (rows done, [(row, error)])."""
    job = _JOB
    images = job.get("images")
    if images is None or job.get("pid") != os.getpid():
        images = np.memmap(job["path"], np.uint8, "r+", shape=job["shape"])
        job.update(images=images, pid=os.getpid())
    done, errors = [], []
    for row in rows:
        try:
            images[row] = preprocess_record(job["spec"], job["records"], int(row))
            done.append(row)
        except Exception as exc:  # noqa: BLE001 - every reader failure is reported per image
            errors.append((int(row), f"{type(exc).__name__}: {exc}"))
    images.flush()
    return np.asarray(done, dtype=np.int64), errors


def _build(records: Records, partial: Path, key: str, size: int, mode: str, workers, on_error, progress):
    """Fill the work folder and finish it; the memmaps are closed when this returns."""
    images, status = _open_partial(partial, records, key, size, mode)
    errors = _fill(records, partial, images, status, size, mode, workers, on_error, progress)
    _write_failed(partial, records, errors)
    ok = np.flatnonzero(np.asarray(status) == DONE)
    if len(ok) == 0:
        row = min(errors)
        raise CxrlabError(f"no image of {records.name!r} could be read; the first error: "
                          f"{records.meta['path'].iloc[row]}: {errors[row]}")
    if len(ok) < len(records):
        _compact(images, ok)
    images.flush()
    del images, status
    return _finish(records, partial, ok, key, size, mode)


def _fill(records, partial: Path, images, status, size, mode, workers, on_error, progress) -> dict[int, str]:
    """Decode every image not yet done, chunk by chunk, flushing the status after each chunk;
    returns {row: error} of the images that failed."""
    todo = np.flatnonzero(np.asarray(status) != DONE)
    workers = workers or available_cpus()
    chunk = _chunk_size(len(todo), size, workers)
    chunks = [todo[i:i + chunk] for i in range(0, len(todo), chunk)]
    _JOB.clear()
    _JOB.update(records=records, spec=InputSpec(size, mode), path=str(partial / IMAGES), shape=images.shape,
                images=images, pid=os.getpid())
    errors: dict[int, str] = {}
    bar = Progress(len(records), f"prepare {records.name} {size}px", initial=len(records) - len(todo),
                   enabled=progress)
    try:
        with decoding_pool(workers, len(chunks)) as pool:
            outcomes = map(_decode_chunk, chunks) if pool is None else completed(pool, _decode_chunk, chunks)
            for done, failed in outcomes:
                status[done] = DONE
                for row, message in failed:
                    status[row] = BROKEN
                    errors[row] = message
                status.flush()
                bar.update(len(done) + len(failed))
                if failed and on_error == "fail":
                    row, message = failed[0]
                    raise CxrlabError(f"cannot read image {records.meta['path'].iloc[row]} (row {row + 1}): "
                                      f"{message}; fix it and re-run to continue, or use --on-error skip")
    finally:
        bar.close()
        _JOB.clear()
    return errors


def _chunk_size(n_todo: int, size: int, workers: int) -> int:
    """Images per chunk: about CHUNK_BYTES, at least 4 chunks per worker (progress, resumability),
    16..256 images."""
    return int(max(16, min(256, CHUNK_BYTES // (size * size), -(-n_todo // (4 * workers)))))


def _write_failed(partial: Path, records: Records, errors: dict[int, str]) -> None:
    rows = sorted(errors)
    pd.DataFrame({"path": records.meta["path"].to_numpy()[rows] if rows else [],
                  "error": [errors[r] for r in rows]}).to_csv(partial / FAILED, index=False)


def _finish(records: Records, partial: Path, ok: np.ndarray, key: str, size: int, mode: str) -> CacheInfo:
    """Cut the images file to the kept rows, write the index and cache.json, drop the status file."""
    with open(partial / IMAGES, "r+b") as f:
        f.truncate(len(ok) * size * size)
    _index(records, ok).to_csv(partial / INDEX, index=False)
    info = CacheInfo(partial, size, mode, len(ok), len(records), len(records) - len(ok), records.labels,
                     records.name, key)
    (partial / STATUS).unlink()
    (partial / INFO).write_text(json.dumps(info.to_json(), indent=1))
    return info


def _compact(images: np.memmap, keep: np.ndarray) -> None:
    """Move the kept rows down over the failed ones, in place (each row moves to a lower index)."""
    for dest, src in enumerate(keep):
        if dest != src:
            images[dest] = images[src]


def _index(records: Records, rows: np.ndarray) -> pd.DataFrame:
    meta = records.meta.iloc[rows].reset_index(drop=True)
    clash = [name for name in records.labels.names if name in meta.columns]
    if clash:
        raise CxrlabError(f"label names {clash} clash with meta columns of {records.name!r}")
    values = pd.DataFrame(np.asarray(records.values, dtype=np.float32)[rows], columns=list(records.labels.names))
    return pd.concat([meta, values], axis=1)


# ------------------------------------------------------------------------------------------ opening

def read_cache_info(cache_dir) -> CacheInfo:
    """``cache.json`` of a finished cache, with errors that say what to do."""
    cache_dir = Path(cache_dir)
    path = cache_dir / INFO
    if not path.is_file():
        partial = cache_dir.with_name(cache_dir.name + ".partial")
        hint = (f"; an unfinished one is in {partial}: run prepare again to finish it" if partial.is_dir()
                else "; create one with `cxrlab prepare`")
        raise CxrlabError(f"{cache_dir} is not a prepared cache (no {INFO}){hint}")
    try:
        data = json.loads(path.read_text())
        info = CacheInfo.from_json(cache_dir, data)
    except (ValueError, KeyError, TypeError) as exc:
        raise CxrlabError(f"{path} is not a valid cache description: {type(exc).__name__}: {exc}") from None
    if data.get("format") != FORMAT or info.status != "complete":
        raise CxrlabError(f"{path}: unsupported cache format {data.get('format')!r} or status {info.status!r}")
    return info


def open_cache(cache_dir) -> tuple[np.memmap, pd.DataFrame, LabelSpace, CacheInfo]:
    """(images N×size×size read-only memmap, index, label space, info) of a finished cache, checked:
    a truncated ``images.u8`` or an index of the wrong length is an error naming the file."""
    cache_dir = Path(cache_dir)
    info = read_cache_info(cache_dir)
    path = cache_dir / IMAGES
    expected = info.n * info.size * info.size
    found = path.stat().st_size if path.is_file() else None
    if found != expected:
        raise CxrlabError(f"{path} is {'missing' if found is None else f'{found} bytes'}, expected {expected} "
                          f"({info.n}×{info.size}×{info.size}): the cache is truncated or corrupt; "
                          "delete the folder and prepare it again")
    index = _read_index(cache_dir / INDEX, info.labels)
    if len(index) != info.n:
        raise CxrlabError(f"{cache_dir / INDEX} has {len(index)} rows, expected {info.n}; "
                          "delete the folder and prepare it again")
    images = np.memmap(path, np.uint8, "r", shape=(info.n, info.size, info.size))
    return images, index, info.labels, info


def _read_index(path: Path, labels: LabelSpace) -> pd.DataFrame:
    """Meta columns as strings (patient id "00012" stays that), label columns as floats with NaN."""
    try:
        columns = list(pd.read_csv(path, nrows=0).columns)
        missing = [n for n in labels.names if n not in columns]
        if missing:
            raise CxrlabError(f"{path} lacks the label columns {missing}")
        meta = [c for c in columns if c not in labels.names]
        return pd.read_csv(path, dtype={**{c: str for c in meta}, **{n: np.float32 for n in labels.names}},
                           keep_default_na=False, na_values={n: [""] for n in labels.names})
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise CxrlabError(f"cannot read cache index {path}: {type(exc).__name__}: {exc}") from None
