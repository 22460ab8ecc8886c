"""Metrics: GLUE metrics against independent numpy formulas; SQuAD against hand-computed cases of the
official v1.1 / v2.0 evaluation scripts (normalisation, max over golds, no-answer, thresholds)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from training.metrics import (
    accuracy,
    f1,
    matthews,
    pearson,
    spearman,
    squad_evaluate,
    squad_exact,
    squad_f1,
    squad_normalize_answer,
)

# ----------------------------------------------------------------------------------------------------
# GLUE: compared with the textbook formulas, computed here from the confusion counts / ranks


def _confusion(pred, gold):
    tp = np.sum((pred == 1) & (gold == 1))
    tn = np.sum((pred == 0) & (gold == 0))
    fp = np.sum((pred == 1) & (gold == 0))
    fn = np.sum((pred == 0) & (gold == 1))
    return tp, tn, fp, fn


@pytest.mark.parametrize("seed", range(5))
def test_binary_metrics_match_formulas(seed):
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 2, 50)
    pred = np.where(rng.random(50) < 0.7, gold, 1 - gold)
    tp, tn, fp, fn = _confusion(pred, gold)
    assert accuracy(pred, gold) == pytest.approx((tp + tn) / 50)
    assert f1(pred, gold) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    assert matthews(pred, gold) == pytest.approx(mcc)


def test_binary_metrics_by_hand():
    gold = np.array([1, 1, 0, 0, 1])
    pred = np.array([1, 0, 0, 1, 1])  # tp 2, tn 1, fp 1, fn 1
    assert accuracy(pred, gold) == pytest.approx(0.6)
    assert f1(pred, gold) == pytest.approx(2 / 3)
    assert matthews(pred, gold) == pytest.approx((2 * 1 - 1 * 1) / np.sqrt(3 * 3 * 2 * 2))
    assert f1(np.zeros(3), np.zeros(3)) == 0.0  # no positives anywhere: 0, not an exception
    assert matthews(np.ones(4), np.array([0, 1, 0, 1])) == 0.0  # constant prediction
    assert accuracy(np.array([2, 0, 1]), np.array([2, 1, 1])) == pytest.approx(2 / 3)  # multi-class


def _ranks(x):
    """Average ranks (ties share the mean of their positions), by hand."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2
        i = j + 1
    return ranks


def test_correlations_match_formulas():
    rng = np.random.default_rng(0)
    gold = np.round(rng.uniform(0, 5, 40), 1)  # STS-B-like scores with ties
    pred = gold + rng.normal(0, 1, 40)
    pred[:5] = pred[0]  # ties on the prediction side too
    centred = lambda v: v - v.mean()
    r = np.sum(centred(pred) * centred(gold)) / np.sqrt(np.sum(centred(pred) ** 2) * np.sum(centred(gold) ** 2))
    assert pearson(pred, gold) == pytest.approx(r)
    rp, rg = _ranks(pred), _ranks(gold)
    rho = np.sum(centred(rp) * centred(rg)) / np.sqrt(np.sum(centred(rp) ** 2) * np.sum(centred(rg) ** 2))
    assert spearman(pred, gold) == pytest.approx(rho)
    assert spearman(np.array([4.0, 4.5, 1.0]), np.array([5.0, 3.8, 0.0])) == pytest.approx(0.5)  # 1 - 6·2/(3·8)
    assert pearson(np.ones(4), gold[:4]) == 0.0  # undefined → 0


# ----------------------------------------------------------------------------------------------------
# SQuAD


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  an   apple\t\npie ", "apple pie"),
        ("A.B.C.", "abc"),  # punctuation goes before articles are matched: "a.b.c." → "abc", not "b c"
        ("(the) answer!", "answer"),
        ("theory of them", "theory of them"),  # articles only as whole words
        ("A-ha", "aha"),
        ("Rock 'n' Roll", "rock n roll"),
        ("the the the", ""),
        ("Über Café", "über café"),  # non-ASCII letters are kept, only lower-cased
        ("“quoted”", "“quoted”"),  # typographic quotes are not in string.punctuation (as in the official script)
        ("", ""),
    ],
)
def test_normalize_answer(raw, normalized):
    assert squad_normalize_answer(raw) == normalized


def test_exact_and_f1_by_hand():
    assert squad_exact("the Eiffel tower.", "Eiffel Tower") == 1.0
    assert squad_exact("Eiffel", "Eiffel Tower") == 0.0
    # pred {cat, sat}, gold {cat, sat, on, mat}: precision 1, recall 1/2
    assert squad_f1("the cat sat", "a cat sat on the mat") == pytest.approx(2 / 3)
    # repeated tokens count with multiplicity: common = min(3, 2) cats → P = R = 2/3
    assert squad_f1("cat cat cat", "cat cat dog") == pytest.approx(2 / 3)
    assert squad_f1("1889 and 1890", "in 1889") == pytest.approx(0.4)  # P 1/3, R 1/2
    assert squad_f1("Paris", "London") == 0.0
    # Empty answers: v1.1 gives 0 even when both are empty; v2.0 gives 1 when both are empty.
    assert squad_f1("", "") == 0.0 and squad_f1("", "", v2=True) == 1.0
    assert squad_f1("the", "", v2=True) == 1.0  # "the" normalises to nothing
    assert squad_f1("", "Paris", v2=True) == 0.0 and squad_f1("Paris", "", v2=True) == 0.0
    assert squad_exact("", "") == 1.0


def _squad_json(questions, version):
    """questions: (id, [gold texts]); v2 questions without golds are impossible."""
    qas = []
    for qid, golds in questions:
        qa = {"id": qid, "question": "?", "answers": [{"text": g, "answer_start": 0} for g in golds]}
        if version == "v2.0":
            qa["is_impossible"] = not golds
        qas.append(qa)
    return {"version": version, "data": [{"title": "t", "paragraphs": [{"context": "c", "qas": qas}]}]}


def test_squad_v1_evaluate():
    data = _squad_json([("q1", ["Denver Broncos", "the Denver Broncos"]), ("q2", ["Santa Clara, California"]),
                        ("q3", ["1889"]), ("q4", ["a"])], "1.1")  # fmt: skip
    predictions = {"q1": "Broncos", "q2": "santa clara california", "q4": ""}  # q3: no prediction → 0
    # q1: best gold "Denver Broncos": P 1, R 1/2 → F1 2/3, EM 0. q2: EM 1. q4: gold "a" normalises to "",
    # prediction "" → EM 1 but F1 0 (v1.1 F1 of two empty answers).
    result = squad_evaluate(data, predictions)
    assert result == pytest.approx({"exact_match": 100 * 2 / 4, "f1": 100 * (2 / 3 + 1) / 4})
    assert squad_evaluate(data["data"], predictions) == pytest.approx(result)  # the articles list works too
    examples = [SimpleNamespace(id=q, answers=golds, is_impossible=False, v2=False)
                for q, golds in [("q1", ["Denver Broncos", "the Denver Broncos"]), ("q2", ["Santa Clara, California"]),
                                 ("q3", ["1889"]), ("q4", ["a"])]]  # fmt: skip
    assert squad_evaluate(examples, predictions) == pytest.approx(result)


V2_QUESTIONS = [("q1", ["the Eiffel Tower", "Eiffel Tower"]), ("q2", ["in 1889"]), ("q3", []), ("q4", [])]
V2_PREDICTIONS = {"q1": "eiffel tower", "q2": "1889 and 1890", "q3": "", "q4": "Paris"}
V2_NA_PROBS = {"q1": 0.1, "q2": 0.6, "q4": 0.7, "q3": 0.9}


def test_squad_v2_evaluate_by_hand():
    data = _squad_json(V2_QUESTIONS, "v2.0")
    # Raw: q1 EM 1 F1 1; q2 EM 0 F1 0.4; q3 (no answer, predicted "") 1 / 1; q4 (no answer, "Paris") 0 / 0.
    # Best thresholds, sweeping na_probs upwards from "answer nothing" (2 of 4 right):
    #   q1 (0.1): +1 → 3 (best, both EM and F1); q2 (0.6): EM +0 → 3, F1 +0.4 → 3.4 (best F1);
    #   q4 (0.7): -1 (it answered a no-answer question); q3 (0.9): +0.
    expected = {
        "exact_match": 50.0, "f1": 60.0, "HasAns_exact": 50.0, "HasAns_f1": 70.0, "NoAns_exact": 50.0,
        "NoAns_f1": 50.0, "best_exact": 75.0, "best_exact_thresh": 0.1, "best_f1": 85.0, "best_f1_thresh": 0.6,
    }  # fmt: skip
    assert squad_evaluate(data, V2_PREDICTIONS, V2_NA_PROBS) == pytest.approx(expected)
    # Without na_probs: no best-threshold figures.
    assert set(squad_evaluate(data, V2_PREDICTIONS)) == {"exact_match", "f1", "HasAns_exact", "HasAns_f1",
                                                         "NoAns_exact", "NoAns_f1"}  # fmt: skip
    # na_prob_thresh 0.5: q2, q4, q3 count as "no answer": q2 → 0, q4 → 1, q3 → 1.
    thresholded = squad_evaluate(data, V2_PREDICTIONS, V2_NA_PROBS, na_prob_thresh=0.5)
    assert {k: thresholded[k] for k in ("exact_match", "f1", "HasAns_f1", "NoAns_exact")} == pytest.approx(
        {"exact_match": 75.0, "f1": 75.0, "HasAns_f1": 50.0, "NoAns_exact": 100.0}
    )


def test_squad_v2_drops_golds_that_normalise_to_nothing():
    # v2.0 drops the gold "a" (normalises to ""), so "" no longer matches; v1.1 keeps it.
    golds = [("q", ["a", "Tower"])]
    assert squad_evaluate(_squad_json(golds, "v2.0"), {"q": ""})["exact_match"] == 0.0
    assert squad_evaluate(_squad_json(golds, "1.1"), {"q": ""})["exact_match"] == 100.0
    assert squad_evaluate(_squad_json(golds, "v2.0"), {"q": "the tower"})["f1"] == 100.0
