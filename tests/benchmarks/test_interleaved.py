"""benchmarks/interleaved.py: each round calls every runner once, in turn, after the untimed warm-up."""

from __future__ import annotations

from interleaved import time_interleaved


class Recorder:
    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def run(self, *inputs):
        self.calls.append((self.name, inputs))


def test_rounds_interleave_every_runner_after_warmup():
    calls: list = []
    runners = {"a": Recorder("a", calls), "b": Recorder("b", calls)}
    times = time_interleaved(runners, (1, 2), rounds=3, warmup=2)
    assert [name for name, _ in calls] == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert all(inputs == (1, 2) for _, inputs in calls)
    assert set(times) == {"a", "b"} and all(len(t) == 3 and min(t) >= 0 for t in times.values())
