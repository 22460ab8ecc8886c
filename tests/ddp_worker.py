"""Run by tests/training/test_distributed.py under `torchrun --nproc_per_node 2`: a few DDP training steps of a
tiny MoEBERT on CPU (gloo); each rank writes a digest of its parameters."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from moebert import MoEBertConfig, MoEBertForSequenceClassification
from training.loop import OptimConfig, fit


@dataclass
class Data:
    dataset: list
    task = None

    @staticmethod
    def collate(items):
        return {k: torch.stack([i[k] for i in items]) for k in items[0]}


def main() -> None:
    out = Path(sys.argv[1])
    torch.manual_seed(0)  # same initial weights on every rank
    config = MoEBertConfig(
        vocab_size=50,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        num_experts=4,
        expert_dim=12,
        moe_layers=[0, 1],
        num_labels=2,
    )
    model = MoEBertForSequenceClassification(config)
    g = torch.Generator().manual_seed(1)
    items = [
        {
            "input_ids": torch.randint(1, 50, (9,), generator=g),
            "attention_mask": torch.ones(9, dtype=torch.long),
            "labels": torch.randint(0, 2, (), generator=g),
        }
        for _ in range(32)
    ]
    before = digest(model)
    fit(
        model,
        Data(items),
        OptimConfig(epochs=1, lr=1e-3, batch_size=4, seed=0),
        lambda m, b: (m(**b).loss, {}),
        evaluate=None,
        main_metric="loss",
        save=lambda m, metrics: None,
        log_dir=out / "logs",
    )
    rank = os.environ["RANK"]
    (out / f"rank{rank}.txt").write_text(f"{before} {digest(model)}")
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
    (out / f"env{rank}.json").write_text(json.dumps({k: os.environ.get(k) for k in names}))


def digest(model) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


if __name__ == "__main__":
    main()
