"""Tokenized splits, whatever the task: `EncodedDataset` (the features, column-wise) and `TaskData` (one
split: its dataset, its raw examples, how to batch it). Text tasks (training.datasets) and SQuAD windows
(training.squad) both produce them; training, evaluation and the teacher cache consume them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from training.tasks import TaskSpec


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
