"""Stage 5: evaluate any checkpoint (dense or MoEBERT) on any split of a task; print and write metrics JSON."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moebert.loading import load_model
from training.common import DataConfig, label_names_of, tokenizer_for, write_json

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    model: str
    data: DataConfig
    splits: tuple[str, ...] | None = None  # default: the task's dev split(s)
    batch_size: int = 64
    output: str | None = None  # default <model>/eval_<task>.json


def evaluate(cfg: EvaluateConfig) -> dict[str, dict[str, float]]:
    """→ {split: metrics}; also written to the output JSON."""
    from training.data import evaluate_model

    spec = cfg.data.spec()
    model = load_model(cfg.model)
    tokenizer = tokenizer_for(cfg.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    results = {}
    for split in cfg.splits or spec.dev_splits:
        data = cfg.data.load(
            split, tokenizer, training=False, label_names=label_names_of(model.config), limit=cfg.data.eval_limit
        )
        start = time.time()
        metrics = evaluate_model(model, data, batch_size=cfg.batch_size, device=device)
        results[split] = {**metrics, "examples": len(data.examples), "seconds": round(time.time() - start, 2)}
        log.info("%s %s: %s", spec.name, split, metrics)
    out = Path(cfg.output) if cfg.output else Path(cfg.model) / f"eval_{spec.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    write_json(tmp, {"model": str(cfg.model), "task": spec.name, "results": results})
    tmp.replace(out)
    print(json.dumps(results, indent=1))
    return results
