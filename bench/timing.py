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


def timed_report(measure, markdown, *, as_json: bool) -> dict:
    """Run ``measure()`` (a dict of figures), add its wall time and the load average before and after, print it as
    JSON or through ``markdown(figures)``, and the time and load on stderr; the figures."""
    import json
    import os
    import sys

    load_before, started = os.getloadavg()[0], time.perf_counter()
    figures = measure()
    figures["seconds"] = time.perf_counter() - started
    figures["load_average"] = (load_before, os.getloadavg()[0])
    print(json.dumps(figures, indent=2) if as_json else markdown(figures))
    print(f"{figures['seconds']:.0f} s; load average (1 min) before / after: {figures['load_average'][0]:.1f} / "
          f"{figures['load_average'][1]:.1f} on {os.cpu_count()} cores", file=sys.stderr)
    return figures
