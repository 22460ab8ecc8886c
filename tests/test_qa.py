"""moebert.qa (QA windows and answer decoding, shared with the server) against transformers'
QuestionAnsweringPipeline, run on a tiny random HF BertForQuestionAnswering with the real tokenizer.

transformers 5 no longer ships the QA pipeline, so the reference below is its transformers 4.x code
(preprocess for fast tokenizers, _forward one window at a time, postprocess), transcribed, with the
scoring core taken from transformers itself: `select_starts_ends`, which 4.x's pipeline called and
transformers 5 still ships in pipelines.document_question_answering.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertForQuestionAnswering
from transformers.pipelines.document_question_answering import select_starts_ends

from moebert.qa import decode_answers, make_windows, make_windows_batch
from training.datasets import load_split
from training.evaluate import evaluate_model, predict, score
from training.squad import answer_positions, decode_predictions, read_squad
from training.tasks import get_task, task_file

QUESTION = "Who designed the Eiffel Tower?"
SHORT = "The Eiffel Tower was designed by the engineering company of Gustave Eiffel."
LONG = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
    "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally "
    'nicknamed "La dame de fer" (French for "Iron Lady"), it was constructed as the centrepiece of the 1889 '
    "World's Fair, and to crown the centennial anniversary of the French Revolution. Although initially "
    "criticised by some of France's leading artists and intellectuals for its design, it has since become a "
    "global cultural icon of France and one of the most recognisable structures in the world. The tower "
    "received 5,889,000 visitors in 2022. It is 330 metres tall, about the same height as an 81-storey "
    "building, and the tallest structure in Paris. Its base is square, measuring 125 metres on each side."
)
SEQ, STRIDE = 64, 16  # the tiny model has 64 positions; a long context then needs several windows


def reference_features(tokenizer, question, context, max_seq_len, doc_stride):
    """QuestionAnsweringPipeline.preprocess (4.x, fast tokenizer, right padding)."""
    enc = tokenizer(
        text=question, text_pair=context, padding="do_not_pad", truncation="only_second", max_length=max_seq_len,
        stride=doc_stride, return_token_type_ids=True, return_overflowing_tokens=True, return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )  # fmt: skip
    features = []
    for span in range(len(enc["input_ids"])):
        p_mask = [tok != 1 for tok in enc.sequence_ids(span)]
        ids = enc["input_ids"][span]
        for cls_index in np.nonzero(np.array(ids) == tokenizer.cls_token_id)[0]:
            p_mask[cls_index] = 0
        features.append({
            "input_ids": ids, "attention_mask": enc["attention_mask"][span],
            "token_type_ids": enc["token_type_ids"][span], "p_mask": p_mask, "encoding": enc[span],
        })  # fmt: skip
    return features


def window_logits(model, feature) -> tuple[np.ndarray, np.ndarray]:
    """The pipeline's _forward: one window, unpadded, batch of one → start, end logits [1, n]."""
    inputs = {k: torch.tensor([feature[k]]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        out = model(**inputs)
    return out.start_logits.numpy(), out.end_logits.numpy()


def reference_answers(model, tokenizer, question, context, *, top_k=1, max_answer_len=15,
                      handle_impossible_answer=False, align_to_words=True):  # fmt: skip
    """QuestionAnsweringPipeline.postprocess (4.x) over its windows: (text, start, end, score) best first."""
    min_null_score = 1000000
    answers = []
    for feature in reference_features(tokenizer, question, context, SEQ, STRIDE):
        start, end = window_logits(model, feature)
        pre_topk = top_k * 2 + 10 if align_to_words else top_k
        starts, ends, scores, min_null_score = select_starts_ends(
            start, end, torch.tensor([feature["p_mask"]]), np.array([feature["attention_mask"]]), min_null_score,
            pre_topk, handle_impossible_answer, max_answer_len,
        )  # fmt: skip
        enc = feature["encoding"]
        for s, e, span_score in zip(starts, ends, scores, strict=True):
            if align_to_words:
                try:
                    start_index = enc.word_to_chars(enc.token_to_word(s), sequence_index=1)[0]
                    end_index = enc.word_to_chars(enc.token_to_word(e), sequence_index=1)[1]
                except Exception:
                    start_index, end_index = enc.offsets[s][0], enc.offsets[e][1]
            else:
                start_index, end_index = enc.offsets[s][0], enc.offsets[e][1]
            target = context[start_index:end_index]
            same = next((a for a in answers if a["answer"].lower() == target.lower()), None)
            if same:
                same["score"] += span_score.item()
            else:
                answers.append({"score": span_score.item(), "start": start_index, "end": end_index, "answer": target})
    if handle_impossible_answer:
        answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
    answers = sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]
    return [(a["answer"], a["start"], a["end"], a["score"]) for a in answers]


@pytest.fixture(scope="module")
def qa_model(tiny_qa_dir):
    return BertForQuestionAnswering.from_pretrained(tiny_qa_dir).eval()


@pytest.mark.parametrize("context, seq, stride", [(SHORT, SEQ, STRIDE), (LONG, SEQ, STRIDE), (LONG, 48, 8),
                                                  (LONG, SEQ, 0)])  # fmt: skip
def test_windows_match_pipeline(tokenizer, context, seq, stride):
    windows = make_windows(tokenizer, QUESTION, context, max_seq_len=seq, doc_stride=stride)
    features = reference_features(tokenizer, QUESTION, context, seq, stride)
    assert len(windows) == len(features)
    if context is LONG:
        assert len(windows) >= 4
    for window, feature in zip(windows, features, strict=True):
        assert window.input_ids == feature["input_ids"] and len(window.input_ids) <= seq
        assert window.token_type_ids == feature["token_type_ids"]
        assert window.attention_mask == feature["attention_mask"]
        assert window.p_mask == [int(p) for p in feature["p_mask"]]
        sequence_ids = feature["encoding"].sequence_ids
        expected = [
            tuple(o) if s == 1 else None for o, s in zip(feature["encoding"].offsets, sequence_ids, strict=True)
        ]
        assert window.offsets == expected
        for a, b in (o for o in window.offsets if o is not None):
            assert context[a:b].strip()  # every context token maps to real context characters
    # Consecutive windows overlap by exactly `stride` context tokens.
    for left, right in zip(windows, windows[1:], strict=False):
        left_ctx = [o for o in left.offsets if o is not None]
        right_ctx = [o for o in right.offsets if o is not None]
        assert left_ctx[len(left_ctx) - stride :] == right_ctx[:stride] if stride else left_ctx[-1] < right_ctx[0]


CASES = [
    dict(context=SHORT),
    dict(context=LONG),
    dict(context=LONG, top_k=5),
    dict(context=LONG, top_k=3, handle_impossible_answer=True),
    dict(context=SHORT, top_k=4, handle_impossible_answer=True, max_answer_len=3),
    dict(context=LONG, top_k=20, max_answer_len=30),
    dict(context=SHORT, top_k=50, handle_impossible_answer=True),
    dict(context=SHORT, top_k=50, handle_impossible_answer=False),
    dict(context=LONG, top_k=3, align_to_words=False),
]


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_decode_matches_pipeline(qa_model, tokenizer, case):
    case = dict(case)
    context = case.pop("context")
    expected = reference_answers(qa_model, tokenizer, QUESTION, context, **case)
    windows = make_windows(tokenizer, QUESTION, context, max_seq_len=SEQ, doc_stride=STRIDE)
    # Logits of each window alone (as the pipeline computes them), as one [W, T] batch whose positions
    # past a window's end hold garbage that must be ignored.
    T = max(len(w.input_ids) for w in windows)
    start = torch.full((len(windows), T), 50.0)
    end = torch.full((len(windows), T), 50.0)
    features = reference_features(tokenizer, QUESTION, context, SEQ, STRIDE)
    for w, feature in enumerate(features):
        s, e = window_logits(qa_model, feature)
        start[w, : s.shape[1]], end[w, : e.shape[1]] = torch.from_numpy(s[0]), torch.from_numpy(e[0])
    answers = decode_answers(start, end, windows, context, **case)
    assert [(a.text, a.start, a.end) for a in answers] == [(t, s, e) for t, s, e, _ in expected]
    assert [a.score for a in answers] == pytest.approx([score for *_, score in expected], rel=1e-6)
    assert len(answers) == min(case.get("top_k", 1), len(expected))
    for a in answers:
        assert a.text == context[a.start : a.end]
    if case.get("top_k", 1) >= 50:  # enough answers that the no-answer one is among them when asked for
        assert any(a.text == "" and a.start == a.end == 0 for a in answers) == case["handle_impossible_answer"]


def test_decode_padded_batch(qa_model, tokenizer):
    """The server's way: all windows in one padded batch; the best answer is the pipeline's."""
    windows = make_windows(tokenizer, QUESTION, LONG, max_seq_len=SEQ, doc_stride=STRIDE)
    T = max(len(w.input_ids) for w in windows)
    batch = {k: torch.tensor([getattr(w, k) + [0] * (T - len(w.input_ids)) for w in windows])
             for k in ("input_ids", "attention_mask", "token_type_ids")}  # fmt: skip
    with torch.no_grad():
        out = qa_model(**batch)
    (answer,) = decode_answers(out.start_logits, out.end_logits, windows, LONG)
    ((text, start, end, score),) = reference_answers(qa_model, tokenizer, QUESTION, LONG)
    assert (answer.text, answer.start, answer.end) == (text, start, end)
    assert answer.score == pytest.approx(score, rel=1e-4)


def test_decode_by_hand(tokenizer):
    """Logits that point at known tokens: a sub-word start widens to the whole word; a confident [CLS]
    wins with handle_impossible_answer; a span longer than max_answer_len is never returned."""
    (window,) = make_windows(tokenizer, QUESTION, SHORT)
    tokens = tokenizer.convert_ids_to_tokens(window.input_ids)
    context_start = window.token_type_ids.index(1)
    iff = tokens.index("##iff", context_start)  # "e ##iff ##el": the first "Eiffel" of the context
    start = np.full((1, len(tokens)), -5.0, dtype=np.float32)
    end = np.full((1, len(tokens)), -5.0, dtype=np.float32)
    tower = tokens.index("tower", context_start)
    start[0, iff], end[0, tower] = 8.0, 8.0
    (best,) = decode_answers(start, end, [window], SHORT)
    assert best.text == "Eiffel Tower" and SHORT[best.start : best.end] == "Eiffel Tower"
    (raw,) = decode_answers(start, end, [window], SHORT, align_to_words=False)
    assert raw.text == "iffel Tower"  # token offsets only
    allowed = window.p_mask.count(0)  # context tokens and [CLS]: the softmax runs over these
    p = np.exp(8.0) / (np.exp(8.0) + (allowed - 1) * np.exp(-5.0))
    assert best.score == pytest.approx(p * p, rel=1e-5)
    start[0, 0], end[0, 0] = 20.0, 20.0  # [CLS]: "no answer"
    first, second = decode_answers(start, end, [window], SHORT, top_k=2, handle_impossible_answer=True)
    assert (first.text, first.start, first.end) == ("", 0, 0) and first.score > 0.99
    assert second.text == "Eiffel Tower"
    assert decode_answers(start, end, [window], SHORT)[0].text == "Eiffel Tower"  # not asked: no empty answer
    start[0, 0], end[0, 0] = -5.0, -5.0
    assert decode_answers(start, end, [window], SHORT, max_answer_len=1)[0].text != "Eiffel Tower"
    with pytest.raises(ValueError, match="top_k"):
        decode_answers(start, end, [window], SHORT, top_k=0)
    with pytest.raises(ValueError, match="logits only"):
        decode_answers(start[:, :5], end[:, :5], [window], SHORT)


def test_question_truncated(tokenizer):
    question = "why " + " ".join(f"word{i}" for i in range(80)) + "?"
    full = tokenizer(question, add_special_tokens=False)["input_ids"]
    assert len(full) > 64
    windows = make_windows(tokenizer, question, LONG, max_seq_len=128, doc_stride=32, max_question_len=64)
    for window in windows:
        assert window.input_ids[1 : 1 + 64] == full[:64]
        assert window.input_ids[65] == tokenizer.sep_token_id  # the question part ends after 64 tokens
        assert window.token_type_ids.index(1) == 66


def test_window_errors(tokenizer):
    with pytest.raises(ValueError, match="max_seq_len 10 is too small: the question takes 8 tokens"):
        make_windows(tokenizer, QUESTION, LONG, max_seq_len=10)
    with pytest.raises(ValueError, match="doc_stride 40 must be smaller than the 29 context tokens"):
        make_windows(tokenizer, QUESTION, LONG, max_seq_len=40, doc_stride=40)
    assert len(make_windows(tokenizer, QUESTION, SHORT, max_seq_len=40, doc_stride=40)) == 1  # fits: no stride needed
    with pytest.raises(ValueError, match="context is empty"):
        make_windows(tokenizer, QUESTION, "")


def test_batch_windows_equal_single(tokenizer):
    batched = make_windows_batch(
        tokenizer, [QUESTION, "Where is it?"], [LONG, SHORT], max_seq_len=SEQ, doc_stride=STRIDE
    )
    assert batched[0] == make_windows(tokenizer, QUESTION, LONG, max_seq_len=SEQ, doc_stride=STRIDE)
    assert batched[1] == make_windows(tokenizer, "Where is it?", SHORT, max_seq_len=SEQ, doc_stride=STRIDE)


# ----------------------------------------------------------------------------------------------------
# SQuAD features and decoding (training.squad), on small files in the official layout

FIXTURES_ROOT = Path(__file__).parent / "fixtures"


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
