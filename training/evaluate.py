"""Running and scoring a model on a task split, and the evaluate stage.

Owns: `predict` (a model over a TaskData: logits, or SQuAD answers decoded by training.squad),
`score` (the task's metrics of those predictions), `evaluate_model` (both), `device_of`, and the
evaluate stage (`EvaluateConfig`, `evaluate`): any checkpoint, dense or MoEBERT, on any split of a task;
printed and written to a metrics JSON (<model>/eval_<task>.json by default) with its stage record beside
it (training.stages), which is what `reuse` asks.

Imports the data layer (training.tasks, training.features, training.datasets, training.squad); the
training stages import this module for their per-epoch evaluation.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from moebert.loading import load_model
from training import metrics as M
from training.datasets import label_names_of, load_data, tokenizer_for
from training.features import SEQUENCE_KEYS, TaskData
from training.squad import decode_predictions
from training.stages import Stage, stage_record
from training.tasks import DataConfig, DataError

log = logging.getLogger(__name__)


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


def device_of(model) -> str:
    """Where a model's weights live (evaluation runs there)."""
    return str(next(model.parameters()).device)


# ----------------------------------------------------------------------------------------------------
# The evaluate stage


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


def evaluate_stage(cfg: EvaluateConfig) -> Stage:
    """The evaluate stage's record: what was scored (data, splits) of which model, written beside the JSON."""
    spec = cfg.data.spec()
    splits = tuple(cfg.splits or spec.dev_splits)
    out = Path(cfg.output) if cfg.output else Path(cfg.model) / f"eval_{spec.name}.json"
    return Stage("evaluate", {"data": asdict(cfg.data), "splits": splits}, out, (cfg.model,), file=True)


def evaluate(cfg: EvaluateConfig) -> dict[str, dict[str, float]]:
    """→ {split: metrics}; also written to the output JSON."""
    spec = cfg.data.spec()
    stage = evaluate_stage(cfg)
    splits = stage.config["splits"]
    if cfg.reuse and stage_record(cfg.model) is not None:
        results = _saved(stage)
        if results is None and (results := _scored_in_training(cfg.model, cfg.data, splits)) is not None:
            _write(stage, cfg.model, spec.name, results)
        if results is not None:
            log.info("%s: reused the evaluation of %s: %s", spec.name, cfg.model, results)
            return results
    model = load_model(cfg.model)
    tokenizer = tokenizer_for(cfg.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    results = {}
    for split in splits:
        data = load_data(
            cfg.data, split, tokenizer, training=False, label_names=label_names_of(model.config),
            limit=cfg.data.eval_limit,
        )  # fmt: skip
        start = time.time()
        metrics = evaluate_model(model, data, batch_size=cfg.batch_size, device=device)
        results[split] = {**metrics, "examples": len(data.examples), "seconds": round(time.time() - start, 2)}
        log.info("%s %s: %s", spec.name, split, metrics)
    _write(stage, cfg.model, spec.name, results)
    print(json.dumps(results, indent=1))
    return results


def _write(stage: Stage, model: str, task: str, results: dict) -> None:
    with stage.writing() as tmp:
        tmp.write_text(
            json.dumps({"model": str(model), "task": task, "results": results}, indent=1, default=str) + "\n"
        )


def _saved(stage: Stage) -> dict | None:
    if not stage.done():
        return None
    try:
        return json.loads(stage.output.read_text()).get("results")
    except (OSError, json.JSONDecodeError):
        return None


def _scored_in_training(model: str, data: DataConfig, splits: tuple[str, ...]) -> dict | None:
    """The kept epoch's dev metrics from a finetune/distill stage, when that stage scored exactly this
    split with this data config (same tokenisation, windows and limits): the saved weights are the
    ones that were scored, so evaluating again would only repeat the work."""
    stage = stage_record(model)
    try:
        trained = json.loads((Path(model) / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same_data = (stage or {}).get("config", {}).get("data") == json.loads(json.dumps(asdict(data)))
    if not same_data or len(splits) != 1 or trained.get("split") != splits[0] or not trained.get("best"):
        return None
    metrics = {k: v for k, v in trained["best"].items() if k not in ("epoch", "step")}
    return {splits[0]: {**metrics, "source": "kept epoch, scored during training"}}
