"""Stage 5: evaluate any checkpoint (dense or MoEBERT) on any split of a task; print and write metrics JSON."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moebert.loading import load_model
from training.checkpoint import STAGE_FILE, fingerprint
from training.common import DataConfig, label_names_of, tokenizer_for, write_json

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    model: str
    data: DataConfig
    splits: tuple[str, ...] | None = None  # default: the task's dev split(s)
    batch_size: int = 64
    output: str | None = None  # default <model>/eval_<task>.json
    # Skip the work when it is already done: the output JSON was made from this same model and data
    # config, or the model is a training stage whose kept epoch was scored on exactly this split.
    reuse: bool = False


def evaluate(cfg: EvaluateConfig) -> dict[str, dict[str, float]]:
    """→ {split: metrics}; also written to the output JSON."""
    from training.data import evaluate_model

    spec = cfg.data.spec()
    splits = tuple(cfg.splits or spec.dev_splits)
    out = Path(cfg.output) if cfg.output else Path(cfg.model) / f"eval_{spec.name}.json"
    fp = fingerprint({"data": asdict(cfg.data), "splits": splits}, [cfg.model])
    if cfg.reuse and (Path(cfg.model) / STAGE_FILE).is_file():
        results = _saved(out, fp)
        if results is None and (results := _scored_in_training(cfg.model, cfg.data, splits)) is not None:
            _write(out, cfg.model, spec.name, results, fp)
        if results is not None:
            log.info("%s: reused the evaluation of %s: %s", spec.name, cfg.model, results)
            return results
    model = load_model(cfg.model)
    tokenizer = tokenizer_for(cfg.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    results = {}
    for split in splits:
        data = cfg.data.load(
            split, tokenizer, training=False, label_names=label_names_of(model.config), limit=cfg.data.eval_limit
        )
        start = time.time()
        metrics = evaluate_model(model, data, batch_size=cfg.batch_size, device=device)
        results[split] = {**metrics, "examples": len(data.examples), "seconds": round(time.time() - start, 2)}
        log.info("%s %s: %s", spec.name, split, metrics)
    _write(out, cfg.model, spec.name, results, fp)
    print(json.dumps(results, indent=1))
    return results


def _write(out: Path, model: str, task: str, results: dict, fp: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    write_json(tmp, {"model": str(model), "task": task, "results": results, "fingerprint": fp})
    tmp.replace(out)


def _saved(out: Path, fp: str) -> dict | None:
    try:
        saved = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return saved.get("results") if saved.get("fingerprint") == fp else None


def _scored_in_training(model: str, data: DataConfig, splits: tuple[str, ...]) -> dict | None:
    """The kept epoch's dev metrics from a finetune/distill stage, when that stage scored exactly this
    split with this data config (same tokenisation, windows and limits): the saved weights are the
    ones that were scored, so evaluating again would only repeat the work."""
    try:
        stage = json.loads((Path(model) / STAGE_FILE).read_text())
        trained = json.loads((Path(model) / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same_data = stage.get("config", {}).get("data") == json.loads(json.dumps(asdict(data)))
    if not same_data or len(splits) != 1 or trained.get("split") != splits[0] or not trained.get("best"):
        return None
    metrics = {k: v for k, v in trained["best"].items() if k not in ("epoch", "step")}
    return {splits[0]: {**metrics, "source": "kept epoch, scored during training"}}
