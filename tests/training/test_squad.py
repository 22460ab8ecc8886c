"""training.squad: SQuAD features and decoding on small files in the official layout, and on the real dev set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from tests.qa_reference import SEQ, STRIDE
from training.datasets import load_split
from training.evaluate import evaluate_model, predict, score
from training.squad import answer_positions, decode_predictions, read_squad
from training.tasks import get_task, task_file

FIXTURES_ROOT = REPO / "tests" / "fixtures"


def run_qa_positions(tokenizer, question, context, answer_start, answer_text, max_length, stride):
    """transformers' examples/pytorch/question-answering/run_qa.py prepare_train_features, transcribed."""
    enc = tokenizer([question], [context], truncation="only_second", max_length=max_length, stride=stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")  # fmt: skip
    positions = []
    for i, offsets in enumerate(enc["offset_mapping"]):
        input_ids = enc["input_ids"][i]
        cls_index = input_ids.index(tokenizer.cls_token_id)
        sequence_ids = enc.sequence_ids(i)
        start_char, end_char = answer_start, answer_start + len(answer_text)
        token_start_index = 0
        while sequence_ids[token_start_index] != 1:
            token_start_index += 1
        token_end_index = len(input_ids) - 1
        while sequence_ids[token_end_index] != 1:
            token_end_index -= 1
        if not (offsets[token_start_index][0] <= start_char and offsets[token_end_index][1] >= end_char):
            positions.append((cls_index, cls_index))
        else:
            while token_start_index < len(offsets) and offsets[token_start_index][0] <= start_char:
                token_start_index += 1
            while offsets[token_end_index][1] >= end_char:
                token_end_index -= 1
            positions.append((token_start_index - 1, token_end_index + 1))
    return positions


@pytest.mark.parametrize("name", ["squad", "squad_v2"])
def test_squad_training_features(tokenizer, name):
    task = get_task(name)
    data = load_split(task, task_file(FIXTURES_ROOT, task, "train"), tokenizer, max_length=SEQ, doc_stride=STRIDE)
    assert len(data.dataset) > len(data.examples)  # the long context needs several windows
    assert set(data.dataset[0]) == {"input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions"}
    for index, example in enumerate(data.examples):
        items = [data.dataset[w] for w, e in enumerate(data.window_example) if e == index]
        got = [(item["start_positions"].item(), item["end_positions"].item()) for item in items]
        if example.is_impossible:
            assert got == [(0, 0)] * len(items)
            continue
        expected = run_qa_positions(tokenizer, example.question, example.context, example.answer_starts[0],
                                    example.answers[0], SEQ, STRIDE)  # fmt: skip
        assert got == expected
        inside = [(item, s, e) for item, (s, e) in zip(items, got, strict=True) if s > 0]
        assert inside, example.id  # the answer lies wholly inside at least one window
        for item, s, e in inside:
            answer = tokenizer.decode(item["input_ids"][s : e + 1])
            assert answer.replace(" ", "") == example.answers[0].lower().replace(" ", "")
    assert any(s == 0 for s in data.dataset.columns["start_positions"])  # some windows miss the answer


def test_answer_positions_edges():
    offsets = [None, None, None, (0, 3), (4, 9), (9, 12), (13, 20), None]  # [CLS] q [SEP] ctx... [SEP]
    assert answer_positions(offsets, 4, 12) == (4, 5)
    assert answer_positions(offsets, 13, 20) == (6, 6)  # the window's last token (run_qa's edge case)
    assert answer_positions(offsets, 5, 8) == (4, 4)  # inside one token
    assert answer_positions(offsets, 10, 25) == (0, 0)  # ends past the window
    assert answer_positions([None, None], 0, 1) == (0, 0)


def _pointed_logits(data, null_wins: set[str]):
    """Per window: logits peaking on the first gold answer's tokens where it is inside the window;
    [CLS] peaking for the questions in null_wins."""
    starts, ends = [], []
    for w, index in enumerate(data.window_example):
        example = data.examples[index]
        offsets = [tuple(o) if o[0] >= 0 else None for o in data.window_offsets[w].tolist()]
        start, end = np.full(len(offsets), -10.0, np.float32), np.full(len(offsets), -10.0, np.float32)
        if example.answers:
            s, e = answer_positions(
                offsets, example.answer_starts[0], example.answer_starts[0] + len(example.answers[0])
            )
            if s:
                start[s], end[e] = 10.0, 10.0
        if example.id in null_wins:
            start[0], end[0] = 30.0, 30.0
        starts.append(start)
        ends.append(end)
    return starts, ends


def test_squad_v1_decoding(tokenizer):
    task = get_task("squad")
    data = load_split(task, task_file(FIXTURES_ROOT, task, "dev"), tokenizer, max_length=SEQ, doc_stride=STRIDE,
                      training=False)  # fmt: skip
    assert "start_positions" not in data.dataset[0] and len(data.window_offsets) == len(data.dataset)
    starts, ends = _pointed_logits(data, null_wins=set())
    predictions = decode_predictions(data, starts, ends)
    assert set(predictions) == {"predictions"}
    assert predictions["predictions"] == {e.id: e.answers[0] for e in data.examples}
    assert score(data, predictions) == pytest.approx({"exact_match": 100.0, "f1": 100.0})
    # Spans longer than max_answer_len tokens are never picked: "Carolingian-based cultures of West Francia"
    # is 9 tokens, so with at most 3 the prediction is a shorter span.
    short = decode_predictions(data, starts, ends, max_answer_len=3)["predictions"]
    assert short["n5"] != "Carolingian-based cultures of West Francia" and short["n2"] == "Rollo"


def test_squad_v2_decoding(tokenizer):
    task = get_task("squad_v2")
    data = load_split(task, task_file(FIXTURES_ROOT, task, "dev"), tokenizer, max_length=SEQ, doc_stride=STRIDE,
                      training=False)  # fmt: skip
    impossible = {e.id for e in data.examples if e.is_impossible}
    assert impossible == {"x1", "x2"}
    starts, ends = _pointed_logits(data, null_wins=impossible)
    out = decode_predictions(data, starts, ends)
    assert out["predictions"] == {e.id: e.answers[0] if e.answers else "" for e in data.examples}
    assert all(out["na_probs"][q] > 0.99 for q in impossible)
    assert all(p < 0.01 for q, p in out["na_probs"].items() if q not in impossible)
    result = score(data, out)
    assert result["exact_match"] == result["HasAns_exact"] == result["NoAns_exact"] == 100.0
    assert result["best_f1"] == 100.0
    # "n2" is answerable: when its [CLS] wins in the window least sure of "no answer", it gets "".
    wrong = _pointed_logits(data, null_wins=impossible | {"n2"})
    assert decode_predictions(data, *wrong)["predictions"]["n2"] == ""


def test_squad_predict_end_to_end(qa_model, tokenizer):
    """predict() batches the windows, cuts the padding and decodes; the same as decoding window by window."""
    task = get_task("squad_v2")
    data = load_split(task, task_file(FIXTURES_ROOT, task, "dev"), tokenizer, max_length=SEQ, doc_stride=STRIDE,
                      training=False)  # fmt: skip
    out = predict(qa_model, data, batch_size=3)
    starts, ends = [], []
    for i in range(len(data.dataset)):
        item = data.dataset[i]
        with torch.no_grad():
            o = qa_model(**{k: v[None] for k, v in item.items()})
        starts.append(o.start_logits[0].numpy())
        ends.append(o.end_logits[0].numpy())
    alone = decode_predictions(data, starts, ends)
    assert out["predictions"] == alone["predictions"]
    assert out["na_probs"] == pytest.approx(alone["na_probs"], abs=1e-4)
    for example in data.examples:
        assert out["predictions"][example.id] in example.context
    metrics = evaluate_model(qa_model, data, batch_size=4)
    assert {"exact_match", "f1", "HasAns_f1", "NoAns_f1", "best_f1", "best_f1_thresh"} <= set(metrics)


def test_real_squad(data_dir, tokenizer):
    task = get_task("squad")
    examples = read_squad(task_file(data_dir, task, "dev"), v2=False)
    assert len(examples) == 10570 and len({e.id for e in examples}) == 10570
    assert all(e.answers and not e.is_impossible for e in examples)
    train = load_split(task, task_file(data_dir, task, "train"), tokenizer, max_length=384, doc_stride=128, limit=100)
    assert len(train.examples) == 100 and len(train.dataset) >= 100
    hits = 0
    for i in range(len(train.dataset)):
        item = train.dataset[i]
        s, e = item["start_positions"].item(), item["end_positions"].item()
        if s:
            answer = train.examples[train.window_example[i]].answers[0]
            hits += tokenizer.decode(item["input_ids"][s : e + 1]).replace(" ", "") == answer.lower().replace(" ", "")
    assert hits >= 95  # the rest differ only by accents / spacing the uncased tokenizer normalises
