"""Task metrics: GLUE (accuracy, F1, Matthews, Pearson, Spearman) and SQuAD v1.1 / v2.0 EM and F1.

GLUE metrics are pure functions on numpy arrays and return plain floats on their natural scale
(accuracy, F1 and MCC in [0, 1]; correlations in [-1, 1]); they delegate to scikit-learn / scipy, the
implementations GLUE results are usually computed with. The SQuAD functions reproduce the official
evaluation scripts (v1.1 `evaluate-v1.1.py` and `evaluate-v2.0.py`) and return percentages, as they do.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from scipy import stats
from sklearn import metrics as skm

# ----------------------------------------------------------------------------------------------------
# GLUE


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions [n] equal to labels [n]."""
    return float(skm.accuracy_score(np.asarray(labels), np.asarray(predictions)))


def f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 of the positive class 1 (MRPC, QQP). 0 when there are no positives at all."""
    return float(skm.f1_score(np.asarray(labels), np.asarray(predictions), pos_label=1, zero_division=0.0))


def matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation coefficient (CoLA); 0 when a marginal is constant."""
    return float(skm.matthews_corrcoef(np.asarray(labels), np.asarray(predictions)))


def _correlation(fn, predictions: np.ndarray, labels: np.ndarray) -> float:
    predictions, labels = np.asarray(predictions, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if predictions.size < 2 or np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        return 0.0  # undefined (constant input); 0 rather than NaN so that "best epoch" comparisons work
    return float(fn(predictions, labels)[0])


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation (STS-B); 0 when either side is constant."""
    return _correlation(stats.pearsonr, predictions, labels)


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Spearman rank correlation (STS-B); 0 when either side is constant."""
    return _correlation(stats.spearmanr, predictions, labels)


# ----------------------------------------------------------------------------------------------------
# SQuAD, as the official evaluation scripts define it


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def squad_normalize_answer(s: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (in that order)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def squad_exact(prediction: str, ground_truth: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0 (same in v1.1 and v2.0)."""
    return float(squad_normalize_answer(prediction) == squad_normalize_answer(ground_truth))


def squad_f1(prediction: str, ground_truth: str, *, v2: bool = False) -> float:
    """Token-overlap F1 of the normalised answers.

    The two official scripts differ only when a side normalises to nothing: v1.1 gives 0, v2.0 gives 1
    when both are empty (a correct no-answer) and 0 otherwise.
    """
    pred_tokens = squad_normalize_answer(prediction).split()
    gold_tokens = squad_normalize_answer(ground_truth).split()
    if v2 and (not pred_tokens or not gold_tokens):
        return float(pred_tokens == gold_tokens)
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _questions(dataset_or_examples: Any) -> tuple[list[tuple[str, list[str]]], bool]:
    """(id, gold answer texts) per question, and whether the data is SQuAD v2.0.

    Accepts the official JSON (the whole file as a dict, or its "data" list of articles) or a list of
    examples with `.id`, `.answers` (texts) and `.is_impossible`, `.v2` (as training.squad produces).
    """
    version = ""
    if isinstance(dataset_or_examples, Mapping):
        version = str(dataset_or_examples.get("version", ""))
        dataset_or_examples = dataset_or_examples["data"]
    items = list(dataset_or_examples)
    if items and isinstance(items[0], Mapping):  # official JSON: articles → paragraphs → qas
        qas = [qa for article in items for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
        questions = [(qa["id"], [a["text"] for a in qa["answers"]]) for qa in qas]
        v2 = version.startswith("v2") or any("is_impossible" in qa for qa in qas)
    else:
        questions = [(ex.id, list(ex.answers)) for ex in items]
        v2 = any(ex.v2 or ex.is_impossible for ex in items)
    return questions, v2


def squad_evaluate(
    dataset_or_examples: Any,
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> dict[str, float]:
    """The official SQuAD scores in percent.

    v1.1: {"exact_match", "f1"}: max over the gold answers, averaged over all questions (a question
    without a prediction scores 0, as in evaluate-v1.1.py).
    v2.0 (detected from "version"/"is_impossible"): as evaluate-v2.0.py: gold answers that normalise
    to "" are dropped and an unanswerable question's only gold is ""; a question whose na_prob exceeds
    na_prob_thresh counts as answered "no answer". Adds HasAns_/NoAns_ exact and f1 (when such
    questions exist) and, when na_probs is given, best_exact/best_f1 with their thresholds. Unlike the
    script, which skips them, questions without a prediction count as answered "".
    """
    questions, v2 = _questions(dataset_or_examples)
    if not questions:
        raise ValueError("squad_evaluate: no questions in the data")
    if v2:
        return _squad_v2_evaluate(questions, predictions, na_probs, na_prob_thresh)

    def best(fn, qid: str, golds: list[str]) -> float:
        return max((fn(predictions[qid], g) for g in golds), default=0.0) if qid in predictions else 0.0

    exact = sum(best(squad_exact, q, golds) for q, golds in questions)
    f1s = sum(best(squad_f1, q, golds) for q, golds in questions)
    return {"exact_match": 100.0 * exact / len(questions), "f1": 100.0 * f1s / len(questions)}


def _squad_v2_evaluate(
    questions: list[tuple[str, list[str]]],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None,
    na_prob_thresh: float,
) -> dict[str, float]:
    preds = {q: predictions.get(q, "") for q, _ in questions}
    probs = {q: float(na_probs[q]) if na_probs is not None and q in na_probs else 0.0 for q in preds}
    has_ans, raw_exact, raw_f1 = {}, {}, {}
    for qid, golds in questions:
        has_ans[qid] = bool(golds)
        golds = [g for g in golds if squad_normalize_answer(g)] or [""]
        raw_exact[qid] = max(squad_exact(preds[qid], g) for g in golds)
        raw_f1[qid] = max(squad_f1(preds[qid], g, v2=True) for g in golds)

    def thresholded(raw: dict[str, float]) -> dict[str, float]:
        # A confident "no answer" scores 1 on unanswerable questions and 0 on answerable ones.
        return {q: float(not has_ans[q]) if probs[q] > na_prob_thresh else s for q, s in raw.items()}

    exact, f1s = thresholded(raw_exact), thresholded(raw_f1)

    def mean(scores: dict[str, float], qids: Iterable[str]) -> float:
        qids = list(qids)
        return 100.0 * sum(scores[q] for q in qids) / len(qids)

    out = {"exact_match": mean(exact, preds), "f1": mean(f1s, preds)}
    for prefix, qids in (("HasAns", [q for q in preds if has_ans[q]]), ("NoAns", [q for q in preds if not has_ans[q]])):
        if qids:
            out[f"{prefix}_exact"] = mean(exact, qids)
            out[f"{prefix}_f1"] = mean(f1s, qids)
    if na_probs is not None:
        out["best_exact"], out["best_exact_thresh"] = _best_threshold(preds, raw_exact, probs, has_ans)
        out["best_f1"], out["best_f1_thresh"] = _best_threshold(preds, raw_f1, probs, has_ans)
    return out


def _best_threshold(
    preds: dict[str, str], scores: dict[str, float], na_probs: dict[str, float], has_ans: dict[str, bool]
) -> tuple[float, float]:
    """evaluate-v2.0.py's find_best_thresh: sweep the threshold up through the sorted na_probs, starting
    from "answer nothing" (every NoAns question right), and keep the best total."""
    score = best = sum(1 for q in scores if not has_ans[q])
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):  # stable sort, as in the script
        # answering an answerable question earns its score; answering an unanswerable one costs 1
        score += scores[qid] if has_ans[qid] else (-1 if preds[qid] else 0)
        if score > best:
            best, best_thresh = score, na_probs[qid]
    return 100.0 * best / len(scores), float(best_thresh)
