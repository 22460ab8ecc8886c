"""Smoke test of the out-of-the-box service: `moebert serve` with no --model serves the bundled
models/ folder, each on the runtime `auto` picks for it; the SST-2 MoEBERT calls a
clearly positive review positive and the SQuAD MoEBERT answers most of a SQuAD v1.1 dev paragraph's
questions exactly."""

from __future__ import annotations

import httpx
import pytest
from server_process import ServerProcess

from tests.conftest import REPO
from training.metrics import squad_exact

MODELS = REPO / "models"
# The first paragraph of SQuAD v1.1 dev (Rajpurkar et al., 2016; CC BY-SA 4.0), its 30 questions and their
# gold answers, in dev order (the full paragraph continues past the part quoted in the README).
CONTEXT = (
    "Super Bowl 50 was an American football game to determine the champion of the National Football League "
    "(NFL) for the 2015 season. The American Football Conference (AFC) champion Denver Broncos defeated the "
    "National Football Conference (NFC) champion Carolina Panthers 24–10 to earn their third Super Bowl "
    "title. The game was played on February 7, 2016, at Levi's Stadium in the San Francisco Bay Area at Santa"
    ' Clara, California. As this was the 50th Super Bowl, the league emphasized the "golden anniversary" with'
    " various gold-themed initiatives, as well as temporarily suspending the tradition of naming each Super "
    'Bowl game with Roman numerals (under which the game would have been known as "Super Bowl L"), so that '
    "the logo could prominently feature the Arabic numerals 50."
)
DEV_QUESTIONS = [
    ("Which NFL team represented the AFC at Super Bowl 50?", ["Denver Broncos"]),
    ("Which NFL team represented the NFC at Super Bowl 50?", ["Carolina Panthers"]),
    (
        "Where did Super Bowl 50 take place?",
        [
            "Levi's Stadium",
            "Levi's Stadium in the San Francisco Bay Area at Santa Clara, California.",
            "Santa Clara, California",
        ],
    ),
    ("Which NFL team won Super Bowl 50?", ["Denver Broncos"]),
    ("What color was used to emphasize the 50th anniversary of the Super Bowl?", ["gold"]),
    ("What was the theme of Super Bowl 50?", ['"golden anniversary', '"golden anniversary"', "gold-themed"]),
    ("What day was the game played on?", ["February 7", "February 7, 2016"]),
    ("What is the AFC short for?", ["American Football Conference"]),
    ("What was the theme of Super Bowl 50?", ['"golden anniversary"', "gold", "gold-themed"]),
    ("What does AFC stand for?", ["American Football Conference"]),
    ("What day was the Super Bowl played on?", ["February 7", "February 7, 2016"]),
    ("Who won Super Bowl 50?", ["Denver Broncos"]),
    (
        "What venue did Super Bowl 50 take place in?",
        ["Levi's Stadium", "Levi's Stadium in the San Francisco Bay Area at Santa Clara"],
    ),
    ("What city did Super Bowl 50 take place in?", ["Santa Clara"]),
    ("If Roman numerals were used, what would Super Bowl 50 have been called?", ["L", "Super Bowl L"]),
    ("Super Bowl 50 decided the NFL champion for what season?", ["2015", "the 2015 season"]),
    ("What year did the Denver Broncos secure a Super Bowl title for the third time?", ["2015", "2016"]),
    ("What city did Super Bowl 50 take place in?", ["Santa Clara"]),
    ("What stadium did Super Bowl 50 take place in?", ["Levi's Stadium"]),
    ("What was the final score of Super Bowl 50? ", ["24–10"]),
    ("What month, day and year did Super Bowl 50 take place? ", ["February 7, 2016"]),
    ("What year was Super Bowl 50?", ["2015", "2016"]),
    ("What team was the AFC champion?", ["Denver Broncos"]),
    ("What team was the NFC champion?", ["Carolina Panthers"]),
    ("Who won Super Bowl 50?", ["Denver Broncos"]),
    ("Super Bowl 50 determined the NFL champion for what season?", ["2015", "the 2015 season"]),
    ("Which team won Super Bowl 50.", ["Denver Broncos"]),
    ("Where was Super Bowl 50 held?", ["Levi's Stadium", "Santa Clara, California."]),
    ("The name of the NFL championship game is?", ["Super Bowl"]),
    ("What 2015 NFL team one the AFC playoff?", ["Denver Broncos"]),
]
# The bundled model scores EM 60.5 on the whole dev set and 23 of these 30.
MIN_EXACT = 20

needs_bundle = pytest.mark.skipif(
    not all((MODELS / name / "config.json").is_file() for name in ("sst2", "squad")),
    reason="the bundled models (models/sst2, models/squad) are missing",
)


@pytest.fixture(scope="module")
def default_service():
    server = ServerProcess({}, "--threads", "1").start()
    yield server
    server.stop()


@needs_bundle
def test_default_service_serves_both_bundled_models(default_service):
    models = {m["name"]: m for m in httpx.get(default_service.url + "/v1/models").json()["models"]}
    assert {"sst2", "squad"} <= set(models)
    assert models["sst2"]["task"] == "classification" and models["squad"]["task"] == "qa"
    assert models["sst2"]["experts"] == 4 and models["sst2"]["labels"] == ["negative", "positive"]
    # Each on its fastest CPU runtime at the shapes it serves (its backend_speed.json): int8 ONNX for both,
    # short texts and QA windows (a median of 144 tokens, mostly 1-2 windows per batch) alike.
    assert models["sst2"]["backend"] == "onnx-int8" and models["squad"]["backend"] == "onnx-int8"
    # int8 products exact on every CPU by default (where the fast ones saturate, the slower exact kernels).
    assert models["sst2"]["int8_matmul"] == models["squad"]["int8_matmul"] == "exact"


@needs_bundle
def test_bundled_sentiment_model(default_service):
    reply = httpx.post(
        default_service.url + "/v1/classify",
        json={"inputs": ["a gorgeous, witty, seductive movie.", "a tedious, joyless mess."], "model": "sst2"},
    )
    assert reply.status_code == 200, reply.text
    assert [r["label"] for r in reply.json()["results"]] == ["positive", "negative"]


@needs_bundle
def test_bundled_qa_model_answers_squad_dev_questions(default_service):
    inputs = [{"question": question, "context": CONTEXT} for question, _ in DEV_QUESTIONS]
    reply = httpx.post(default_service.url + "/v1/qa", json={"inputs": inputs, "model": "squad"}, timeout=60)
    assert reply.status_code == 200, reply.text
    best = [result["answers"][0] for result in reply.json()["results"]]
    assert len(best) == len(DEV_QUESTIONS)
    for answer in best:
        assert CONTEXT[answer["start"] : answer["end"]] == answer["answer"]
    # Correct as SQuAD's official script counts it (exact match after its normalisation, best over the golds).
    exact = [
        max(squad_exact(a["answer"], gold) for gold in golds) for a, (_, golds) in zip(best, DEV_QUESTIONS, strict=True)
    ]
    assert sum(exact) >= MIN_EXACT, [(q, a["answer"]) for (q, _), a in zip(DEV_QUESTIONS, best, strict=True)]
    # Asked who won, over a paragraph naming both teams, it names the winner.
    winner = [a["answer"] for a, (q, _) in zip(best, DEV_QUESTIONS, strict=True) if q == "Who won Super Bowl 50?"]
    assert winner and all(w == "Denver Broncos" for w in winner), winner
