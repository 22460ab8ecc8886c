"""POST /v1/classify: texts or text pairs → label and score (or a value, for regression)."""

from __future__ import annotations

import time

import numpy as np
from fastapi import Request

from server.batching import bucket_length
from server.handling import Timings, check_count, check_text, wait_for_rows
from server.registry import ServedModel
from server.schemas import ClassifyRequest, ClassifyResponse, ClassifyResult, LabelScore, TextPair, Usage

# Inputs up to this many characters are tokenized on the event loop (well under a millisecond); longer
# ones in the tokenizer thread, so that one huge text does not hold up every other request.
INLINE_CHARS = 4096


def normalize_inputs(inputs) -> list[tuple[str, str | None]]:
    """The accepted shapes → [(text, text_pair or None)]; blank or non-Unicode texts are a 422."""
    items = inputs if isinstance(inputs, list) else [inputs]
    out: list[tuple[str, str | None]] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            text, pair = item, None
        elif isinstance(item, TextPair):
            text, pair = item.text, item.text_pair
        else:
            text, pair = item
        check_text(text, f"inputs[{i}]")
        if pair is not None:
            check_text(pair, f"inputs[{i}] (its text_pair)")
        out.append((text, pair))
    return out


def scores_of(logits: np.ndarray, model: ServedModel, raw: bool) -> np.ndarray:
    """logits [C] → scores [C]: softmax (sigmoid for multi-label), as transformers' pipeline does."""
    if raw:
        return logits
    if getattr(model.config, "problem_type", None) == "multi_label_classification":
        return 1 / (1 + np.exp(-logits))
    z = np.exp(logits - logits.max())
    return z / z.sum()


def result_of(logits: np.ndarray, model: ServedModel, req: ClassifyRequest) -> ClassifyResult:
    logits = logits.astype(np.float64)
    if model.is_regression:
        return ClassifyResult(value=float(logits[0]))
    scores = scores_of(logits, model, req.raw_scores)
    order = np.argsort(-scores, kind="stable")
    labels = model.labels
    best = int(order[0])
    result = ClassifyResult(label=labels[best], score=float(scores[best]))
    k = len(labels) if req.all_scores else min(req.top_k, len(labels))
    if k > 1:
        result.labels = [LabelScore(label=labels[int(j)], score=float(scores[int(j)])) for j in order[:k]]
    return result


async def classify(
    req: ClassifyRequest, request: Request, model: ServedModel, state
) -> tuple[ClassifyResponse, Timings]:
    timings = Timings(timeout_s=state.settings.request_timeout_s)
    items = normalize_inputs(req.inputs)
    check_count(len(items), state.settings.max_inputs, "inputs")
    chars = sum(len(a) + len(b or "") for a, b in items)
    # Padded tokens, before tokenizing: ~1 token per 3 characters (erring high), 3 special tokens.
    estimated = sum(min(bucket_length((len(a) + len(b or "")) // 3 + 3), model.max_seq_len) for a, b in items)
    t0 = time.perf_counter()
    with model.batcher.reserve(len(items), estimated):  # cheap and early: 429 before tokenizing
        if chars > INLINE_CHARS:  # long texts take a while to tokenize: off the event loop
            rows = await state.tokenize(model.encode, items, req.truncate)
        else:
            rows = model.encode(items, req.truncate)
    timings.tokenization_s = time.perf_counter() - t0
    futures = model.batcher.submit(rows, timings.deadline, reserved=True)
    results = await wait_for_rows(request, futures, timings)
    tokens = sum(len(ids) for ids, _ in rows)
    response = ClassifyResponse(
        model=model.name,
        results=[result_of(r.outputs["logits"], model, req) for r in results],
        usage=Usage(inputs=len(items), input_tokens=tokens),
    )
    timings.observe(state.metrics, model.name, "classify", tokens)
    return response, timings
