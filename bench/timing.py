"""Side-by-side timing for the benchmarks: two variants' calls alternating in one process, so that a slow spell of
the machine (this project's 2-core VMs have them) hits both alike; report the median of the paired ratios."""

from __future__ import annotations

import time


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired_times(first, second, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of `repeats` calls of each, alternating, after two warm-up calls each."""
    for _ in range(2):
        first(), second()
    pairs = [(seconds(first), seconds(second)) for _ in range(repeats)]
    return [a for a, _ in pairs], [b for _, b in pairs]
