"""Timing shared by the bench scripts (run as scripts, so this folder is on sys.path)."""

from __future__ import annotations

import statistics
import time


def median_ms(fn, runs: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``runs`` calls, in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)
