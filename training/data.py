"""Task data: the GLUE and SQuAD tasks and custom CSV/JSONL files, read into tokenized datasets, plus
running a model over a split and scoring it.

Every problem with a file surfaces as a `DataError` naming the file, the line (or JSON location) and
what is wrong, never as a traceback from inside a parser. SQuAD lives in `training.squad` (imported
lazily here, as it imports this module); QA windowing and answer decoding shared with the server live
in `moebert.qa`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from training import metrics as M

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A task file that cannot be used; the message names the file, the line and the problem."""


def where(path: str | Path, line: int | str | None = None) -> str:
    """`file` or `file, line N` (or `file, <JSON location>`), the prefix of every DataError message."""
    if line is None:
        return str(path)
    return f"{path}, line {line}" if isinstance(line, int) else f"{path}, {line}"


# ----------------------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class TaskSpec:
    """What a task is (kind, labels, metrics, splits) and how its files are laid out.

    For GLUE the columns are header names (or positional names for CoLA's header-less files); for
    custom data they are the user's column names. `label_values` are the label strings as written in
    the files, in id order (GLUE's binary tasks write "0"/"1" but have readable `labels`).
    """

    name: str
    kind: str  # "classification" | "regression" | "qa"
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    main_metric: str
    train_split: str = "train"
    dev_splits: tuple[str, ...] = ("dev",)
    folder: str | None = None  # under data_dir: "glue/SST-2", "squad"; None for custom
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    label_values: tuple[str, ...] | None = None
    headerless_columns: tuple[str, ...] | None = None  # CoLA train/dev: no header row, these columns
    skip_short_rows: bool = False  # QQP's distributed train file has a few truncated rows

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == "regression" else len(self.labels or ())


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
# name, folder, text column, text pair column, label column, label names in id order (None: regression),
# label values as the files write them (when they differ from the names)
_GLUE = [
    ("sst2", "SST-2", "sentence", None, "label", ("negative", "positive"), _BINARY),
    ("cola", "CoLA", "sentence", None, "label", ("unacceptable", "acceptable"), _BINARY),
    ("mrpc", "MRPC", "#1 String", "#2 String", "Quality", ("not_equivalent", "equivalent"), _BINARY),
    ("qqp", "QQP", "question1", "question2", "is_duplicate", ("not_duplicate", "duplicate"), _BINARY),
    ("stsb", "STS-B", "sentence1", "sentence2", "score", None, None),
    ("mnli", "MNLI", "sentence1", "sentence2", "gold_label", ("entailment", "neutral", "contradiction"), None),
    ("qnli", "QNLI", "question", "sentence", "label", _NLI2, None),
    ("rte", "RTE", "sentence1", "sentence2", "label", _NLI2, None),
    ("wnli", "WNLI", "sentence1", "sentence2", "label", ("not_entailment", "entailment"), _BINARY),
]
# (metrics, main metric) where not plain accuracy, as the GLUE paper reports them
_GLUE_METRICS = {
    "cola": (("mcc", "accuracy"), "mcc"),
    "mrpc": (("f1", "accuracy"), "f1"),
    "qqp": (("f1", "accuracy"), "f1"),
    "stsb": (("pearson", "spearman"), "pearson"),
}
_GLUE_EXTRA = {
    "cola": {"headerless_columns": ("source", "label", "judgement", "sentence")},
    "qqp": {"skip_short_rows": True},
    "mnli": {"dev_splits": ("dev_matched", "dev_mismatched")},
}
_TASKS: dict[str, TaskSpec] = {
    name: TaskSpec(
        name=name,
        kind="regression" if labels is None else "classification",
        labels=labels,
        metrics=_GLUE_METRICS.get(name, (("accuracy",), "accuracy"))[0],
        main_metric=_GLUE_METRICS.get(name, (("accuracy",), "accuracy"))[1],
        folder=f"glue/{folder}",
        text_column=text,
        text_pair_column=pair,
        label_column=label,
        label_values=values or labels,
        **_GLUE_EXTRA.get(name, {}),
    )
    for name, folder, text, pair, label, labels, values in _GLUE
}
_TASKS["squad"] = TaskSpec("squad", "qa", None, ("exact_match", "f1"), "f1", folder="squad")
_TASKS["squad_v2"] = TaskSpec("squad_v2", "qa", None, ("exact_match", "f1"), "f1", folder="squad")
TASKS: tuple[str, ...] = (*_TASKS, "custom")
_SQUAD_FILES = {"squad": "v1.1", "squad_v2": "v2.0"}
_CUSTOM_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json")


def get_task(
    name: str,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    labels: tuple[str, ...] | list[str] | None = None,
    regression: bool = False,
) -> TaskSpec:
    """The TaskSpec of a known task. The keyword options describe custom data and apply only to
    name == "custom": `labels` fixes the label order (else it is inferred from the training file)."""
    if name != "custom":
        if name not in _TASKS:
            raise DataError(f"unknown task {name!r}: expected one of {', '.join(TASKS)}")
        return _TASKS[name]
    if regression:
        return TaskSpec(
            "custom", "regression", None, ("pearson", "spearman"), "pearson",
            text_column=text_column, text_pair_column=text_pair_column, label_column=label_column,
        )  # fmt: skip
    labels = tuple(str(x) for x in labels) if labels is not None else None
    return TaskSpec(
        "custom", "classification", labels, ("accuracy",), "accuracy",
        text_column=text_column, text_pair_column=text_pair_column, label_column=label_column, label_values=labels,
    )  # fmt: skip


def task_file(data_dir: str | Path, task: TaskSpec, split: str) -> Path:
    """Where a split lives: data_dir/glue/<TASK>/<split>.tsv, data_dir/squad/<train|dev>-v1.1.json (v2.0
    for squad_v2); for custom data, data_dir is the file itself (or a folder with <split>.csv/.jsonl/...)."""
    data_dir = Path(data_dir)
    if task.name == "custom":
        if data_dir.is_file():
            return data_dir
        candidates = [data_dir / f"{split}{suffix}" for suffix in _CUSTOM_SUFFIXES]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise DataError(f"{data_dir}: custom data not found (expected a CSV/JSONL file or {split}.csv/.jsonl in it)")
    if task.kind == "qa":
        path = data_dir / task.folder / f"{split}-{_SQUAD_FILES[task.name]}.json"
    else:
        path = data_dir / task.folder / f"{split}.tsv"
    if not path.is_file():
        raise DataError(f"{path}: file not found (task {task.name}, split {split!r})")
    return path


# ----------------------------------------------------------------------------------------------------
# Reading rows


@dataclass
class TextExample:
    """One classification / regression example. label: class id, float score, or None (GLUE test files)."""

    text: str
    text_pair: str | None
    label: int | float | None
    line: int | str  # where it came from (line number, or "record i" in a JSON array), for messages


def _tsv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) per non-empty line. GLUE text contains bare quote characters, so the
    fields are split on tabs with no quoting; utf-8-sig drops MRPC's byte-order mark."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line:
                yield number, line.split("\t")


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) per data row of a CSV/TSV with a header row (standard quoting)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    found = f"expected {len(header)} fields like the header, found {len(row)}"
                    raise DataError(f"{where(path, reader.line_num)}: {found}")
                yield reader.line_num, dict(zip(header, row, strict=True))
        except csv.Error as err:
            raise DataError(f"{where(path, reader.line_num)}: malformed CSV ({err})") from err


def _json_rows(path: Path) -> Iterator[tuple[int | str, dict[str, Any]]]:
    """(line number, record) per JSON Lines line; a .json file holding one array of objects also works."""
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{where(path, err.lineno)}: invalid JSON ({err.msg})") from err
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise DataError(f"{where(path, f'record {i}')}: expected a JSON object, found {type(record).__name__}")
            yield f"record {i}", record
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where(path, number)}: invalid JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise DataError(f"{where(path, number)}: expected a JSON object per line, found {type(record).__name__}")
        yield number, record


def _glue_records(task: TaskSpec, path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, {column: value}) per data row of a GLUE TSV."""
    rows = _tsv_rows(path)
    first = next(rows, None)
    if first is None:
        return
    number, header = first
    if task.headerless_columns and header[0] != "index":  # CoLA train/dev: the first line is already data
        header = list(task.headerless_columns)
        rows = _chain_first(first, rows)
    label_last = header[-1] == task.label_column  # MNLI rows carry a varying number of annotator labels
    needed = [header.index(c) for c in (task.text_column, task.text_pair_column) if c in header]
    for number, row in rows:
        if len(row) <= max(needed, default=0) or (label_last and len(row) < 2):
            if task.skip_short_rows:
                log.warning("%s: skipping a row with %d fields", where(path, number), len(row))
                continue
            raise DataError(f"{where(path, number)}: expected {len(header)} tab-separated fields, found {len(row)}")
        record = dict(zip(header, row, strict=False))  # MNLI rows may carry fewer annotator labels
        if label_last:
            record[task.label_column] = row[-1]
        yield number, record


def _chain_first(first, rest):
    yield first
    yield from rest


def _records(task: TaskSpec, path: Path) -> Iterator[tuple[int | str, dict[str, Any]]]:
    if task.name != "custom":
        return _glue_records(task, path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _csv_rows(path, "," if suffix == ".csv" else "\t")
    if suffix in (".jsonl", ".ndjson", ".json"):
        return _json_rows(path)
    raise DataError(f"{path}: unsupported custom data format {suffix or '(no suffix)'!r}: use .csv, .tsv or .jsonl")


def _text(record: dict[str, Any], column: str, path: Path, line: int | str, check: bool = True) -> str:
    if column not in record:
        raise DataError(f"{where(path, line)}: missing column {column!r} (columns: {', '.join(map(str, record))})")
    value = record[column]
    if check and (not isinstance(value, str) or not value.strip()):
        raise DataError(f"{where(path, line)}: column {column!r} must be a non-empty string, found {value!r}")
    return value


def _label_key(value: Any) -> str:
    """Label values as strings: JSON numbers and booleans become "1", "true", ..."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def read_examples(task: TaskSpec, path: str | Path, limit: int | None = None) -> tuple[list[TextExample], list[str]]:
    """The examples of a classification / regression file, with raw label strings (classification;
    None where the file has no labels, as GLUE test files)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    examples, raw_labels = [], []
    has_labels = None
    for line, record in _records(task, path):
        if limit is not None and len(examples) >= limit:
            break
        text = _text(record, task.text_column, path, line)
        pair = _text(record, task.text_pair_column, path, line) if task.text_pair_column else None
        if has_labels is None:  # GLUE test files have no label column; anywhere else it is required
            has_labels = task.label_column in record or not (task.name != "custom" and path.stem.startswith("test"))
        label: float | None = None
        raw = None
        if has_labels:
            _text(record, task.label_column, path, line, check=False)  # the missing-column error
            raw = record[task.label_column]
            if raw is None or (isinstance(raw, str) and not raw.strip()):
                raise DataError(f"{where(path, line)}: empty label in column {task.label_column!r}")
            if task.kind == "regression":
                label = _float(raw, task.label_column, path, line)
            else:
                raw = _label_key(raw)
        examples.append(TextExample(text, pair, label, line))
        raw_labels.append(raw)
    if not examples:
        raise DataError(f"{path}: empty file (no examples)")
    return examples, raw_labels


def _float(value: Any, column: str, path: Path, line: int | str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise DataError(f"{where(path, line)}: column {column!r} must be a finite number, found {value!r}")
    return number


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


# ----------------------------------------------------------------------------------------------------
# Tokenized datasets


class EncodedDataset(Dataset):
    """Features of one split, column-wise; item i is a dict of 1-D LongTensors (input_ids, attention_mask,
    token_type_ids; unpadded) plus its targets (labels [] long or float, or start/end_positions []).
    Sequence columns may hold lists or int32 arrays (compact for large QA sets)."""

    def __init__(self, columns: dict[str, list], dtypes: dict[str, torch.dtype] | None = None):
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"feature columns differ in length: { {k: len(v) for k, v in columns.items()} }")
        self.columns = columns
        self.dtypes = dtypes or {}

    def __len__(self) -> int:
        return len(self.columns["input_ids"])

    def lengths(self) -> list[int]:
        """Tokens per item, without building the items."""
        return [len(ids) for ids in self.columns["input_ids"]]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: torch.as_tensor(v[i]).to(self.dtypes.get(k, torch.long)) for k, v in self.columns.items()}


_TOKENIZE_CHUNK = 8192
SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids")
TARGET_KEYS = ("labels", "start_positions", "end_positions")


@dataclass
class TaskData:
    """One tokenized split.

    dataset: items as EncodedDataset describes; examples: the raw examples (TextExample, or
    training.squad.QAExample); task.labels holds the resolved label order (custom labels included).
    QA: window_example gives the example index of each window (dataset item); for evaluation splits
    window_offsets ([n, 2] int32 per window: context character offsets, -1 elsewhere) map the
    model's logits back to answer text.
    """

    task: TaskSpec
    dataset: Dataset
    examples: list
    path: Path | None = None
    window_example: list[int] | None = None
    window_offsets: list[np.ndarray] | None = None
    pad_token_id: int = 0

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pad input_ids / attention_mask / token_type_ids to the longest item ([B, T]); stack targets ([B])."""
        T = max(len(item["input_ids"]) for item in items)
        batch = {}
        for key in SEQUENCE_KEYS:
            if key in items[0]:
                pad = self.pad_token_id if key == "input_ids" else 0
                out = torch.full((len(items), T), pad, dtype=torch.long)
                for i, item in enumerate(items):
                    out[i, : len(item[key])] = item[key]
                batch[key] = out
        for key in TARGET_KEYS:
            if key in items[0]:
                batch[key] = torch.stack([item[key] for item in items])
        return batch


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
        from training.squad import load_squad

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


# ----------------------------------------------------------------------------------------------------
# Running and scoring a model


@torch.no_grad()
def predict(model, data: TaskData, *, batch_size: int = 64, device="cpu", null_threshold: float = 0.0) -> dict:
    """Run `model` (in eval mode; its mode is restored) over data.dataset in order.

    Classification / regression: {"logits": FloatTensor [n, num_labels]}.
    QA: {"predictions": {example id: answer text}} plus "na_probs" {example id: p} for squad_v2,
    decoded as training.squad.decode_predictions describes (squad_v2: "" when the null score beats the
    best span by more than `null_threshold`).
    """
    was_training = model.training
    model.eval()
    # Batches of similar length waste little on padding; results go back to dataset order.
    n = len(data.dataset)
    order = sorted(range(n), key=data.dataset.lengths().__getitem__)
    starts, ends, logits = [None] * n, [None] * n, [None] * n
    try:
        for begin in range(0, n, batch_size):
            rows = order[begin : begin + batch_size]
            batch = data.collate([data.dataset[i] for i in rows])
            inputs = {k: v.to(device) for k, v in batch.items() if k in SEQUENCE_KEYS}
            out = model(**inputs)
            if data.task.kind == "qa":
                lengths = batch["attention_mask"].sum(-1).tolist()
                for j, (i, length) in enumerate(zip(rows, lengths, strict=True)):
                    starts[i] = out.start_logits[j, :length].float().cpu().numpy()
                    ends[i] = out.end_logits[j, :length].float().cpu().numpy()
            else:
                for j, i in enumerate(rows):
                    logits[i] = out.logits[j].float().cpu()
    finally:
        model.train(was_training)
    if data.task.kind == "qa":
        from training.squad import decode_predictions

        return decode_predictions(data, starts, ends, null_threshold=null_threshold)
    num_labels = data.task.num_labels
    return {"logits": torch.stack(logits) if logits else torch.empty(0, num_labels)}


_METRICS = {"accuracy": M.accuracy, "f1": M.f1, "mcc": M.matthews, "pearson": M.pearson, "spearman": M.spearman}


def score(data: TaskData, predictions: dict) -> dict[str, float]:
    """The task's metrics (percent) of predict()'s output against the gold labels."""
    if data.task.kind == "qa":
        return M.squad_evaluate(data.examples, predictions["predictions"], predictions.get("na_probs"))
    gold = [e.label for e in data.examples]
    if any(g is None for g in gold):
        raise DataError(f"{data.path}: this split has no gold labels to score against")
    logits = predictions["logits"]
    if len(logits) != len(gold):
        raise ValueError(f"{len(logits)} predictions for {len(gold)} examples")
    if data.task.kind == "regression":
        predicted = logits.reshape(len(gold), -1)[:, 0].numpy()
    else:
        predicted = logits.argmax(-1).numpy()
    gold = np.asarray(gold)
    return {name: 100.0 * _METRICS[name](predicted, gold) for name in data.task.metrics}


def evaluate_model(model, data: TaskData, *, batch_size: int = 64, device="cpu") -> dict[str, float]:
    """score(data, predict(model, data))"""
    return score(data, predict(model, data, batch_size=batch_size, device=device))
