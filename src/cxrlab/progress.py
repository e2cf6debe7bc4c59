"""What a long step says while it works, on stderr, for every command alike: on a terminal a tqdm bar;
anywhere else (a log file, a batch job, CI), where a bar would be one endless line of carriage returns
or nothing at all, one plain line every ``$CXRLAB_PROGRESS_EVERY`` seconds (default 30) with the count,
the rate, the time left and whatever the step adds (the trainer: its running loss).

Also ``plural``, so a message counts "1 row" and "2 rows". Nothing here imports torch: the ONNX
prediction path uses it too."""
from __future__ import annotations

import math
import os
import sys
import time

from .errors import CxrlabError

EVERY_ENV = "CXRLAB_PROGRESS_EVERY"
DEFAULT_EVERY = 30.0


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 row``, ``2 rows``, ``1,500 images``, ``3 studies`` (with ``words`` given)."""
    return f"{n:,} {word if n == 1 else (words or word + 's')}"


def progress_every() -> float:
    """Seconds between two progress lines outside a terminal: ``$CXRLAB_PROGRESS_EVERY`` or 30."""
    text = os.environ.get(EVERY_ENV, "").strip()
    if not text:
        return DEFAULT_EVERY
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise CxrlabError(f"{EVERY_ENV}={text!r}: expected a number of seconds > 0, e.g. 30")
    return value


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Progress of one step over ``total`` units (``unit``: ``img``, ``batch``, ...; ``units`` its plural,
    guessed when not given), counted with
    ``update(n, **extra)``; ``extra`` values (floats are shown to 4 significant digits) go at the end of
    the line. ``enabled=False`` says nothing (a quiet command, a DDP rank other than the first).

    Outside a terminal a line ``desc: 120/400 img (30 %), 41.2 img/s, ETA 7 s, loss 0.3121`` comes at
    most every ``every`` seconds (default ``progress_every()``), and a closing ``desc: done, ... in 12 s``
    only when such a line was printed, so a step shorter than the interval adds nothing to a log."""

    def __init__(self, total: int, desc: str, unit: str = "img", enabled: bool = True, initial: int = 0,
                 every: float | None = None, stream=None, units: str | None = None):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.units = units or _plural_unit(unit)
        self.stream = stream if stream is not None else sys.stderr
        self.every = progress_every() if every is None else float(every)
        self.count = self.start_count = int(initial)
        self.extra: dict = {}
        self.start = self.last = time.perf_counter()
        self.lines = 0
        self.bar = None
        self.enabled = enabled
        if enabled and is_terminal(self.stream):
            from tqdm.auto import tqdm  # lazy: only a terminal shows a bar

            self.bar = tqdm(total=self.total, initial=initial, desc=desc, unit=unit, leave=False,
                            dynamic_ncols=True, file=self.stream)

    def update(self, n: int = 1, **extra) -> None:
        self.count += n
        self.extra.update(extra)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if extra:
                self.bar.set_postfix({k: _show(v) for k, v in self.extra.items()}, refresh=False)
            return
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self._say(self.line(now))

    def line(self, now: float | None = None) -> str:
        """The progress line as it would be printed now."""
        now = time.perf_counter() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        done = self.count - self.start_count
        rate = done / elapsed
        parts = [f"{self.count:,}/{self.total:,} {self.units}"
                 + (f" ({100 * self.count / self.total:.0f} %)" if self.total else ""), f"{_rate(rate)} {self.unit}/s"]
        if rate > 0 and self.total > self.count:
            parts.append(f"ETA {duration((self.total - self.count) / rate)}")
        parts += [f"{k} {_show(v)}" for k, v in self.extra.items()]
        return f"{self.desc}: " + ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.lines:
            elapsed = time.perf_counter() - self.start
            self._say(f"{self.desc}: done, {self.count:,} {self.units} in {duration(elapsed)}")
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _say(self, text: str) -> None:
        self.lines += 1
        print(text, file=self.stream, flush=True)


def _plural_unit(unit: str) -> str:
    if unit == "img":  # an abbreviation, as tqdm writes it
        return unit
    return unit + ("es" if unit.endswith(("ch", "sh", "s", "x")) else "s")


def _rate(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _show(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
