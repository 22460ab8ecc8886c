"""POST /v1/qa: extractive QA. Each (question, context) pair is cut into overlapping windows
(moebert.qa, as transformers' QA pipeline); every window is a row of the batch, and the best spans are
chosen across a pair's windows."""

from __future__ import annotations

import time

import numpy as np
from fastapi import Request

from moebert.qa import decode_answers, make_windows_batch
from server.batching import bucket_length
from server.errors import InvalidInput, PayloadTooLarge
from server.handling import Timings, check_count, check_text, wait_for_rows
from server.registry import ServedModel
from server.schemas import Answer, QARequest, QAResponse, QAResult, Usage

DEFAULT_MAX_SEQ_LEN = 384  # the pipeline's default


def pairs_of(req: QARequest) -> list[tuple[str, str]]:
    single = req.question is not None or req.context is not None
    if single and req.inputs is not None:
        raise InvalidInput("give either question + context, or inputs, not both")
    if single:
        if req.question is None or req.context is None:
            raise InvalidInput(f"{'context' if req.context is None else 'question'} is missing")
        pairs = [(req.question, req.context)]
    elif req.inputs is None:
        raise InvalidInput("give question + context, or inputs: a list of {question, context}")
    else:
        pairs = [(p.question, p.context) for p in req.inputs]
    for i, (question, context) in enumerate(pairs):
        check_text(question, f"pair {i}: the question")
        check_text(context, f"pair {i}: the context")
    return pairs


def estimated_qa_tokens(pairs: list[tuple[str, str]], max_seq_len: int, doc_stride: int, max_question_len: int) -> int:
    """Padded tokens the pairs' windows will take, from their lengths in characters (before tokenizing, so
    admission stays cheap): ~4 characters per token, windows of max_seq_len overlapping by doc_stride."""
    total = 0
    for question, context in pairs:
        q = min(len(question) // 4 + 1, max_question_len)
        c = len(context) // 4 + 1
        room = max(1, max_seq_len - q - 3)  # context tokens per window
        if c <= room:
            total += min(bucket_length(q + c + 3), max_seq_len)
        else:
            step = max(1, room - doc_stride)
            total += (1 + -(-(c - room) // step)) * max_seq_len
    return total


def pad_rows(rows: list[np.ndarray]) -> np.ndarray:
    """Per-window logits [n_w] → [W, max n_w]; decode_answers ignores positions past a window's length."""
    out = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


async def answer(req: QARequest, request: Request, model: ServedModel, state) -> tuple[QAResponse, Timings]:
    settings = state.settings
    timings = Timings(timeout_s=settings.request_timeout_s)
    pairs = pairs_of(req)
    check_count(len(pairs), settings.max_inputs, "question/context pairs")
    max_seq_len = req.max_seq_len or min(DEFAULT_MAX_SEQ_LEN, model.max_seq_len)
    if max_seq_len > model.max_seq_len:
        raise InvalidInput(f"max_seq_len {max_seq_len} is over model {model.name!r}'s limit of {model.max_seq_len}")
    # Cheap checks before the expensive windowing: the size in characters, and room in the queue for
    # about as many tokens as the text has (a token is ~4 characters of English; overlap adds some).
    chars = sum(len(q) + len(c) for q, c in pairs)
    if chars > settings.max_qa_chars:
        raise PayloadTooLarge(
            f"the questions and contexts have {chars} characters; the limit is {settings.max_qa_chars} per request "
            "(send shorter contexts or fewer pairs)"
        )
    estimated = min(
        estimated_qa_tokens(pairs, max_seq_len, req.doc_stride, req.max_question_len),
        settings.max_qa_windows * max_seq_len,
    )
    t0 = time.perf_counter()
    try:
        with model.batcher.reserve(len(pairs), estimated):
            windows = await state.tokenize(
                make_windows_batch, model.tokenizer, [q for q, _ in pairs], [c for _, c in pairs],
                max_seq_len=max_seq_len, doc_stride=req.doc_stride, max_question_len=req.max_question_len,
            )  # fmt: skip
    except ValueError as err:
        raise InvalidInput(str(err)) from err
    timings.tokenization_s = time.perf_counter() - t0
    total = sum(len(w) for w in windows)
    if total > state.settings.max_qa_windows:
        raise PayloadTooLarge(
            f"the contexts make {total} windows of {max_seq_len} tokens; the limit is {state.settings.max_qa_windows} "
            "per request (send shorter contexts, fewer pairs, or a larger doc stride)"
        )
    rows = [(w.input_ids, w.token_type_ids) for pair in windows for w in pair]
    longest = max(len(ids) for ids, _ in rows)
    if longest > max_seq_len:  # the windowing broke its contract: never let it reach the model
        raise RuntimeError(f"QA windowing made a window of {longest} tokens (max_seq_len {max_seq_len})")
    results = await wait_for_rows(request, model.batcher.submit(rows, timings.deadline, reserved=True), timings)
    out, k = [], 0
    for (_, context), pair_windows in zip(pairs, windows, strict=True):
        mine = results[k : k + len(pair_windows)]
        k += len(pair_windows)
        answers = decode_answers(
            pad_rows([r.outputs["start_logits"] for r in mine]), pad_rows([r.outputs["end_logits"] for r in mine]),
            pair_windows, context, top_k=req.top_k, max_answer_len=req.max_answer_len,
            handle_impossible_answer=req.handle_impossible_answer,
        )  # fmt: skip
        out.append(QAResult(answers=[Answer(answer=a.text, score=a.score, start=a.start, end=a.end) for a in answers]))
    tokens = sum(len(ids) for ids, _ in rows)
    timings.observe(state.metrics, model.name, "qa", tokens)
    usage = Usage(inputs=len(pairs), input_tokens=tokens, windows=total)
    return QAResponse(model=model.name, results=out, usage=usage), timings
