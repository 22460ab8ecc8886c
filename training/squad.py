"""SQuAD v1.1 and v2.0: the official JSON read into examples, tokenized into windows (moebert.qa), and
model logits decoded into the predictions the official metrics score.

Training features and the evaluation decoding follow transformers' examples/pytorch/question-answering
(run_qa.py: prepare_train_features and postprocess_qa_predictions), the setup SQuAD results of BERT
and MoEBERT are reported with: windows of max_length tokens overlapping by doc_stride, an answer
not wholly inside a window labelled as [CLS]; at evaluation the best span by start + end logit over
all windows (20 best starts and ends per window, at most 30 tokens), and for v2.0 "no answer" when
the smallest [CLS] score beats it.

Imports the task layer (training.tasks, training.features) and nothing above it: training.datasets
dispatches a QA split here, training.evaluate decodes predictions with `decode_predictions`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moebert.qa import QAWindow, make_windows_batch
from training.features import EncodedDataset, TaskData
from training.tasks import DataError, TaskSpec, where

N_BEST = 20  # run_qa's n_best_size
MAX_ANSWER_LEN = 30  # run_qa's max_answer_length (tokens)
_CHUNK = 512  # examples tokenized per call: bounds the memory of the tokenizer's Python lists


@dataclass
class QAExample:
    """One question. answers: the gold answer texts ([] when unanswerable), answer_starts their
    character offsets in context; v2: it comes from a SQuAD v2.0 task (metrics use the v2.0 rules)."""

    id: str
    title: str
    question: str
    context: str
    answers: list[str]
    answer_starts: list[int]
    is_impossible: bool
    v2: bool


# ----------------------------------------------------------------------------------------------------
# Reading the JSON


def _expect(value: Any, kind: type | tuple[type, ...], path: Path, location: str, what: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where(path, location)}: {what} must be a JSON {_json_name(names)}, found {_show(value)}")
    return value


def _json_name(python_name: str) -> str:
    names = {"dict": "object", "list": "array", "str": "string", "int": "integer", "bool": "boolean"}
    return " or ".join(names.get(n, n) for n in python_name.split(" or "))


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _field(record: dict, key: str, path: Path, location: str) -> Any:
    if key not in record:
        raise DataError(f"{where(path, location)}: missing {key!r} (keys: {', '.join(record) or 'none'})")
    return record[key]


def read_squad(path: str | Path, *, v2: bool, limit: int | None = None) -> list[QAExample]:
    """The questions of an official SQuAD JSON file, in file order (the first `limit` only).

    Shape problems name the JSON location, e.g. "data[3].paragraphs[0].qas[2]: missing 'question'".
    A v1.1 task rejects unanswerable questions (that is SQuAD v2.0 data).
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            root = json.load(f)
    except FileNotFoundError as err:
        raise DataError(f"{path}: file not found") from err
    except json.JSONDecodeError as err:
        raise DataError(f"{where(path, err.lineno)}: invalid JSON ({err.msg})") from err
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason})") from err
    if not isinstance(root, dict) or not isinstance(root.get("data"), list):
        raise DataError(f"{path}: expected a SQuAD JSON object with a 'data' array of articles, found {_show(root)}")
    examples: list[QAExample] = []
    seen: set[str] = set()
    for a, article in enumerate(root["data"]):
        loc = f"data[{a}]"
        _expect(article, dict, path, loc, "an article")
        title = article.get("title", "")
        for p, paragraph in enumerate(_expect(_field(article, "paragraphs", path, loc), list, path, loc, "paragraphs")):
            ploc = f"{loc}.paragraphs[{p}]"
            _expect(paragraph, dict, path, ploc, "a paragraph")
            context = _expect(_field(paragraph, "context", path, ploc), str, path, ploc, "context")
            if not context.strip():
                raise DataError(f"{where(path, ploc)}: empty context")
            for q, qa in enumerate(_expect(_field(paragraph, "qas", path, ploc), list, path, ploc, "qas")):
                if limit is not None and len(examples) >= limit:
                    return examples
                example = _example(qa, f"{ploc}.qas[{q}]", str(title), context, v2, path)
                if example.id in seen:
                    raise DataError(f"{where(path, f'{ploc}.qas[{q}]')}: duplicate question id {example.id!r}")
                seen.add(example.id)
                examples.append(example)
    if not examples:
        raise DataError(f"{path}: no questions in the file")
    return examples


def _example(qa: Any, loc: str, title: str, context: str, v2: bool, path: Path) -> QAExample:
    _expect(qa, dict, path, loc, "a question")
    qid = str(_expect(_field(qa, "id", path, loc), (str, int), path, loc, "id"))
    question = _expect(_field(qa, "question", path, loc), str, path, loc, "question")
    if not question.strip():
        raise DataError(f"{where(path, loc)}: empty question")
    answers = _expect(_field(qa, "answers", path, loc), list, path, loc, "answers")
    texts, starts = [], []
    for i, answer in enumerate(answers):
        aloc = f"{loc}.answers[{i}]"
        _expect(answer, dict, path, aloc, "an answer")
        text = _expect(_field(answer, "text", path, aloc), str, path, aloc, "text")
        start = _expect(_field(answer, "answer_start", path, aloc), int, path, aloc, "answer_start")
        if not 0 <= start <= len(context) - len(text):
            raise DataError(f"{where(path, aloc)}: answer_start {start} is outside the context")
        texts.append(text)
        starts.append(start)
    is_impossible = _expect(qa.get("is_impossible", not texts), bool, path, loc, "is_impossible") or not texts
    if is_impossible and not v2:
        raise DataError(f"{where(path, loc)}: unanswerable question in a SQuAD v1.1 task (use the squad_v2 task)")
    return QAExample(qid, title, question, context, texts, starts, is_impossible, v2)


# ----------------------------------------------------------------------------------------------------
# Features


def answer_positions(offsets: list[tuple[int, int] | None], start_char: int, end_char: int) -> tuple[int, int]:
    """Token positions of the answer [start_char, end_char) in a window, (0, 0) ([CLS]) when it is not
    wholly inside the window's context. As run_qa's prepare_train_features, except that the start never
    runs past the context (run_qa's noted edge case for an answer on the window's last token)."""
    context = [i for i, o in enumerate(offsets) if o is not None]
    if not context or not (offsets[context[0]][0] <= start_char and offsets[context[-1]][1] >= end_char):
        return 0, 0
    start = max(i for i in context if offsets[i][0] <= start_char)  # last token starting at or before it
    end = min(i for i in context if offsets[i][1] >= end_char)  # first token ending at or after it
    return start, end


def _check_answer(example: QAExample, path: Path) -> None:
    text, start = example.answers[0], example.answer_starts[0]
    if example.context[start : start + len(text)] != text:
        raise DataError(
            f"{where(path, f'question {example.id!r}')}: answer_start {start} does not point at the answer "
            f"{_show(text)} (the context has {_show(example.context[start : start + len(text)])} there)"
        )


def load_squad(
    task: TaskSpec,
    path: str | Path,
    tokenizer,
    *,
    max_length: int = 384,
    doc_stride: int = 128,
    training: bool = True,
    limit: int | None = None,
) -> TaskData:
    """Tokenized SQuAD windows.

    training=True: one item per window with start/end_positions (the first gold answer; [CLS] = 0 for
    unanswerable questions and answers outside the window). training=False: the windows without
    labels, with window_example and window_offsets to decode answers (decode_predictions).
    """
    path = Path(path)
    v2 = task.name == "squad_v2"
    examples = read_squad(path, v2=v2, limit=limit)
    columns: dict[str, list] = {"input_ids": [], "attention_mask": [], "token_type_ids": []}
    if training:
        columns |= {"start_positions": [], "end_positions": []}
    window_example: list[int] = []
    window_offsets: list[np.ndarray] = []
    for begin in range(0, len(examples), _CHUNK):
        chunk = examples[begin : begin + _CHUNK]
        try:
            windows = make_windows_batch(
                tokenizer, [e.question for e in chunk], [e.context for e in chunk], max_seq_len=max_length,
                doc_stride=doc_stride, word_spans=False,
            )  # fmt: skip
        except ValueError as err:
            raise DataError(f"{path}: cannot window the questions {begin}-{begin + len(chunk) - 1}: {err}") from err
        for offset, (example, example_windows) in enumerate(zip(chunk, windows, strict=True)):
            if training and not example.is_impossible:
                _check_answer(example, path)
            for window in example_windows:
                for key in ("input_ids", "attention_mask", "token_type_ids"):
                    columns[key].append(np.asarray(getattr(window, key), dtype=np.int32))
                if training:
                    start, end = _training_positions(window, example)
                    columns["start_positions"].append(start)
                    columns["end_positions"].append(end)
                else:
                    window_offsets.append(_offset_array(window))
                window_example.append(begin + offset)
    return TaskData(
        task, EncodedDataset(columns), examples, path, window_example=window_example,
        window_offsets=None if training else window_offsets, pad_token_id=tokenizer.pad_token_id or 0,
    )  # fmt: skip


def _training_positions(window: QAWindow, example: QAExample) -> tuple[int, int]:
    if example.is_impossible:
        return 0, 0
    start_char = example.answer_starts[0]
    return answer_positions(window.offsets, start_char, start_char + len(example.answers[0]))


def _offset_array(window: QAWindow) -> np.ndarray:
    """[n, 2] int32 character offsets of the context tokens, -1 for the others (compact for 10k+ windows)."""
    return np.array([o if o is not None else (-1, -1) for o in window.offsets], dtype=np.int32).reshape(-1, 2)


# ----------------------------------------------------------------------------------------------------
# Decoding


@dataclass
class _Candidate:
    score: float
    start: int  # characters [start, end) of the context
    end: int
    start_logit: float
    end_logit: float


def _window_candidates(start_logits: np.ndarray, end_logits: np.ndarray, offsets: np.ndarray, n_best: int,
                       max_answer_len: int) -> list[_Candidate]:  # fmt: skip
    """run_qa's spans of one window: the n_best best starts × n_best best ends that are context tokens,
    end ≥ start and at most max_answer_len tokens long, in run_qa's order (by start rank, then end rank)."""
    starts = np.argsort(start_logits)[-1 : -n_best - 1 : -1]
    ends = np.argsort(end_logits)[-1 : -n_best - 1 : -1]
    s, e = np.meshgrid(starts, ends, indexing="ij")
    s, e = s.reshape(-1), e.reshape(-1)
    ok = (offsets[s, 0] >= 0) & (offsets[e, 0] >= 0) & (e >= s) & (e - s + 1 <= max_answer_len)
    s, e = s[ok], e[ok]
    scores = start_logits[s] + end_logits[e]
    return [
        _Candidate(float(score), int(offsets[i, 0]), int(offsets[j, 1]), float(start_logits[i]), float(end_logits[j]))
        for score, i, j in zip(scores, s, e, strict=True)
    ]


def decode_predictions(
    data: TaskData,
    start_logits: list[np.ndarray],
    end_logits: list[np.ndarray],
    *,
    n_best: int = N_BEST,
    max_answer_len: int = MAX_ANSWER_LEN,
    null_threshold: float = 0.0,
) -> dict:
    """run_qa's postprocess_qa_predictions: {"predictions": {id: text}} and, for v2.0, "na_probs".

    start_logits, end_logits: one array [n] per window of `data` (in dataset order, n = its length).
    v1.1: the best-scoring span (start + end logit) over the question's windows. v2.0: "" when the
    smallest [CLS] score of its windows exceeds the best span's score by more than `null_threshold`
    (run_qa's null_score_diff_threshold, default 0);
    na_probs = sigmoid(null score − best span score), the probability-like score the official v2.0
    script thresholds.
    """
    if data.window_offsets is None or data.window_example is None:
        raise ValueError("decode_predictions needs evaluation windows (load_split(..., training=False))")
    if len(start_logits) != len(data.window_example):
        raise ValueError(f"{len(start_logits)} windows of logits for {len(data.window_example)} windows")
    v2 = data.task.name == "squad_v2"
    by_example: dict[int, list[int]] = {}
    for w, e in enumerate(data.window_example):
        by_example.setdefault(e, []).append(w)
    predictions: dict[str, str] = {}
    na_probs: dict[str, float] = {}
    for index, example in enumerate(data.examples):
        candidates: list[_Candidate] = []
        null: _Candidate | None = None
        for w in by_example.get(index, []):
            s_logits, e_logits = np.asarray(start_logits[w]), np.asarray(end_logits[w])
            null_score = float(s_logits[0] + e_logits[0])
            if null is None or null.score > null_score:  # the window least sure there is no answer
                null = _Candidate(null_score, 0, 0, float(s_logits[0]), float(e_logits[0]))
            candidates += _window_candidates(s_logits, e_logits, data.window_offsets[w], n_best, max_answer_len)
        if v2 and null is not None:
            candidates.append(null)
        best = sorted(candidates, key=lambda c: c.score, reverse=True)[:n_best]
        texts = [example.context[c.start : c.end] for c in best]
        if not v2:
            # run_qa answers the placeholder "empty" when no span qualifies.
            predictions[example.id] = texts[0] if texts and texts[0] else "empty"
            continue
        non_null = next((c for c, t in zip(best, texts, strict=True) if t), None)
        if null is None or non_null is None:
            predictions[example.id], na_probs[example.id] = "", 1.0
            continue
        diff = null.score - non_null.start_logit - non_null.end_logit
        predictions[example.id] = "" if diff > null_threshold else example.context[non_null.start : non_null.end]
        na_probs[example.id] = _sigmoid(diff)
    return {"predictions": predictions, "na_probs": na_probs} if v2 else {"predictions": predictions}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
