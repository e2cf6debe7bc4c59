"""Process locking for ``prepare``: one preparer per cache folder, a lock whose holder is gone is taken
over, and the lock names its holder (pid, host, start time) so a waiting run can say for whom it waits.

The lock is a hidden ``.<out>.lock`` file beside the cache, held with ``flock``; decoding workers
forked while it is held drop their copy (:func:`drop_inherited_locks`), so a worker that outlives a
killed parent cannot keep it.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path

# file descriptors of the cache locks this process holds: forked decoding workers close their copies,
# so that a worker outliving a killed parent cannot keep the lock
HELD_LOCKS: set[int] = set()
LOCK_POLL_S = 0.5


@contextlib.contextmanager
def cache_lock(out_dir: Path):
    """An exclusive lock on ``.<out>.lock`` beside the cache (POSIX only; elsewhere concurrent preparers
    are not guarded), with its holder's ``pid host start-time`` written in it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = out_dir.with_name(f".{out_dir.name}.lock")
    told = False
    while True:
        handle = open(path, "a+")  # not "w": that would erase the holder's pid before we know it
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(path)
            if (holder is not None and holder["host"] == socket.gethostname()
                    and not pid_alive(holder["pid"], holder["started"])):
                print(f"prepare: taking over the lock {path}: its holder, process {holder['pid']}, is gone "
                      "(something it started still held the lock file)", file=sys.stderr)
                if _same_file(handle, path):  # not one a concurrent taker-over has just made
                    path.unlink(missing_ok=True)
                handle.close()
                continue
            if not told:
                who = (f"process {holder['pid']} on {holder['host']} (since {holder['since']})" if holder
                       else "another process")
                print(f"prepare: waiting for {who}, which is preparing {out_dir} (lock {path})", file=sys.stderr)
                told = True
            handle.close()
            time.sleep(LOCK_POLL_S)
            continue
        if not _same_file(handle, path):  # we locked a file a taker-over unlinked: lock the new one
            handle.close()
            continue
        break
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')} "
                 f"{_start_ticks(os.getpid())}\n")
    handle.flush()
    HELD_LOCKS.add(handle.fileno())
    try:
        yield
    finally:
        HELD_LOCKS.discard(handle.fileno())
        handle.truncate(0)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def lock_holder(path: Path) -> dict | None:
    """``{"pid", "host", "since", "started"}`` written in a lock file by its holder, or None (empty,
    unreadable). ``started``: the holder's start time in clock ticks (Linux), so a reused pid is not
    mistaken for the holder; None when not recorded."""
    try:
        fields = Path(path).read_text().split()
        started = int(fields[3]) if len(fields) > 3 and fields[3].isdigit() else None
        return {"pid": int(fields[0]), "host": fields[1], "since": fields[2], "started": started}
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int, started: int | None = None) -> bool:
    """Whether a process exists on this machine (a zombie, dead but not yet reaped, counts as gone; so
    does a process that took over the pid after ``started``, its original's start time)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True  # no /proc: trust the signal check
    if stat[0] in ("Z", "X"):
        return False
    return started is None or int(stat[19]) == started


def _start_ticks(pid: int) -> str:
    """A process's start time since boot in clock ticks (field 22 of /proc/PID/stat), "" without /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _same_file(handle, path: Path) -> bool:
    try:
        return os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False




def drop_inherited_locks() -> None:
    """In a forked child: close the copies of the parent's lock files, so only the parent holds them."""
    for fd in list(HELD_LOCKS):
        with contextlib.suppress(OSError):
            os.close(fd)
    HELD_LOCKS.clear()
