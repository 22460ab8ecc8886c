"""moebert.qa (QA windows and answer decoding, shared with the server) against transformers'
QuestionAnsweringPipeline, run on a tiny random HF BertForQuestionAnswering with the real tokenizer.

transformers 5 no longer ships the QA pipeline, so the reference below is its transformers 4.x code
(preprocess for fast tokenizers, _forward one window at a time, postprocess), transcribed, with the
scoring core taken from transformers itself: `select_starts_ends`, which 4.x's pipeline called and
transformers 5 still ships in pipelines.document_question_answering.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moebert.qa import decode_answers, make_windows, make_windows_batch
from tests.qa_reference import LONG, QUESTION, SEQ, SHORT, STRIDE, reference_answers, reference_features, window_logits


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
