"""The padded token layout (every token through the FFNs, no boolean indexing, no host synchronisation: the
CUDA path, and what a CUDA graph captures) against the packed layout (non-padding tokens only: the CPU path
and the reference), on tiny random MoEBERTs of odd sizes, every routing method, with and without padding.

Tolerance: fp32 on the CPU, |padded - packed| ≤ 1e-5 + 1e-5·|packed| for hidden states and logits at
non-padding positions (only the summation order differs: a masked SDPA vs none, pooling as a masked sum vs
index_add); expert counts exactly equal. Padding positions are left as the attention output in both.
"""

from __future__ import annotations

import pytest
import torch

from moebert.modeling import expert_histogram, switch_balance_loss
from tests.tiny_moebert import batch, tiny_model

TOL = dict(rtol=1e-5, atol=1e-5)
ROUTES = ["hash-random", "hash-balance", "gate-token", "gate-sentence"]


def run(model, layout: str, inputs: dict, **kw):
    model.set_token_layout(layout)
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True, output_expert_counts=model.config.is_moe, **kw)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "lengths", [[7, 3, 11, 1, 5], [9, 9], [1], [13, 2, 13]], ids=["mixed", "no-padding", "one-token", "two-full"]
)
def test_padded_layout_equals_packed(route, lengths):
    model = tiny_model(route)
    inputs = batch(lengths)
    packed, padded = run(model, "packed", inputs), run(model, "padded", inputs)
    torch.testing.assert_close(padded.logits, packed.logits, **TOL)
    valid = inputs["attention_mask"].bool()
    for ours, want in zip(padded.hidden_states, packed.hidden_states, strict=True):
        torch.testing.assert_close(ours[valid], want[valid], **TOL)
        torch.testing.assert_close(ours[~valid], want[~valid], **TOL)  # padding: the attention output, in both
    torch.testing.assert_close(padded.expert_counts, packed.expert_counts, rtol=0, atol=0)
    assert int(padded.expert_counts.sum()) == int(valid.sum()) * 2  # real tokens only, in each of 2 MoE layers
    if route.startswith("gate"):
        torch.testing.assert_close(padded.router_aux_loss, packed.router_aux_loss, **TOL)


@pytest.mark.parametrize("route", ["hash-random", "gate-token"])
def test_padded_layout_qa_dense_and_reference_backend(route):
    """QA heads (per-token logits, padding masked), a dense teacher, and the reference backend."""
    inputs = batch([6, 17, 2], T=19, seed=3)
    valid = inputs["attention_mask"].bool()
    for model in (tiny_model(route, "qa", seed=1), tiny_model(route, "qa", moe_layers=(), seed=2)):
        model.set_moe_backend("reference")
        packed, padded = run(model, "packed", inputs), run(model, "padded", inputs)
        for name in ("start_logits", "end_logits"):
            torch.testing.assert_close(getattr(padded, name)[valid], getattr(packed, name)[valid], **TOL)
            assert bool((getattr(padded, name)[~valid] == -1e4).all())


def test_padded_layout_training_loss_and_gradients():
    """The balance loss and its gradients (training with gated routing) agree as well."""
    inputs = batch([5, 12, 8], seed=4)
    labels = torch.tensor([0, 2, 1])
    grads = {}
    for layout in ("packed", "padded"):
        model = tiny_model("gate-token", seed=5).train()
        model.config.expert_dropout = 0.0
        for m in model.modules():
            if hasattr(m, "expert_dropout_p"):
                m.expert_dropout_p = 0.0
        model.set_token_layout(layout)
        out = model(**inputs, labels=labels)
        out.loss.backward()
        grads[layout] = (
            out.loss.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )
    torch.testing.assert_close(grads["padded"][0], grads["packed"][0], **TOL)
    assert grads["padded"][1].keys() == grads["packed"][1].keys()
    for name, g in grads["packed"][1].items():
        torch.testing.assert_close(grads["padded"][1][name], g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("route", ["gate-sentence", "hash-random"])
def test_an_empty_filler_row_changes_nothing(route):
    """A CUDA-graph bucket fills a batch up with rows of no tokens: they stay finite, count no tokens, and
    the real rows' outputs are those of the batch without them."""
    model = tiny_model(route, seed=6)
    real = batch([4, 9, 6], T=12, seed=6)
    filled = {k: torch.cat([v, torch.zeros(2, 12, dtype=v.dtype)]) for k, v in real.items()}
    want, got = run(model, "packed", real), run(model, "padded", filled)
    assert bool(torch.isfinite(got.logits).all())
    torch.testing.assert_close(got.logits[:3], want.logits, **TOL)
    torch.testing.assert_close(got.expert_counts, want.expert_counts, rtol=0, atol=0)


def test_auto_layout_is_packed_on_cpu_and_names_are_checked(monkeypatch):
    model = tiny_model("hash-random")
    assert model.bert.token_layout == "auto"
    calls = []
    original = type(model.bert)._packed_layout
    monkeypatch.setattr(type(model.bert), "_packed_layout", staticmethod(lambda *a: calls.append(1) or original(*a)))
    run(model, "auto", batch([3, 5]))
    assert calls == [1]
    with pytest.raises(ValueError, match="unknown token layout 'sparse'"):
        model.set_token_layout("sparse")


def test_weighted_balance_loss_and_histogram_match_the_unweighted_on_the_kept_rows():
    g = torch.Generator().manual_seed(7)
    probs = torch.rand(23, 5, generator=g).softmax(-1)
    ids = torch.randint(5, (23,), generator=g)
    keep = torch.rand(23, generator=g) < 0.6
    weighted = switch_balance_loss(probs, ids, keep.float())
    torch.testing.assert_close(weighted, switch_balance_loss(probs[keep], ids[keep]))
    counts = expert_histogram(ids, 5, keep.long())
    torch.testing.assert_close(counts, torch.bincount(ids[keep], minlength=5), rtol=0, atol=0)
