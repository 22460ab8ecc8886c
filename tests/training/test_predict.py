"""`moebert predict`: GLUE submission TSVs and SQuAD predictions.json / na_probs.json on the small fixture
files, checked for the format the benchmark and the official scripts read and against the model run directly."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moebert.convert import ConvertConfig, convert
from moebert.loading import load_model
from tests.conftest import REPO, save_tiny_bert
from training.predict import PredictConfig, predict
from training.tasks import DataConfig

FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture(scope="module")
def moe_binary(tmp_path_factory, tokenizer):
    dense = save_tiny_bert(tmp_path_factory.mktemp("dense2"), "cls", tokenizer, seed=4, num_labels=2)
    return convert(ConvertConfig(teacher=str(dense), output_dir=str(tmp_path_factory.mktemp("m") / "moe"),
                                 split="random", expert_dim=21, shared_dim=7))  # fmt: skip


def read_tsv(path) -> tuple[list[str], list[list[str]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


def direct_labels(model_dir, texts, pairs=None) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir)
    out = []
    with torch.no_grad():
        for i, text in enumerate(texts):  # one at a time: no padding, an independent path
            enc = tok(text, pairs[i] if pairs else None, truncation=True, max_length=128, return_tensors="pt")
            out.append(model(**enc).logits[0])
    return out


@pytest.mark.parametrize("task,folder,file_name", [("sst2", "SST-2", "SST-2.tsv"), ("cola", "CoLA", "CoLA.tsv")])
def test_glue_test_tsv_is_the_submission_format(task, folder, file_name, moe_binary, tmp_path):
    (written,) = predict(PredictConfig(model=str(moe_binary), data=DataConfig(task=task, data_dir=str(FIXTURES)),
                                       output_dir=str(tmp_path)))  # fmt: skip
    assert written.name == file_name
    header, rows = read_tsv(written)
    assert header == ["index", "prediction"]
    test_header, test_rows = read_tsv(FIXTURES / "glue" / folder / "test.tsv")
    assert [r[0] for r in rows] == [r[0] for r in test_rows]  # the test file's own indices, in order
    assert {r[1] for r in rows} <= {"0", "1"} and all(len(r) == 2 for r in rows)
    sentences = [r[test_header.index("sentence")] for r in test_rows]
    expected = [str(int(logits.argmax())) for logits in direct_labels(moe_binary, sentences)]
    assert [r[1] for r in rows] == expected
    record = json.loads((tmp_path / "predict.json").read_text())
    assert record["files"] == [file_name] and record["splits"] == ["test"]


def test_stsb_predictions_are_clipped_scores(tmp_path, tokenizer):
    model = save_tiny_bert(tmp_path / "reg", "cls", tokenizer, num_labels=1)
    with torch.no_grad():  # a large bias pushes raw outputs outside [0, 5]: they must come out clipped
        m = load_model(model)
        m.classifier.bias.fill_(7.0)
        m.save_pretrained(model)
    (written,) = predict(PredictConfig(model=str(model), data=DataConfig(task="stsb", data_dir=str(FIXTURES)),
                                       output_dir=str(tmp_path / "out")))  # fmt: skip
    assert written.name == "STS-B.tsv"
    header, rows = read_tsv(written)
    _, test_rows = read_tsv(FIXTURES / "glue" / "STS-B" / "test.tsv")
    assert header == ["index", "prediction"] and len(rows) == len(test_rows)
    assert all(0.0 <= float(p) <= 5.0 for _, p in rows) and {p for _, p in rows} == {"5.000"}


def test_mrpc_pairs_and_cli(moe_binary, tmp_path, capsys):
    from moebert_cli import main

    code = main(["predict", str(moe_binary), "--task", "mrpc", "--data-dir", str(FIXTURES), "-o", str(tmp_path)])
    assert code == 0 and capsys.readouterr().out.strip().endswith("MRPC.tsv")
    header, rows = read_tsv(tmp_path / "MRPC.tsv")
    test_header, test_rows = read_tsv(FIXTURES / "glue" / "MRPC" / "test.tsv")
    a, b = test_header.index("#1 String"), test_header.index("#2 String")
    expected = direct_labels(moe_binary, [r[a] for r in test_rows], [r[b] for r in test_rows])
    assert [r[1] for r in rows] == [str(int(x.argmax())) for x in expected]
    # A split with no file: one clear line, exit status 2, nothing written.
    code = main(["predict", str(moe_binary), "--task", "rte", "--data-dir", str(FIXTURES), "-o", str(tmp_path / "x")])
    assert code == 2 and "file not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def moe_qa(tmp_path_factory, tokenizer):
    dense = save_tiny_bert(tmp_path_factory.mktemp("qa"), "qa", tokenizer, seed=2)
    return convert(ConvertConfig(teacher=str(dense), output_dir=str(tmp_path_factory.mktemp("mq") / "moe"),
                                 split="random", expert_dim=21, shared_dim=7))  # fmt: skip


def _question_ids(path) -> list[str]:
    data = json.loads(path.read_text())["data"]
    return [qa["id"] for article in data for para in article["paragraphs"] for qa in para["qas"]]


def test_squad_v1_predictions_json(moe_qa, tmp_path):
    data = DataConfig(task="squad", data_dir=str(FIXTURES), max_length=64, doc_stride=32)
    written = predict(PredictConfig(model=str(moe_qa), data=data, output_dir=str(tmp_path)))
    assert [p.name for p in written] == ["predictions.json"]
    predictions = json.loads(written[0].read_text())
    assert list(predictions) == _question_ids(FIXTURES / "squad" / "dev-v1.1.json")
    squad = json.loads((FIXTURES / "squad" / "dev-v1.1.json").read_text())["data"]
    contexts = {qa["id"]: para["context"] for a in squad
                for para in a["paragraphs"] for qa in para["qas"]}  # fmt: skip
    assert all(isinstance(t, str) and t and (t in contexts[i] or t == "empty") for i, t in predictions.items())


@pytest.mark.parametrize("threshold", [-1e6, 0.0, 1e6])
def test_squad_v2_na_probs_and_threshold(threshold, moe_qa, tmp_path):
    data = DataConfig(task="squad_v2", data_dir=str(FIXTURES), max_length=64, doc_stride=32)
    written = predict(PredictConfig(model=str(moe_qa), data=data, output_dir=str(tmp_path), null_threshold=threshold))
    assert [p.name for p in written] == ["predictions.json", "na_probs.json"]
    predictions = json.loads(written[0].read_text())
    na_probs = json.loads(written[1].read_text())
    ids = _question_ids(FIXTURES / "squad" / "dev-v2.0.json")
    assert list(predictions) == ids and list(na_probs) == ids
    assert all(0.0 <= p <= 1.0 for p in na_probs.values())
    record = json.loads((tmp_path / "predict.json").read_text())
    cut = record["na_prob_thresh"]
    assert cut == pytest.approx(1 / (1 + math.exp(-threshold)) if threshold > -700 else 0.0)
    # The official script's decision with --na-prob-thresh cut is the one written: "" iff P(no answer) > cut.
    for i in ids:
        assert (predictions[i] == "") == (na_probs[i] > cut or na_probs[i] == 1.0), (i, predictions[i], na_probs[i])
    if threshold > 0:
        assert all(p != "" for i, p in predictions.items() if na_probs[i] < 1.0)
    if threshold < 0:
        assert all(p == "" for p in predictions.values())
