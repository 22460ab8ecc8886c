"""The training loop's throughput and robustness parts: length-grouped batches, autocast choice, the
resumable run state, and attention dropout kept apart from expert dropout."""

from __future__ import annotations

import random

import pytest
import torch

from moebert.convert import ConvertConfig, convert
from moebert.loading import load_model
from moebert.precision import native_bf16
from training.datasets import load_split, tokenizer_for
from training.finetune import task_loss
from training.loop import OptimConfig, autocast_dtype, fit
from training.sampling import TrainBatches
from training.stages import resume_folder, stage_output
from training.tasks import DataConfig
from training.train_state import STATE_DIR


def sentence_lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([3, 5, 8, 13, 21, 40, 66]) + rng.randrange(4) for _ in range(n)]


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("n, batch_size", [(1, 4), (257, 8), (1000, 32)])
def test_batches_cover_every_item_once(group, n, batch_size):
    batches = TrainBatches(sentence_lengths(n), batch_size, seed=3, group_by_length=group, mega_batches=5)
    epoch0 = batches.epoch_batches(0)
    assert sorted(i for b in epoch0 for i in b) == list(range(n))
    assert len(epoch0) == len(batches) and all(1 <= len(b) <= batch_size for b in epoch0)
    assert batches.epoch_batches(0) == epoch0  # a pure function of (seed, epoch): resumable
    if n > batch_size:
        assert batches.epoch_batches(1) != epoch0


def test_grouping_cuts_padding_and_keeps_the_order_random():
    lengths = sentence_lengths(4000)
    grouped = TrainBatches(lengths, 32, group_by_length=True)
    shuffled = TrainBatches(lengths, 32, group_by_length=False)
    assert grouped.padded_tokens() < 0.6 * shuffled.padded_tokens()
    first = [max(lengths[i] for i in b) for b in grouped.epoch_batches(0)[:20]]
    assert first != sorted(first) and first != sorted(first, reverse=True)  # batch order is shuffled


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_equal_disjoint_shares(world):
    lengths = sentence_lengths(101)
    shares = [TrainBatches(lengths, 4, rank=r, world_size=world).epoch_batches(0) for r in range(world)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == len(TrainBatches(lengths, 4, world_size=world))
    seen = [i for s in shares for b in s for i in b]
    assert set(seen) == set(range(101))  # every item (a few twice: the padding batches)


def test_autocast_choice():
    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("auto", cpu) is (torch.bfloat16 if native_bf16(cpu) else None)
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32"):
        OptimConfig(precision="fp16")


@pytest.fixture
def tiny_moe(tiny_cls_dir, tmp_path):
    return convert(ConvertConfig(teacher=str(tiny_cls_dir), output_dir=str(tmp_path / "moe"), split="random",
                                 expert_dim=21, shared_dim=7))  # fmt: skip


def encoded(model_dir, custom_data):
    train, _ = custom_data
    data = DataConfig(task="custom", data_dir=str(train), max_length=32)
    return load_split(data.spec(), train, tokenizer_for(str(model_dir)), max_length=32, training=True)


def test_attention_dropout_leaves_expert_dropout_alone(tiny_moe, custom_data, tmp_path):
    model = load_model(tiny_moe)
    expert_rates = {m.expert_dropout_p for m in model.modules() if hasattr(m, "expert_dropout_p")}
    assert expert_rates == {0.1}
    opt = OptimConfig(epochs=1, batch_size=8, max_steps=1, attention_dropout=0.0)
    fit(model, encoded(tiny_moe, custom_data), opt, task_loss, None, "accuracy", lambda m, x: None, tmp_path / "log")
    assert {m.attention_dropout_p for m in model.modules() if hasattr(m, "attention_dropout_p")} == {0.0}
    assert {m.expert_dropout_p for m in model.modules() if hasattr(m, "expert_dropout_p")} == {0.1}


def test_bf16_autocast_trains_an_moe(tiny_moe, custom_data, tmp_path):
    model = load_model(tiny_moe)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = OptimConfig(epochs=1, batch_size=8, max_steps=2, precision="bf16")
    fit(model, encoded(tiny_moe, custom_data), opt, task_loss, None, "accuracy", lambda m, x: None, tmp_path / "log")
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype for k, v in before.items())  # fp32 master weights
    assert any(not torch.equal(after[k], v) for k, v in before.items() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


class Interrupt(Exception):
    pass


def test_an_interrupted_run_resumes_where_it_stopped(tiny_moe, custom_data, tmp_path):
    """Killed after 5 of 9 steps, a rerun continues from the saved state and ends with exactly the weights
    of an uninterrupted run (same batches, optimizer moments, schedule and dropout RNG)."""
    data = encoded(tiny_moe, custom_data)
    opt = OptimConfig(epochs=3, batch_size=8, lr=1e-3, checkpoint_minutes=1e-9, seed=1)  # state after every step

    def run(out, stop_after=None):
        calls = {"n": 0}

        def loss(model, batch):
            calls["n"] += 1
            if stop_after is not None and calls["n"] > stop_after:
                raise Interrupt
            return task_loss(model, batch)

        model = load_model(tiny_moe)
        state = resume_folder(out, "fp0") / STATE_DIR
        with stage_output(out, "test", "fp0", {}, resumable=True) as tmp:
            result = fit(model, data, opt, loss, lambda m: {"accuracy": 50.0}, "accuracy",
                         lambda m, x: m.save_pretrained(tmp), tmp, resume_dir=state)  # fmt: skip
        return model, result, calls["n"]

    reference, ref_result, _ = run(tmp_path / "straight")
    assert ref_result["steps"] == 9
    with pytest.raises(Interrupt):
        run(tmp_path / "resumed", stop_after=5)
    assert (resume_folder(tmp_path / "resumed", "fp0") / STATE_DIR / "state.json").is_file()
    assert not (tmp_path / "resumed").exists()  # not published half-done
    resumed, result, calls = run(tmp_path / "resumed")
    assert calls == 4 and result["steps"] == 9 and len(result["history"]) == 3
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert (tmp_path / "resumed" / "stage.json").is_file() and not (tmp_path / "resumed" / STATE_DIR).exists()
    assert not resume_folder(tmp_path / "resumed", "fp0").exists()
