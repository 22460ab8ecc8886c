"""The task layer: what a task is and how its files are read, below everything else in training/.

Owns: TaskSpec and the registry of GLUE / SQuAD / custom tasks (`get_task`), where a split's file lives
(`task_file`), the readers of GLUE TSV, CSV and JSON Lines files into examples (`read_examples`),
`DataConfig` (which task and data a stage reads), and `DataError` with its `where()` locator: every
problem with a file surfaces as a DataError naming the file, the line (or JSON location) and what is
wrong, never as a traceback from inside a parser.

Imports nothing of training/. Tokenization is `training.datasets`; SQuAD's JSON is `training.squad`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


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


def read_examples(
    task: TaskSpec, path: str | Path, limit: int | None = None, *, labels: bool = True
) -> tuple[list[TextExample], list[str]]:
    """The examples of a classification / regression file, with raw label strings (classification;
    None where the file has no labels, as GLUE test files). labels=False: texts only (no label column
    needed or read, e.g. for token counting)."""
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
        if not labels:
            has_labels = False
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


# ----------------------------------------------------------------------------------------------------
# Which task and data a stage reads


@dataclass
class DataConfig:
    """Which task and data a stage reads. For `custom`, data_dir is the training file (CSV/JSONL) and
    dev_file the evaluation file."""

    task: str
    data_dir: str = str(DEFAULT_DATA_DIR)
    dev_file: str | None = None  # custom task: evaluation file
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    regression: bool = False
    max_length: int = 128
    doc_stride: int = 128
    train_limit: int | None = None  # use only the first N training examples (CPU budgets)
    eval_limit: int | None = None

    def spec(self) -> TaskSpec:
        return get_task(
            self.task, text_column=self.text_column, text_pair_column=self.text_pair_column,
            label_column=self.label_column, regression=self.regression,
        )  # fmt: skip

    def path(self, split: str) -> Path:
        spec = self.spec()
        if spec.name == "custom":
            if split == spec.train_split:
                return Path(self.data_dir)
            if self.dev_file is None:
                raise ValueError("the custom task needs --dev-file for evaluation")
            return Path(self.dev_file)
        return task_file(self.data_dir, spec, split)
