"""The decoding pool of ``prepare``: forked worker processes (threads where fork is unavailable) that
die with the process that started them (Linux: ``PR_SET_PDEATHSIG``), so a ``kill -9`` or an OOM kill
of ``prepare`` leaves no orphan holding memory or the cache lock."""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed

from .locking import drop_inherited_locks


def available_cpus() -> int:
    """The cores this process may run on (its affinity mask: a container's or a job's share, which
    ``os.cpu_count`` ignores)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def completed(pool: Executor, fn, chunks):
    """``fn(chunk)`` of every chunk, in the order they finish."""
    for future in as_completed([pool.submit(fn, chunk) for chunk in chunks]):
        yield future.result()


@contextlib.contextmanager
def decoding_pool(workers: int, n_chunks: int):
    """None (decode here) for one worker or one chunk; else forked processes, or threads without fork."""
    if workers <= 1 or n_chunks <= 1:
        yield None
        return
    workers = min(workers, n_chunks)
    pool: Executor
    if "fork" in multiprocessing.get_all_start_methods():
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_worker_init, initargs=(os.getpid(),))
    else:  # pragma: no cover - Windows / macOS defaults
        pool = ThreadPoolExecutor(workers)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_init(parent: int) -> None:
    """In each forked decoding worker: die with the parent (a ``kill -9`` or OOM kill of ``prepare``
    must not leave orphans), and drop the inherited cache lock so only the parent holds it."""
    drop_inherited_locks()
    die_with_parent(parent)


def die_with_parent(parent: int) -> None:
    """Called in a worker process: have the kernel kill it when ``parent`` dies (Linux:
    ``PR_SET_PDEATHSIG``), and exit now if the parent is already gone. Elsewhere a no-op beyond that check
    (the training loader's workers then fall back on torch's own check every few seconds)."""
    if sys.platform.startswith("linux"):
        import ctypes  # lazy: Linux only
        import signal  # lazy: Linux only

        PR_SET_PDEATHSIG = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above: nobody will be told
        os._exit(1)


