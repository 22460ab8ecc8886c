"""Timing several runners side by side: every round calls each once, in turn, on the same inputs, so machine
noise (this VM drifts by ±10% over seconds) hits all alike. Shared by the benchmarks that compare backends,
models or graphs in one run."""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping


def time_interleaved(runners: Mapping[Hashable, object], inputs: tuple, rounds: int, warmup: int = 1) -> dict:
    """{key: [seconds per call] × rounds} for runners with .run(*inputs), after `warmup` untimed calls each."""
    for runner in runners.values():
        for _ in range(warmup):
            runner.run(*inputs)
    times = {key: [] for key in runners}
    for _ in range(rounds):
        for key, runner in runners.items():
            start = time.perf_counter()
            runner.run(*inputs)
            times[key].append(time.perf_counter() - start)
    return times
