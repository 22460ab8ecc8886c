"""Importance scores against the literal definition (one example per backward, w·∇w from autograd),
and the distillation losses against hand-written formulas."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from moebert.loading import load_model
from training.distill import hidden_mse, prediction_loss, symmetric_kl
from training.importance import importance_batch_of_one, importance_closed_form


def collate(items):
    T = max(len(i["input_ids"]) for i in items)
    pad = lambda t: torch.nn.functional.pad(t, (0, T - len(t)))
    batch = {k: torch.stack([pad(i[k]) for i in items]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    for key in ("labels", "start_positions", "end_positions"):
        if key in items[0]:
            batch[key] = torch.stack([i[key] for i in items])
    return batch


def make_items(tokenizer, kind, n=7):
    texts = ["a gorgeous, witty, seductive movie.", "dull", "it never comes alive, sadly", "fine", "What is it?",
             "the best film of the year, by far", "meh"]  # fmt: skip
    items = []
    for i, text in enumerate(texts[:n]):
        enc = tokenizer(text)
        item = {k: torch.tensor(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}
        L = len(enc["input_ids"])
        if kind == "qa":
            item["start_positions"] = torch.tensor(i % L)
            item["end_positions"] = torch.tensor(min(L - 1, i % L + 1))
        elif kind == "regression":
            item["labels"] = torch.tensor(0.3 * i)
        else:
            item["labels"] = torch.tensor(i % 3)
        items.append(item)
    return items


@pytest.mark.parametrize("kind", ["classification", "regression", "qa"])
def test_closed_form_importance_equals_batch_of_one(kind, tiny_cls_dir, tiny_qa_dir, tokenizer):
    if kind == "qa":
        model = load_model(tiny_qa_dir)
    elif kind == "regression":
        model = load_model(tiny_cls_dir, num_labels=1)
    else:
        model = load_model(tiny_cls_dir)
    model = model.double()
    items = make_items(tokenizer, kind)
    fast = importance_closed_form(model, DataLoader(items, batch_size=3, collate_fn=collate))
    slow = importance_batch_of_one(model, items, collate)
    assert len(fast) == 3 and fast[0].shape == (84,)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
        assert (a > 0).all()
    # Per-example absolute values: scoring the same data as one batch gives the same numbers.
    one_batch = importance_closed_form(model, DataLoader(items, batch_size=7, collate_fn=collate))
    torch.testing.assert_close(one_batch[1], fast[1], rtol=1e-5, atol=1e-9)


def test_importance_is_not_the_batch_summed_gradient(tiny_cls_dir, tokenizer):
    """|Σ_examples| ≠ Σ|per example|: the batch-summed quantity is different (and smaller)."""
    model = load_model(tiny_cls_dir).double()
    items = make_items(tokenizer, "classification")
    per_example = importance_closed_form(model, DataLoader(items, batch_size=7, collate_fn=collate))[0]
    model.zero_grad()
    from training.importance import per_example_loss

    per_example_loss(model, collate(items)).sum().backward()
    layer = model.bert.encoder.layer[0]
    w1, w2 = layer.intermediate.dense.weight, layer.output.dense.weight
    summed = ((w1 * w1.grad).sum(1) + (w2 * w2.grad).sum(0)).abs()
    assert (summed <= per_example.double() + 1e-9).all() and not torch.allclose(summed, per_example.double())


def test_symmetric_kl_formula():
    s, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    p, q = s.softmax(-1), t.softmax(-1)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1).mean()
    torch.testing.assert_close(symmetric_kl(s, t).double(), (kl(p, q) + kl(q, p)) / 2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(symmetric_kl(s, t), symmetric_kl(t, s))
    assert symmetric_kl(s, s).abs() < 1e-6


def test_hidden_mse_ignores_padding():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    hs = [torch.randn(2, 4, 5) for _ in range(3)]
    ht = [torch.randn(2, 4, 5) for _ in range(3)]
    base = hidden_mse(hs, ht, mask)
    for h in hs:
        h[~mask.bool()] = 1e3  # garbage at padding positions
    torch.testing.assert_close(hidden_mse(hs, ht, mask), base)
    expected = sum(((a - b)[mask.bool()] ** 2).mean() for a, b in zip(hs, ht, strict=True))
    torch.testing.assert_close(base, expected)


def test_qa_prediction_loss_masks_padding():
    class Out:
        def __init__(self, s, e):
            self.start_logits, self.end_logits = s, e

    mask = torch.tensor([[1, 1, 1, 0, 0]])
    s1, e1, s2, e2 = (torch.randn(1, 5) for _ in range(4))
    base = prediction_loss(Out(s1, e1), Out(s2, e2), mask)
    s1[0, 3:] = 50.0  # padding logits must not matter
    torch.testing.assert_close(prediction_loss(Out(s1, e1), Out(s2, e2), mask), base)
    expected = (symmetric_kl(s1[:, :3], s2[:, :3]) + symmetric_kl(e1[:, :3], e2[:, :3])) / 2
    torch.testing.assert_close(base, expected, rtol=1e-5, atol=1e-6)
