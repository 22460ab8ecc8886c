"""Each routing method's assignments against an independent computation, gate-sentence batch
invariance, and hash-balance balancing real SST-2 token counts better than hash-random."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moebert.convert import ConvertConfig, convert
from moebert.loading import load_model
from moebert.routing import balanced_hash_table, read_lines, routed_load, token_counts
from training.datasets import task_texts
from training.tasks import DataError, get_task

SST2 = get_task("sst2")


def converted(tiny_cls_dir, tmp_path, route, **kw):
    cfg = ConvertConfig(
        teacher=str(tiny_cls_dir), output_dir=str(tmp_path / route), split="random", route=route,
        expert_dim=21, shared_dim=7, **kw,
    )  # fmt: skip
    return load_model(convert(cfg))


def capture_routing(model):
    """Record (input tokens, routing) of every MoE layer during a forward."""
    seen = []
    for layer in model.bert.encoder.layer:
        layer.moe.register_forward_hook(lambda mod, args, out: seen.append((args[0], out[1])))
    return seen


def test_hash_random_tables_are_seeded_per_layer_and_uniform(tiny_cls_dir, tmp_path):
    a = converted(tiny_cls_dir, tmp_path / "a", "hash-random", seed=1)
    b = converted(tiny_cls_dir, tmp_path / "b", "hash-random", seed=1)
    c = converted(tiny_cls_dir, tmp_path / "c", "hash-random", seed=2)
    ta = [layer.moe.router.table for layer in a.bert.encoder.layer]
    assert all(torch.equal(x, layer.moe.router.table) for x, layer in zip(ta, b.bert.encoder.layer, strict=True))
    assert not torch.equal(ta[0], c.bert.encoder.layer[0].moe.router.table)
    assert not torch.equal(ta[0], ta[1])
    share = torch.bincount(ta[0], minlength=4) / ta[0].numel()
    assert (share - 0.25).abs().max() < 0.02  # 30522 draws: each expert gets about a quarter of the vocab


def test_gate_token_routes_to_argmax_and_scales_by_probability(tiny_cls_dir, padded_batch, tmp_path):
    model = converted(tiny_cls_dir, tmp_path, "gate-token")
    seen = capture_routing(model)
    with torch.no_grad():
        model(**padded_batch)
    assert len(seen) == 3
    for layer, (x, routing) in zip(model.bert.encoder.layer, seen, strict=True):
        logits = x.double() @ layer.moe.router.gate.weight.double().t()  # [N, E]
        probs = logits.softmax(-1)
        assert torch.equal(routing.expert_ids, probs.argmax(-1))
        torch.testing.assert_close(routing.scale.double(), probs.max(-1).values, rtol=0, atol=1e-6)
        assert x.shape[0] == int(padded_batch["attention_mask"].sum())  # padding is never routed


def test_gate_sentence_pools_real_tokens_and_is_batch_invariant(tiny_cls_dir, tokenizer, tmp_path):
    model = converted(tiny_cls_dir, tmp_path, "gate-sentence")
    texts = [
        "tiny",
        "a considerably longer sentence, so that the first one is padded",
        "mid length text here",
    ]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    seen = capture_routing(model)
    with torch.no_grad():
        batched = model(**batch).logits
    x, routing = seen[0]
    lengths = batch["attention_mask"].sum(1).tolist()
    pooled = torch.stack([chunk.mean(0) for chunk in x.split(lengths)])  # independent mean-pool per sequence
    probs = (pooled @ model.bert.encoder.layer[0].moe.router.gate.weight.t()).softmax(-1)
    expected = torch.cat([torch.full((n,), int(p.argmax())) for n, p in zip(lengths, probs, strict=True)])
    assert torch.equal(routing.expert_ids, expected)
    for i, text in enumerate(texts):
        with torch.no_grad():
            alone = model(**tokenizer([text], return_tensors="pt")).logits[0]
        torch.testing.assert_close(batched[i], alone, rtol=0, atol=1e-6)


def test_hash_balance_balances_real_token_counts_better_than_hash_random(tokenizer, data_dir):
    counts = token_counts(task_texts(SST2, data_dir / "glue" / "SST-2" / "train.tsv"), tokenizer, tokenizer.vocab_size)
    assert counts.sum() > 500_000
    balanced = routed_load(balanced_hash_table(counts, 4, seed=0), counts, 4).double()
    imbalance = lambda load: float(load.max() / load.mean())
    random_imbalance = [
        imbalance(
            routed_load(torch.randint(4, counts.shape, generator=torch.Generator().manual_seed(s)), counts, 4).double()
        )
        for s in range(5)
    ]
    assert imbalance(balanced) < 1.01  # greedy by frequency: within 1% of perfect
    assert imbalance(balanced) < min(random_imbalance)
    # Held-out check: the table built on train still balances dev better than a random table does.
    dev = token_counts(task_texts(SST2, data_dir / "glue" / "SST-2" / "dev.tsv"), tokenizer, tokenizer.vocab_size)
    dev_balanced = imbalance(routed_load(balanced_hash_table(counts, 4), dev, 4).double())
    dev_random = imbalance(
        routed_load(torch.randint(4, dev.shape, generator=torch.Generator().manual_seed(0)), dev, 4).double()
    )
    assert dev_balanced < dev_random


def test_balanced_table_greedy_rule():
    counts = torch.tensor([0, 10, 7, 6, 5, 0, 1])
    table = balanced_hash_table(counts, 2, seed=0)
    # 10 → e0; 7 → e1; 6 → e1 (7 < 10); 5 → e0 (10 < 13); 1 → e1 (13 < 15)
    assert table[[1, 2, 3, 4, 6]].tolist() == [0, 1, 1, 0, 1]
    assert routed_load(table, counts, 2).tolist() == [15, 14]


def test_task_texts_formats(tmp_path):
    """The texts of a task file come from the task's own columns (the task layer's reader), not from
    guessing by header name; a plain text file (one text per line) is what `moebert convert` reads."""
    (tmp_path / "a.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\tA cat.\tA dog.\tentailment\n")
    assert list(task_texts(get_task("rte"), tmp_path / "a.tsv")) == ["A cat.", "A dog."]
    (tmp_path / "b.jsonl").write_text('{"text": "hello", "label": "pos"}\n\n{"text": "bye", "label": 1}\n')
    assert list(task_texts(get_task("custom"), tmp_path / "b.jsonl")) == ["hello", "bye"]
    (tmp_path / "c.csv").write_text('id,text\n1,"a, b"\n')
    assert list(task_texts(get_task("custom"), tmp_path / "c.csv")) == ["a, b"]
    (tmp_path / "d.tsv").write_text("")
    with pytest.raises(ValueError, match="empty file"):
        list(task_texts(get_task("custom"), tmp_path / "d.tsv"))
    (tmp_path / "e.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="e.jsonl, line 1"):
        list(task_texts(get_task("custom"), tmp_path / "e.jsonl"))
    # Headers the old name guess did not know: CoLA has none, a custom column may be called anything.
    (tmp_path / "cola.tsv").write_text(
        "gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the pub.\n"
    )
    assert list(task_texts(get_task("cola"), tmp_path / "cola.tsv")) == [
        "Our friends won't buy this analysis.",
        "They drank the pub.",
    ]
    (tmp_path / "r.csv").write_text("review,stars\nloved it,5\n")
    assert list(task_texts(get_task("custom", text_column="review", label_column="stars"), tmp_path / "r.csv")) == [
        "loved it"
    ]
    (tmp_path / "lines.txt").write_text("one text\n\nanother, with a comma\n")
    assert list(read_lines(tmp_path / "lines.txt")) == ["one text", "another, with a comma"]
    with pytest.raises(ValueError, match="plain text file, one text per line"):
        list(read_lines(tmp_path / "r.csv"))


def test_unpadded_routing_matches_padded(tiny_cls_dir, tokenizer, tmp_path):
    model = converted(tiny_cls_dir, tmp_path, "gate-token")
    batch = tokenizer(["one two", "three four five six seven"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = model(**batch).logits
        b = torch.cat(
            [model(**tokenizer([t], return_tensors="pt")).logits for t in ["one two", "three four five six seven"]]
        )
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert F.softmax(a, -1).sum(-1).allclose(torch.ones(2))
