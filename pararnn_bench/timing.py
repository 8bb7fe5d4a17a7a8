"""Side-by-side timing: every variant measured in the same run, interleaved.

Machines are noisy (shared machines especially), so figures that are compared
are measured in one run, round-robin: each round runs every variant once, and a
variant's figure is the minimum (default) or the median over the rounds. The
minimum estimates the uncontended cost; the median is kept beside it. Each
variant is a zero-argument callable that has finished its work when it returns
(it synchronises the device itself: ``torch.cuda.synchronize`` or ``mx.eval``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

ESTIMATORS = ("min", "median")


@dataclass
class Timing:
    name: str
    median_ms: float
    min_ms: float
    samples_ms: list[float]

    def ms(self, estimator: str) -> float:
        return self.min_ms if estimator == "min" else self.median_ms


def compare(variants: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, Timing]:
    """Run each variant ``warmup`` times, then ``repeats`` rounds interleaving the variants."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: Timing(name, statistics.median(s), min(s), s) for name, s in samples.items()}
