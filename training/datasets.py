"""Tokenized task data: any task's split read (training.tasks) and tokenized into a TaskData
(training.features), the one entry point the stages load data through.

Owns: `load_split` (a file of any task: text tasks here, SQuAD windows via training.squad), `load_data`
(a stage's DataConfig split), label ids (`label_names_of`, the label order of a teacher, wins over the
task's), `tokenizer_for`, and `task_texts` / `task_token_counts` (the texts of a task's training file as
the task reads them, for hash-balance routing).

Imports: training.tasks ← training.features ← training.squad ← this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from moebert.loading import load_tokenizer
from moebert.routing import token_counts
from training.features import SEQUENCE_KEYS, EncodedDataset, TaskData
from training.squad import load_squad, read_squad
from training.tasks import DataConfig, DataError, TaskSpec, read_examples, where

_TOKENIZE_CHUNK = 8192


def tokenizer_for(model_path: str | Path):
    """The tokenizer saved with a checkpoint ("no such folder: <path>" for a missing local one)."""
    return load_tokenizer(model_path)


def label_names_of(config) -> tuple[str, ...] | None:
    """The label order a classifier was trained with (None for regression / QA / untrained heads)."""
    id2label = getattr(config, "id2label", None) or {}
    names = tuple(id2label[i] for i in sorted(id2label))
    if not names or all(n.startswith("LABEL_") for n in names):
        return None
    return names


def _label_order(task: TaskSpec, raw_labels: list[str | None], label_names, path: Path) -> tuple[tuple, tuple]:
    """(names, file values) in id order. A fixed order (`label_names`, e.g. a teacher's id2label) wins;
    custom labels are otherwise inferred: sorted, numerically when they are all integers."""
    if label_names is not None:
        label_names = tuple(str(n) for n in label_names)
        if task.labels is None:  # custom data without declared labels: the file values are the names
            return label_names, label_names
        wanted = [n.lower() for n in label_names]  # hub checkpoints write e.g. "ENTAILMENT"
        for known in (task.labels, task.label_values):  # GLUE: accept names or file values, in any order
            known = [k.lower() for k in known]
            if sorted(wanted) == sorted(known):
                order = [known.index(n) for n in wanted]
                return tuple(task.labels[i] for i in order), tuple(task.label_values[i] for i in order)
        expected = list(task.labels)
        raise DataError(f"{path}: label names {list(label_names)} do not match task {task.name} labels {expected}")
    if task.labels is not None:
        return task.labels, task.label_values
    values = sorted({r for r in raw_labels if r is not None})
    if all(v.lstrip("-").isdigit() for v in values):
        values.sort(key=int)
    return tuple(values), tuple(values)


def load_split(
    task: TaskSpec,
    path: str | Path,
    tokenizer,
    *,
    max_length: int = 128,
    doc_stride: int = 128,
    training: bool = True,
    limit: int | None = None,
    label_names: tuple[str, ...] | None = None,
) -> TaskData:
    """Read and tokenize one split.

    Classification / regression: (text, text_pair) truncated to max_length (longest first), labels as
    class ids in the order `label_names` (a teacher's id2label) gives, else the task's (custom: sorted).
    QA: see training.squad.load_squad. limit: only the first `limit` examples.
    """
    path = Path(path)
    if task.kind == "qa":
        return load_squad(task, path, tokenizer, max_length=max_length, doc_stride=doc_stride, training=training,
                          limit=limit)  # fmt: skip
    examples, raw_labels = read_examples(task, path, limit)
    if task.kind == "classification":
        names, values = _label_order(task, raw_labels, label_names, path)
        ids = {v: i for i, v in enumerate(values)}
        for example, raw in zip(examples, raw_labels, strict=True):
            if raw is None:
                continue
            if raw not in ids:
                expected = ", ".join(values)
                raise DataError(f"{where(path, example.line)}: unknown label {raw!r} (expected one of {expected})")
            example.label = ids[raw]
        task = replace(task, labels=names, label_values=values)
    columns: dict[str, list] = {}
    for begin in range(0, len(examples), _TOKENIZE_CHUNK):
        chunk = examples[begin : begin + _TOKENIZE_CHUNK]
        pairs = [e.text_pair for e in chunk] if task.text_pair_column else None
        encoded = tokenizer([e.text for e in chunk], pairs, truncation=True, max_length=max_length)
        for key in SEQUENCE_KEYS:
            if key in encoded:  # int32 arrays: a fraction of the memory of Python int lists (MNLI: 393k pairs)
                columns.setdefault(key, []).extend(np.asarray(ids, dtype=np.int32) for ids in encoded[key])
    dtypes = {}
    if all(e.label is not None for e in examples):
        columns["labels"] = [e.label for e in examples]
        dtypes["labels"] = torch.float if task.kind == "regression" else torch.long
    return TaskData(task, EncodedDataset(columns, dtypes), examples, path, pad_token_id=tokenizer.pad_token_id or 0)


def load_data(
    data: DataConfig,
    split: str,
    tokenizer,
    *,
    training: bool,
    label_names: tuple[str, ...] | None = None,
    limit: int | None = None,
) -> TaskData:
    """`split` of the task `data` names, tokenized with `data`'s lengths (load_split)."""
    return load_split(
        data.spec(), data.path(split), tokenizer, max_length=data.max_length, doc_stride=data.doc_stride,
        training=training, limit=limit, label_names=label_names,
    )  # fmt: skip


def task_texts(task: TaskSpec, path: str | Path, limit: int | None = None) -> Iterator[str]:
    """Every text of a task file as the task reads it (its own columns: both texts of a pair, SQuAD
    questions and contexts); the first `limit` examples only."""
    if task.kind == "qa":
        for example in read_squad(path, v2=task.name == "squad_v2", limit=limit):
            yield example.question
            yield example.context
        return
    examples, _ = read_examples(task, path, limit, labels=False)
    for example in examples:
        yield example.text
        if example.text_pair:
            yield example.text_pair


def task_token_counts(data: DataConfig, tokenizer, vocab_size: int) -> torch.Tensor:
    """Token frequencies [vocab] int64 of the training split's texts (hash-balance routing)."""
    spec = data.spec()
    train = data.path(spec.train_split)
    counts = token_counts(task_texts(spec, train, data.train_limit), tokenizer, vocab_size)
    if not counts.any():
        raise DataError(f"{train}: no tokens found to balance the hash table on")
    return counts
