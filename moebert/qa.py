"""Extractive question answering around a QA head: cut (question, context) into token windows, and decode
answer spans from the model's start/end logits.

Shared by training (SQuAD) and the inference server, so it depends on numpy, torch and a fast
tokenizer only. It reproduces transformers' QuestionAnsweringPipeline (transformers 4.x; the pipeline
was removed in transformers 5) for a right-padding tokenizer such as BERT's: the same windows
(question first, truncation="only_second", overflowing windows overlapping by `doc_stride` tokens),
the same scores (softmax per window over the context tokens and [CLS], score = p_start · p_end) and
the same answer selection (spans aligned to whole words, equal answers merged, best `top_k` across
windows). One deliberate difference: the question is cut to `max_question_len` tokens first (the
pipeline applies that limit only with slow tokenizers), so a long question cannot crowd out the
context or crash the tokenizer.

Shapes: W windows, T tokens (≥ every window's length when padded), n = one window's length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

Span = tuple[int, int]


@dataclass
class QAWindow:
    """One model input: [CLS] question [SEP] context piece [SEP], unpadded (n tokens).

    offsets: the character span in the context of each context token, None for every other token.
    word_spans: the character span of the whole word (the tokenizer's pre-tokenized word) each context
    token belongs to, None elsewhere; answers are widened to these (align_to_words). None when not
    computed (training features).
    p_mask: 1 for tokens that cannot be part of an answer (question, special tokens), 0 for the context
    and for [CLS], which stands for "no answer".
    """

    input_ids: list[int]
    attention_mask: list[int]
    token_type_ids: list[int]
    offsets: list[Span | None]
    word_spans: list[Span | None] | None = None
    p_mask: list[int] | None = None

    def __post_init__(self) -> None:
        if self.p_mask is None:  # context tokens and position 0 ([CLS]) may be picked
            self.p_mask = [int(o is None and i != 0) for i, o in enumerate(self.offsets)]


@dataclass
class Answer:
    """An answer: the context text [start, end) (character offsets; end exclusive) and its probability."""

    text: str
    score: float
    start: int
    end: int


# ----------------------------------------------------------------------------------------------------
# Windows


def _truncate_questions(tokenizer, questions: list[str], max_question_len: int) -> tuple[list[str], list[int]]:
    """Questions cut after their first max_question_len tokens (at the end of that token), and their
    token counts. Cutting the text at a token end re-tokenizes to the same leading tokens."""
    encoded = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    cut, lengths = [], []
    for question, ids, offsets in zip(questions, encoded["input_ids"], encoded["offset_mapping"], strict=True):
        if len(ids) > max_question_len:
            question = question[: offsets[max_question_len - 1][1]]
        cut.append(question)
        lengths.append(min(len(ids), max_question_len))
    return cut, lengths


def _strides(tokenizer, contexts, question_lengths, max_seq_len: int, doc_stride: int) -> list[int]:
    """The stride to tokenize each pair with: doc_stride, or 0 where the context fits in one window anyway
    and doc_stride would be too large for the room the question leaves (the tokenizer rejects, or even
    panics on, a stride that large). Raises a clear ValueError where a pair cannot be windowed."""
    special = tokenizer.num_special_tokens_to_add(pair=True)
    strides = []
    for i, q_len in enumerate(question_lengths):
        room = max_seq_len - q_len - special  # context tokens per window
        if room < 1:
            raise ValueError(
                f"max_seq_len {max_seq_len} is too small: the question takes {q_len} tokens plus {special} special "
                f"tokens, leaving no room for the context (raise max_seq_len or lower max_question_len)"
            )
        if doc_stride < room:
            strides.append(doc_stride)
            continue
        if len(tokenizer(contexts[i], add_special_tokens=False)["input_ids"]) > room:
            raise ValueError(
                f"doc_stride {doc_stride} must be smaller than the {room} context tokens a window of "
                f"max_seq_len {max_seq_len} holds next to this {q_len}-token question"
            )
        strides.append(0)  # one window: the stride plays no part
    return strides


def make_windows_batch(
    tokenizer,
    questions: Sequence[str],
    contexts: Sequence[str],
    *,
    max_seq_len: int = 384,
    doc_stride: int = 128,
    max_question_len: int = 64,
    word_spans: bool = True,
) -> list[list[QAWindow]]:
    """make_windows for many (question, context) pairs, tokenized together: a list of windows per pair.
    word_spans=False skips the word alignment data (not needed for training features)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("QA windows need a fast tokenizer (character offsets)")
    if len(questions) != len(contexts):
        raise ValueError(f"{len(questions)} questions but {len(contexts)} contexts")
    if max_question_len < 1 or doc_stride < 0:
        raise ValueError(f"max_question_len must be ≥ 1 and doc_stride ≥ 0 (got {max_question_len}, {doc_stride})")
    for i, (question, context) in enumerate(zip(questions, contexts, strict=True)):
        if not question or not context:
            raise ValueError(f"pair {i}: the {'question' if not question else 'context'} is empty")
    if not questions:
        return []
    questions, q_lengths = _truncate_questions(tokenizer, list(questions), max_question_len)
    strides = _strides(tokenizer, contexts, q_lengths, max_seq_len, doc_stride)
    windows: list[list[QAWindow]] = [[] for _ in questions]
    for stride in sorted(set(strides)):
        pairs = [i for i, s in enumerate(strides) if s == stride]
        encoded = tokenizer(
            [questions[i] for i in pairs],
            [contexts[i] for i in pairs],
            truncation="only_second",
            max_length=max_seq_len,
            stride=stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            return_token_type_ids=True,
            return_attention_mask=True,
        )
        for k, sample in enumerate(encoded["overflow_to_sample_mapping"]):
            windows[pairs[sample]].append(_window(encoded, k, tokenizer.cls_token_id, word_spans))
    return windows


def _window(encoded, k: int, cls_id: int | None, word_spans: bool) -> QAWindow:
    """Window k of a tokenizer output (question first, overflowing windows)."""
    sequence_ids = encoded.sequence_ids(k)
    ids = encoded["input_ids"][k]
    offsets = [tuple(o) if s == 1 else None for o, s in zip(encoded["offset_mapping"][k], sequence_ids, strict=True)]
    # As the pipeline: only context tokens may be picked, and [CLS] ("no answer").
    p_mask = [int(s != 1 and t != cls_id) for s, t in zip(sequence_ids, ids, strict=True)]
    spans = _word_spans(encoded.encodings[k], sequence_ids) if word_spans else None
    return QAWindow(ids, encoded["attention_mask"][k], encoded["token_type_ids"][k], offsets, spans, p_mask)


def _word_spans(encoding, sequence_ids: list[int | None]) -> list[Span | None]:
    """Per context token, the character span of its word (what Encoding.word_to_chars gives): from the
    first to the last of the word's tokens. One pass over the window's word ids and offsets: a call into
    the tokenizer per token held the GIL, and so the event loop, for ~0.1 s per long context."""
    word_ids, offsets = encoding.word_ids, encoding.offsets
    start: dict[int, int] = {}
    end: dict[int, int] = {}
    for i, (s, word) in enumerate(zip(sequence_ids, word_ids, strict=True)):
        if s == 1 and word is not None:
            start.setdefault(word, offsets[i][0])
            end[word] = offsets[i][1]
    return [
        (start[word], end[word]) if s == 1 and word is not None else None
        for s, word in zip(sequence_ids, word_ids, strict=True)
    ]


def make_windows(
    tokenizer,
    question: str,
    context: str,
    *,
    max_seq_len: int = 384,
    doc_stride: int = 128,
    max_question_len: int = 64,
) -> list[QAWindow]:
    """The windows of one (question, context) pair: [CLS] question [SEP] context piece [SEP], each at
    most max_seq_len tokens, consecutive pieces overlapping by doc_stride tokens. Raises ValueError
    when max_seq_len leaves no room for the context, or doc_stride is too large for what a window holds."""
    return make_windows_batch(
        tokenizer, [question], [context], max_seq_len=max_seq_len, doc_stride=doc_stride,
        max_question_len=max_question_len,
    )[0]  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Decoding


def _as_numpy(logits) -> np.ndarray:
    if isinstance(logits, torch.Tensor):
        logits = logits.detach()
        if logits.dtype in (torch.bfloat16, torch.float16):
            logits = logits.float()
        return logits.cpu().numpy()
    return np.asarray(logits)


def _window_spans(
    start: np.ndarray, end: np.ndarray, window: QAWindow, min_null_score: float, top_k: int,
    handle_impossible_answer: bool, max_answer_len: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:  # fmt: skip
    """The top_k (start, end, p_start · p_end) token spans of one window, and the running minimum of
    the [CLS] ("no answer") score. start, end: logits [n].

    The numerics follow the pipeline step by step (same dtypes, same masking constant, the CLS score
    taken before [CLS] is zeroed, the same top-k selection) so that scores and ties come out identical.
    """
    allowed = np.abs(np.array([window.p_mask]) - 1) & np.array([window.attention_mask])  # [1, n]
    blocked = allowed == 0.0
    start = np.where(blocked, -10000.0, start[None])
    end = np.where(blocked, -10000.0, end[None])
    start = np.exp(start - start.max(axis=-1, keepdims=True))
    start = start / start.sum()
    end = np.exp(end - end.max(axis=-1, keepdims=True))
    end = end / end.sum()
    if handle_impossible_answer:
        min_null_score = min(min_null_score, (start[0, 0] * end[0, 0]).item())
    start[0, 0] = end[0, 0] = 0.0  # [CLS] is the no-answer score, never a span

    outer = np.matmul(np.expand_dims(start, -1), np.expand_dims(end, 1))  # [1, n, n]: p_start(i) · p_end(j)
    candidates = np.tril(np.triu(outer), max_answer_len - 1)  # keep start ≤ end < start + max_answer_len
    flat = candidates.flatten()
    if top_k == 1:
        order = [np.argmax(flat)]
    elif len(flat) < top_k:
        order = np.argsort(-flat)
    else:
        best = np.argpartition(-flat, top_k)[0:top_k]
        order = best[np.argsort(-flat[best])]
    starts, ends = np.unravel_index(order, candidates.shape)[1:]
    # The pipeline tests membership against allowed.nonzero() of the [1, n] mask, a (rows, columns)
    # pair, so index 0 always passes too; kept for identical results (its score is 0 anyway).
    keep = np.isin(starts, allowed.nonzero()) & np.isin(ends, allowed.nonzero())
    starts, ends = starts[keep], ends[keep]
    return starts, ends, candidates[0, starts, ends], min_null_score


def _char_span(window: QAWindow, s: int, e: int, align_to_words: bool) -> Span:
    """Characters [start, end) of token span s..e: whole words when aligning, else the tokens' offsets
    (also the fallback when a span touches [CLS], whose offsets are (0, 0))."""
    if align_to_words and window.word_spans is not None:
        first, last = window.word_spans[s], window.word_spans[e]
        if first is not None and last is not None:
            return first[0], last[1]
    return (window.offsets[s] or (0, 0))[0], (window.offsets[e] or (0, 0))[1]


def decode_answers(
    start_logits,
    end_logits,
    windows: list[QAWindow],
    context: str,
    *,
    top_k: int = 1,
    max_answer_len: int = 15,
    handle_impossible_answer: bool = False,
    align_to_words: bool = True,
) -> list[Answer]:
    """The best answers to one question, best first (at most top_k).

    start_logits, end_logits: [W, T] (tensor or array), row w for windows[w] (positions past a window's
    length are ignored). Per window, softmax over its context tokens and [CLS]; a span (start ≤ end,
    at most max_answer_len tokens) scores p_start · p_end. Answers that read the same (ignoring case)
    are merged by adding their scores. With handle_impossible_answer, the smallest [CLS] score over the
    windows competes as Answer("", score, 0, 0).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be ≥ 1 (got {top_k})")
    if max_answer_len < 1:
        raise ValueError(f"max_answer_len must be ≥ 1 (got {max_answer_len})")
    start_logits, end_logits = _as_numpy(start_logits), _as_numpy(end_logits)
    if start_logits.ndim == 1:
        start_logits, end_logits = start_logits[None], end_logits[None]
    if len(start_logits) != len(windows) or len(end_logits) != len(windows):
        raise ValueError(f"{len(start_logits)} rows of logits for {len(windows)} windows")
    # The pipeline keeps a few more candidates per window when aligning, as widening to words can
    # turn different token spans into the same answer.
    per_window = top_k * 2 + 10 if align_to_words else top_k
    min_null_score = 1000000.0
    answers: list[Answer] = []
    for w, window in enumerate(windows):
        n = len(window.input_ids)
        if start_logits.shape[1] < n:
            raise ValueError(f"window {w} has {n} tokens but the logits only {start_logits.shape[1]}")
        starts, ends, scores, min_null_score = _window_spans(
            start_logits[w, :n], end_logits[w, :n], window, min_null_score, per_window,
            handle_impossible_answer, max_answer_len,
        )  # fmt: skip
        for s, e, score in zip(starts, ends, scores, strict=True):
            first, last = _char_span(window, int(s), int(e), align_to_words)
            text = context[first:last]
            same = next((a for a in answers if a.text.lower() == text.lower()), None)
            if same is not None:
                same.score += score.item()
            else:
                answers.append(Answer(text, score.item(), first, last))
    if handle_impossible_answer:
        answers.append(Answer("", float(min_null_score), 0, 0))
    return sorted(answers, key=lambda a: a.score, reverse=True)[:top_k]
