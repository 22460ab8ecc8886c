"""measure_batch_tokens: the start-up measurement of the padded tokens per model call, on a fake clock (each
fake model call advances it by a chosen cost curve), so the choice is exact and the test is not timed."""

from __future__ import annotations

import pytest

from server import batching
from server.batching import measure_batch_tokens


class FakeModel:
    """run() advances the fake clock by cost(tokens) seconds (the first call of each shape 10× slower: cold)."""

    def __init__(self, cost, monkeypatch):
        self.now, self.cost, self.calls, self.seen = 0.0, cost, [], set()
        monkeypatch.setattr(batching.time, "perf_counter", lambda: self.now)

    def run(self, input_ids, attention_mask, token_type_ids):
        tokens = input_ids.size
        self.calls.append(input_ids.shape)
        self.now += self.cost(tokens) * (10 if input_ids.shape not in self.seen else 1)
        self.seen.add(input_ids.shape)
        return {}


def u_shaped(best: int):
    """seconds per call: per-token time lowest at `best` tokens, ≥ 10% higher at half or double it."""
    return lambda n: n * 1e-5 * (1 + 0.15 * abs(n / best - 1) ** 0.5)


@pytest.mark.parametrize("best", [256, 512, 1024, 4096])
def test_picks_the_size_fastest_per_token(best, monkeypatch):
    model = FakeModel(u_shaped(best), monkeypatch)
    tokens, rate = measure_batch_tokens(model.run, 0, 512, 64, max_batch_s=10.0)
    assert tokens == best
    assert rate == pytest.approx(u_shaped(best)(best) / best)
    assert all(shape[1] == 128 for shape in model.calls)  # rows of 128 tokens


def test_prefers_the_largest_size_within_tolerance(monkeypatch):
    flat = {256: 1.04, 512: 1.0, 1024: 1.04, 2048: 1.06, 4096: 1.03}  # per-token cost, relative
    model = FakeModel(lambda n: n * 1e-5 * flat[n], monkeypatch)
    assert measure_batch_tokens(model.run, 0, 512, 64, max_batch_s=10.0)[0] == 4096  # 1.03 ≤ 1.05 × 1.0
    flat[4096] = 1.07
    assert measure_batch_tokens(model.run, 0, 512, 64, max_batch_s=10.0)[0] == 1024  # 2048 and 4096 over


def test_stops_past_the_batch_time_and_at_the_row_cap(monkeypatch):
    model = FakeModel(lambda n: n * 1e-4, monkeypatch)  # 1024 tokens: 0.1024 s > max_batch_s
    assert measure_batch_tokens(model.run, 0, 512, 64, max_batch_s=0.1)[0] == 1024  # all equal: largest tried
    assert {shape[0] for shape in model.calls} == {2, 4, 8}  # 4096 and 2048 never tried
    model = FakeModel(lambda n: n * 1e-5 / n**0.1, monkeypatch)  # bigger is always better
    tokens, _ = measure_batch_tokens(model.run, 0, 16, 5, max_batch_s=10.0)  # short rows, 5 rows at most
    assert tokens == 5 * 16 and {shape for shape in model.calls} == {(5, 16)}


@pytest.mark.parametrize("rounds", [1, 3])
def test_a_slow_stretch_of_the_machine_does_not_decide(rounds, monkeypatch):
    """Another process takes the core for a while: every call in 0.1 s of fake time from the best size's
    first (cold) call runs 1.5× slower. Timed once per size, the stretch decides; timed side by side in
    rounds, each size's fastest call is outside it and the best size wins."""
    curve = u_shaped(512)
    model = FakeModel(curve, monkeypatch)
    stretch: list[float] = []  # its start

    def run(input_ids, attention_mask, token_type_ids):
        if input_ids.size == 512 and not stretch:
            stretch.append(model.now)
        started = model.now
        model.run(input_ids, attention_mask, token_type_ids)
        if stretch and started < stretch[0] + 0.1:
            model.now += 0.5 * (model.now - started)

    tokens, rate = measure_batch_tokens(run, 0, 512, 64, max_batch_s=10.0, rounds=rounds)
    if rounds == 1:
        assert tokens != 512
    else:
        assert (tokens, rate) == (512, pytest.approx(curve(512) / 512))
