"""Shared timing loop of the benchmarks: variants timed in interleaved, rotated order so drift in machine
load hits all of them alike."""
from __future__ import annotations

import time


def interleaved_ms_per_step(runs: dict, steps: int, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """``runs``: name → object with ``run(steps)``. Returns name → ms/step of each repeat."""
    for step in runs.values():  # warm-up (allocator, first-call overheads)
        step.run(warmup)
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            runs[name].run(steps)
            times[name].append((time.perf_counter() - start) / steps * 1000)
    return times


def add_timing_args(parser) -> None:
    """The options every step-time benchmark takes."""
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
