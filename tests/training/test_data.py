"""Task data: every GLUE layout (small files written in the distributed format under tests/fixtures/glue,
and the real SST-2 / MRPC / RTE when present), custom CSV / JSONL, bad files, batching, predict/score."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertForSequenceClassification

from tests.conftest import REPO
from training.datasets import load_split
from training.evaluate import predict, score
from training.squad import read_squad
from training.tasks import TASKS, DataError, get_task, read_examples, task_file

FIXTURES = REPO / "tests" / "fixtures"

# (task, split, expected (text, text_pair, label id) of every example) for the files in tests/fixtures/glue.
WITNESS = 'Amrozi accused his brother , whom he called " the witness " .'
GLUE_CASES = [
    ("sst2", "train", [("a gorgeous , witty , seductive movie . ", None, 1),
                       ('the plot is " paper-thin " ', None, 0),
                       ("it 's a charming journey . ", None, 1)]),
    ("sst2", "test", [("uneasy mishmash of styles .", None, None),
                      ("a poor -- if durable -- imitation .", None, None)]),
    ("cola", "train", [("Our friends won't buy this analysis, let alone the next one we propose.", None, 1),
                       ("They drank the pub.", None, 0),
                       ('He said "hello".', None, 1)]),
    ("cola", "test", [("Bill whistled past the house.", None, None),
                      ("The car honked down the road.", None, None)]),
    ("mrpc", "train", [(WITNESS, 'Referring to him as only " the witness " , Amrozi accused his brother .', 1),
                       ("Yucaipa owned Dominick 's before selling the chain .",
                        "Yucaipa bought Dominick 's in 1995 .", 0)]),
    ("mrpc", "test", [("PCCW 's chief will report to Mr So .",
                       "Current chief Mike Butcher will report to So .", None)]),
    ("qqp", "train", [("What is the step by step guide to invest in share market?",
                       "What is the step by step guide to invest in share market in india?", 0),
                      ('How do I read "Ulysses"?', 'What\'s the best way to read "Ulysses"?', 1),
                      ("Why is the sky blue?", "What makes the sky blue?", 1)]),  # the truncated row is skipped
    ("stsb", "train", [("A plane is taking off.", "An air plane is taking off.", 5.0),
                       ('A man is playing a "large" flute.', "A man is playing a flute.", 3.8),
                       ("Obama signs bill.", "Stocks fall.", 0.0)]),
    ("stsb", "test", [("A girl is styling her hair.", "A girl is brushing her hair.", None)]),
    ("mnli", "train", [("Conceptually cream skimming has two basic dimensions.",
                        "Product and geography are what make cream skimming work.", 1),
                       ('you know "during the season" i guess', "You lose the things to the following level.", 0),
                       ("One of our number will carry out your instructions.",
                        "A member of my team will execute your orders.", 2)]),
    ("mnli", "dev_matched", [("The new rights are nice enough", "Everyone really likes the newest benefits", 1),
                             ("This site includes a list of all award winners.",
                              "The Government Executive articles housed on the website are not able to be "
                              "searched.", 2)]),
    ("mnli", "dev_mismatched", [("Your contribution helped make it possible.",
                                 "Your contributions were of no help.", 2),
                                ("The answer has nothing to do with their cause.", "It is not relevant.", 0)]),
    ("qnli", "train", [("When did the third Digimon series begin?",
                        "Unlike the two seasons before it, the third series was darker.", 1),
                       ("Which missile batteries often have individual launchers?", "When MANPADS is operated by "
                        "specialists, batteries may have several dozen teams deploying separately.", 0)]),
    ("rte", "train", [("No Weapons of Mass Destruction Found in Iraq Yet.",
                       "Weapons of Mass Destruction Found in Iraq.", 1),
                      ('A place of sorrow became a place of "celebration".',
                       "Pope Benedict XVI is the new leader.", 0)]),
    ("wnli", "train", [("I stuck a pin through a carrot. When I pulled the pin out, it had a hole.",
                        "The carrot had a hole.", 1),
                       ("John couldn't see the stage with Billy in front of him because he is so short.",
                        "Billy is so short.", 0)]),
]  # fmt: skip


@pytest.mark.parametrize("name, split, expected", GLUE_CASES, ids=[f"{c[0]}-{c[1]}" for c in GLUE_CASES])
def test_glue_layouts(name, split, expected, tokenizer):
    task = get_task(name)
    data = load_split(task, task_file(FIXTURES, task, split), tokenizer)
    assert [(e.text, e.text_pair, e.label) for e in data.examples] == expected
    assert len(data.dataset) == len(expected)
    for i, example in enumerate(data.examples):
        item = data.dataset[i]
        reference = tokenizer(example.text, example.text_pair, truncation=True, max_length=128)
        assert item["input_ids"].tolist() == reference["input_ids"]
        assert item["token_type_ids"].tolist() == reference["token_type_ids"]
        if example.label is None:
            assert "labels" not in item  # test files: nothing to train or score on
        else:
            assert item["labels"].dtype == (torch.float32 if task.kind == "regression" else torch.long)
            assert item["labels"].item() == pytest.approx(example.label)


def test_task_specs():
    assert set(TASKS) == {"sst2", "cola", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli", "squad", "squad_v2",
                          "custom"}  # fmt: skip
    assert get_task("mnli").labels == ("entailment", "neutral", "contradiction")
    assert get_task("mnli").dev_splits == ("dev_matched", "dev_mismatched")
    assert get_task("rte").labels == get_task("qnli").labels == ("entailment", "not_entailment")
    assert get_task("sst2").labels == ("negative", "positive")
    assert get_task("wnli").labels == ("not_entailment", "entailment")
    assert (get_task("mrpc").main_metric, get_task("qqp").main_metric) == ("f1", "f1")
    assert get_task("cola").main_metric == "mcc"
    assert get_task("stsb").kind == "regression" and get_task("stsb").labels is None
    assert get_task("stsb").metrics == ("pearson", "spearman")
    assert get_task("squad_v2").kind == "qa"
    with pytest.raises(DataError, match="unknown task 'sts-b'.*sst2.*squad_v2.*custom"):
        get_task("sts-b")


def test_task_file_paths(tmp_path):
    assert task_file(FIXTURES, get_task("stsb"), "train") == FIXTURES / "glue" / "STS-B" / "train.tsv"
    assert task_file(FIXTURES, get_task("mnli"), "dev_mismatched").name == "dev_mismatched.tsv"
    with pytest.raises(DataError, match=r"glue/QNLI/test\.tsv: file not found"):
        task_file(FIXTURES, get_task("qnli"), "test")
    with pytest.raises(DataError, match=r"squad/dev-v2\.0\.json: file not found"):
        task_file(tmp_path, get_task("squad_v2"), "dev")
    custom = tmp_path / "mine.jsonl"
    custom.write_text('{"text": "x", "label": "a"}\n')
    assert task_file(custom, get_task("custom"), "train") == custom
    (tmp_path / "dev.csv").write_text("text,label\nx,a\n")
    assert task_file(tmp_path, get_task("custom"), "dev") == tmp_path / "dev.csv"
    with pytest.raises(DataError, match="custom data not found"):
        task_file(tmp_path / "nope", get_task("custom"), "train")


def test_real_glue_files(data_dir, tokenizer):
    """The distributed SST-2 / MRPC / RTE files (sizes as in ../shared/data/README.md)."""
    sizes = {("sst2", "train"): 67349, ("sst2", "dev"): 872, ("mrpc", "train"): 3668, ("mrpc", "dev"): 408,
             ("rte", "train"): 2490, ("rte", "dev"): 277}  # fmt: skip
    for (name, split), size in sizes.items():
        task = get_task(name)
        examples, raw = read_examples(task, task_file(data_dir, task, split))
        assert len(examples) == size, (name, split)
        assert set(raw) == set(task.label_values), (name, split)
    task = get_task("mrpc")  # BOM-prefixed header; quotes inside sentences stay as they are
    data = load_split(task, task_file(data_dir, task, "train"), tokenizer, limit=2)
    assert data.examples[0].text.startswith('Amrozi accused his brother , whom he called " the witness "')
    assert data.examples[0].label == 1
    dev = load_split(get_task("sst2"), task_file(data_dir, get_task("sst2"), "dev"), tokenizer)
    assert len(dev.dataset) == 872 and dev.examples[0].text.startswith("it 's a charming and often affecting journey")
    test = load_split(get_task("rte"), task_file(data_dir, get_task("rte"), "test"), tokenizer, limit=3)
    assert [e.label for e in test.examples] == [None] * 3


def test_label_names_reorder(tokenizer):
    """A teacher's id2label order wins over the task's (names or file values, any order)."""
    task = get_task("mnli")
    path = task_file(FIXTURES, task, "train")
    data = load_split(task, path, tokenizer, label_names=("CONTRADICTION", "entailment", "Neutral"))
    assert data.task.labels == ("contradiction", "entailment", "neutral")
    assert [e.label for e in data.examples] == [2, 1, 0]
    sst = load_split(get_task("sst2"), task_file(FIXTURES, get_task("sst2"), "train"), tokenizer,
                     label_names=("positive", "negative"))  # fmt: skip
    assert [e.label for e in sst.examples] == [0, 1, 0]
    with pytest.raises(DataError, match="do not match task mnli labels"):
        load_split(task, path, tokenizer, label_names=("yes", "no", "maybe"))


# ----------------------------------------------------------------------------------------------------
# Custom data


def test_custom_csv_classification(tmp_path, tokenizer):
    train = tmp_path / "train.csv"
    train.write_text('review,answer,verdict\n"great, really",yes,pos\nawful,no,neg\n"so-so ""meh""",maybe,neutral\n')
    task = get_task("custom", text_column="review", text_pair_column="answer", label_column="verdict")
    data = load_split(task, train, tokenizer)
    assert data.task.labels == ("neg", "neutral", "pos")  # inferred, sorted
    assert [(e.text, e.text_pair, e.label) for e in data.examples] == [
        ("great, really", "yes", 2), ("awful", "no", 0), ('so-so "meh"', "maybe", 1)
    ]  # fmt: skip
    assert data.dataset[0]["input_ids"].tolist() == tokenizer("great, really", "yes")["input_ids"]
    # The dev split uses the training order; a label never seen in training is an error.
    dev = tmp_path / "dev.csv"
    dev.write_text("review,answer,verdict\nfine,ok,pos\nhmm,eh,angry\n")
    with pytest.raises(
        DataError, match=r"dev\.csv, line 3: unknown label 'angry' \(expected one of neg, neutral, pos\)"
    ):
        load_split(task, dev, tokenizer, label_names=data.task.labels)
    fixed = get_task("custom", text_column="review", text_pair_column="answer", label_column="verdict",
                     labels=("pos", "neg", "neutral"))  # fmt: skip
    assert [e.label for e in load_split(fixed, train, tokenizer).examples] == [0, 1, 2]


def test_custom_jsonl(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    rows = [{"sentence": "one", "y": 10}, {"sentence": "two", "y": 9}, {"sentence": "three", "y": 10}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    data = load_split(get_task("custom", text_column="sentence", label_column="y"), path, tokenizer)
    assert data.task.labels == ("9", "10")  # integer labels sort numerically
    assert [e.label for e in data.examples] == [1, 0, 1]
    regression = load_split(get_task("custom", text_column="sentence", label_column="y", regression=True), path,
                            tokenizer)  # fmt: skip
    assert regression.task.kind == "regression" and [e.label for e in regression.examples] == [10.0, 9.0, 10.0]
    assert regression.dataset[1]["labels"].dtype == torch.float32
    array = tmp_path / "data.json"  # a JSON array of records works too
    array.write_text(json.dumps(rows))
    assert len(load_split(get_task("custom", text_column="sentence", label_column="y"), array, tokenizer).examples) == 3


def test_limit(tokenizer):
    task = get_task("mnli")
    data = load_split(task, task_file(FIXTURES, task, "train"), tokenizer, limit=2)
    assert len(data.examples) == len(data.dataset) == 2


# ----------------------------------------------------------------------------------------------------
# Bad files: DataError naming the file, the line and the problem


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
BAD_FILES = [
    ("custom-missing-column", "custom", "d.csv", "text,target\nhello,a\n",
     r"d\.csv, line 2: missing column 'label'"),
    ("custom-unknown-label", "custom-fixed", "d.csv", "text,label\nhello,a\nbye,c\n",
     r"d\.csv, line 3: unknown label 'c'"),
    ("custom-empty", "custom", "d.csv", "", r"d\.csv: empty file"),
    ("custom-header-only", "custom", "d.jsonl", "\n\n", r"d\.jsonl: empty file"),
    ("custom-bad-json", "custom", "d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b",\n',
     r"d\.jsonl, line 2: invalid JSON"),
    ("custom-json-shape", "custom", "d.jsonl", '{"text": "a", "label": "x"}\n["b", "y"]\n',
     r"d\.jsonl, line 2: expected a JSON object per line, found list"),
    ("custom-bad-float", "custom-regression", "d.jsonl", '{"text": "a", "label": 1.5}\n{"text": "b", "label": "hi"}\n',
     r"d\.jsonl, line 2: column 'label' must be a finite number, found 'hi'"),
    ("custom-empty-text", "custom", "d.jsonl", '{"text": null, "label": "x"}\n',
     r"d\.jsonl, line 1: column 'text' must be"),
    ("custom-ragged-csv", "custom", "d.csv", "text,label\na,b,c\n",
     r"d\.csv, line 2: expected 2 fields like the header"),
    ("custom-format", "custom", "d.txt", "text\n", r"d\.txt: unsupported custom data format '\.txt'"),
    ("sst2-unknown-label", "sst2", "glue/SST-2/train.tsv", "sentence\tlabel\ngood\t1\nbad\t2\n",
     r"train\.tsv, line 3: unknown label '2' \(expected one of 0, 1\)"),
    ("sst2-missing-column", "sst2", "glue/SST-2/dev.tsv", "sentence\tscore\ngood\t1\n",
     r"dev\.tsv, line 2: missing column 'label'"),
    ("rte-short-row", "rte", "glue/RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tonly one sentence\n",
     r"dev\.tsv, line 2: expected 4 tab-separated fields, found 2"),
    ("stsb-bad-float", "stsb", "glue/STS-B/dev.tsv",
     STSB_HEADER + "0\tg\tf\t2012\t1\tnone\tnone\tA cat.\tA dog.\tfive\n",
     r"dev\.tsv, line 2: column 'score' must be a finite number"),
    ("mrpc-empty", "mrpc", "glue/MRPC/train.tsv", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n",
     r"train\.tsv: empty file"),
]  # fmt: skip


@pytest.mark.parametrize("name, task, filename, text, message", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_files(name, task, filename, text, message, tmp_path, tokenizer):
    if task == "custom-fixed":
        spec = get_task("custom", labels=("a", "b"))
    elif task == "custom-regression":
        spec = get_task("custom", regression=True)
    else:
        spec = get_task(task)
    path = _write(tmp_path, filename, text)
    with pytest.raises(DataError, match=message) as err:
        load_split(spec, path, tokenizer)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path, tokenizer):
    with pytest.raises(DataError, match="nothing.csv: file not found"):
        load_split(get_task("custom"), tmp_path / "nothing.csv", tokenizer)


# ----------------------------------------------------------------------------------------------------
# Batching, predict, score


def test_collate_pads_and_stacks(tokenizer):
    task = get_task("stsb")
    data = load_split(task, task_file(FIXTURES, task, "train"), tokenizer)
    items = [data.dataset[i] for i in range(3)]
    batch = data.collate(items)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    T = max(len(item["input_ids"]) for item in items)
    assert batch["input_ids"].shape == (3, T) and batch["labels"].tolist() == pytest.approx([5.0, 3.8, 0.0])
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == item["input_ids"].tolist()
        assert batch["input_ids"][row, n:].eq(0).all() and batch["attention_mask"][row, n:].eq(0).all()
        assert batch["attention_mask"][row, :n].eq(1).all()
        assert batch["token_type_ids"][row].tolist() == item["token_type_ids"].tolist() + [0] * (T - n)


def test_predict_and_score(tiny_cls_dir, tokenizer):
    """predict() = the model run on each example alone (padding must not leak); score() = hand metrics."""
    model = BertForSequenceClassification.from_pretrained(tiny_cls_dir)  # 3 labels, as MNLI
    model.train()
    task = get_task("mnli")
    data = load_split(task, task_file(FIXTURES, task, "train"), tokenizer)
    logits = predict(model, data, batch_size=2)["logits"]
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        alone = torch.cat([model(**{k: v[None] for k, v in data.dataset[i].items() if k != "labels"}).logits
                           for i in range(len(data.dataset))])  # fmt: skip
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-5)
    gold = np.array([e.label for e in data.examples])
    assert score(data, {"logits": logits}) == pytest.approx(
        {"accuracy": 100 * np.mean(logits.argmax(-1).numpy() == gold)}
    )
    # Fixed logits: exact metric values.
    mrpc = load_split(get_task("mrpc"), task_file(FIXTURES, get_task("mrpc"), "dev"), tokenizer)  # gold 1, 0
    assert score(mrpc, {"logits": torch.tensor([[0.0, 1.0], [0.0, 1.0]])}) == pytest.approx(
        {"f1": 100 * 2 / 3, "accuracy": 50.0}
    )
    stsb = load_split(get_task("stsb"), task_file(FIXTURES, get_task("stsb"), "train"), tokenizer)  # gold 5, 3.8, 0
    result = score(stsb, {"logits": torch.tensor([[4.0], [4.5], [1.0]])})
    assert result["spearman"] == pytest.approx(50.0) and result["pearson"] == pytest.approx(
        100 * np.corrcoef([4.0, 4.5, 1.0], [5.0, 3.8, 0.0])[0, 1]
    )
    unlabeled = load_split(get_task("sst2"), task_file(FIXTURES, get_task("sst2"), "test"), tokenizer)
    with pytest.raises(DataError, match="no gold labels"):
        score(unlabeled, {"logits": torch.zeros(2, 2)})


# ----------------------------------------------------------------------------------------------------
# SQuAD JSON: wrong shapes name the JSON location


def _squad(qas=None, context="Paris is the capital of France.", version="1.1"):
    if qas is None:
        qas = [{"id": "q1", "question": "What is the capital?", "answers": [{"text": "Paris", "answer_start": 0}]}]
    return {"version": version, "data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}


QA = "data[0].paragraphs[0].qas[0]"
BAD_SQUAD = [
    ("not-json", "{'data': []}", r"train-v1\.1\.json, line 1: invalid JSON"),
    ("top-level-list", [1, 2], r"train-v1\.1\.json: expected a SQuAD JSON object with a 'data' array"),
    ("no-paragraphs", {"data": [{"title": "t"}]}, r"data\[0\]: missing 'paragraphs'"),
    ("qas-not-list", {"data": [{"paragraphs": [{"context": "c", "qas": {"id": 1}}]}]},
     r"data\[0\]\.paragraphs\[0\]: qas must be a JSON array, found \{\"id\": 1\}"),
    ("missing-question", _squad([{"id": "q1", "answers": []}]), QA.replace("[", r"\[").replace("]", r"\]")
     + r": missing 'question'"),
    ("answer-start-string", _squad([{"id": "q", "question": "?", "answers": [{"text": "Paris", "answer_start": "0"}]}]),
     r"qas\[0\]\.answers\[0\]: answer_start must be a JSON integer, found \"0\""),
    ("answer-outside", _squad([{"id": "q", "question": "?", "answers": [{"text": "Paris", "answer_start": 99}]}]),
     r"answers\[0\]: answer_start 99 is outside the context"),
    ("v1-unanswerable", _squad([{"id": "q", "question": "?", "answers": []}]),
     r"qas\[0\]: unanswerable question in a SQuAD v1\.1 task \(use the squad_v2 task\)"),
    ("wrong-offset", _squad([{"id": "q", "question": "?", "answers": [{"text": "France", "answer_start": 2}]}]),
     r"question 'q': answer_start 2 does not point at the answer \"France\""),
    ("duplicate-id", _squad([{"id": "q", "question": "?", "answers": [{"text": "Paris", "answer_start": 0}]}] * 2),
     r"qas\[1\]: duplicate question id 'q'"),
    ("empty", {"version": "1.1", "data": []}, r"train-v1\.1\.json: no questions in the file"),
]  # fmt: skip


@pytest.mark.parametrize("name, content, message", BAD_SQUAD, ids=[c[0] for c in BAD_SQUAD])
def test_bad_squad_files(name, content, message, tmp_path, tokenizer):
    path = tmp_path / "squad" / "train-v1.1.json"
    path.parent.mkdir()
    path.write_text(content if isinstance(content, str) else json.dumps(content, indent=1))
    with pytest.raises(DataError, match=message) as err:
        load_split(get_task("squad"), path, tokenizer, max_length=64, doc_stride=16)
    assert str(path) in str(err.value)


def test_squad_files(tokenizer):
    v1 = read_squad(task_file(FIXTURES, get_task("squad"), "dev"), v2=False)
    assert [e.id for e in v1] == ["n1", "n2", "n5", "o1", "o2"] and len(v1[0].answers) == 3
    assert not any(e.is_impossible or e.v2 for e in v1)
    v2 = read_squad(task_file(FIXTURES, get_task("squad_v2"), "dev"), v2=True, limit=4)
    assert [(e.id, e.is_impossible, e.answers[:1]) for e in v2] == [
        ("n1", False, ["France"]), ("n2", False, ["Rollo"]),
        ("n5", False, ["Carolingian-based cultures of West Francia"]), ("x1", True, []),
    ]  # fmt: skip
    assert v2[0].context[v2[0].answer_starts[0] :].startswith("France") and all(e.v2 for e in v2)
