"""`moebert predict`: prediction files in the formats leaderboards and the official scripts read.

GLUE (gluebenchmark.com submission zip): one TSV per test split, named as the benchmark expects
(SST-2.tsv, MNLI-m.tsv, ...), a header `index<TAB>prediction`, then one row per test example with the
test file's own index; predictions are the label strings the task's files use (0/1 for the binary tasks,
entailment/... for the NLI tasks) and, for STS-B, a similarity clipped to [0, 5].

SQuAD: predictions.json {question id: answer text} for the official evaluate-v1.1.py / evaluate-v2.0.py;
for v2.0 also na_probs.json {question id: P(no answer)}. The answer is "" when the null score beats the
best span by more than `null_threshold` (logit units); na_probs = sigmoid(null score − best span), so the
same decision in the official script is `--na-prob-thresh sigmoid(null_threshold)`, recorded in predict.json.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moebert.atomic import write_text
from moebert.loading import load_model
from training.datasets import label_names_of, load_data, tokenizer_for
from training.evaluate import predict as run_model
from training.stages import write_json
from training.tasks import DataConfig

log = logging.getLogger(__name__)

# (task, split) → the file name the GLUE server expects in the submission zip.
GLUE_SUBMISSION_FILES = {
    ("cola", "test"): "CoLA.tsv",
    ("sst2", "test"): "SST-2.tsv",
    ("mrpc", "test"): "MRPC.tsv",
    ("qqp", "test"): "QQP.tsv",
    ("stsb", "test"): "STS-B.tsv",
    ("mnli", "test_matched"): "MNLI-m.tsv",
    ("mnli", "test_mismatched"): "MNLI-mm.tsv",
    ("qnli", "test"): "QNLI.tsv",
    ("rte", "test"): "RTE.tsv",
    ("wnli", "test"): "WNLI.tsv",
}
STSB_RANGE = (0.0, 5.0)


@dataclass
class PredictConfig:
    model: str
    data: DataConfig
    output_dir: str
    splits: tuple[str, ...] | None = None  # default: GLUE test split(s); SQuAD dev (its test set is hidden)
    batch_size: int = 64
    null_threshold: float = 0.0  # squad_v2: "" when null score − best span score exceeds it

    def default_splits(self) -> tuple[str, ...]:
        spec = self.data.spec()
        if spec.kind == "qa":
            return ("dev",)
        if spec.name == "mnli":
            return ("test_matched", "test_mismatched")
        return ("test",)


def predict(cfg: PredictConfig) -> list[Path]:
    """Write the prediction files into cfg.output_dir; → the paths written."""
    if not math.isfinite(cfg.null_threshold):
        raise ValueError(f"null_threshold must be a finite number, got {cfg.null_threshold}")
    spec = cfg.data.spec()
    splits = tuple(cfg.splits or cfg.default_splits())
    if spec.kind == "qa" and len(splits) != 1:
        raise ValueError("SQuAD predictions are one file per split: give one --split")
    model = load_model(cfg.model)
    tokenizer = tokenizer_for(cfg.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for split in splits:
        data = load_data(
            cfg.data, split, tokenizer, training=False, label_names=label_names_of(model.config),
            limit=cfg.data.eval_limit,
        )  # fmt: skip
        result = run_model(model, data, batch_size=cfg.batch_size, device=device, null_threshold=cfg.null_threshold)
        if spec.kind == "qa":
            written += _write_squad(out, data, result, cfg)
        else:
            written.append(_write_glue(out, data, result["logits"], split))
        log.info("%s %s: %d predictions", spec.name, split, len(data.examples))
    write_json(out / "predict.json", {
        "model": str(cfg.model), "task": spec.name, "splits": list(splits), "files": [p.name for p in written],
        "data": asdict(cfg.data),
        **({"null_threshold": cfg.null_threshold, "na_prob_thresh": _sigmoid(cfg.null_threshold)}
           if spec.name == "squad_v2" else {}),
    })  # fmt: skip
    return written


def submission_name(task: str, split: str) -> str:
    return GLUE_SUBMISSION_FILES.get((task, split), f"{task}-{split}.tsv")


def _write_glue(out: Path, data, logits: torch.Tensor, split: str) -> Path:
    task = data.task
    indices = file_indices(data.path, len(data.examples))
    if task.kind == "regression":
        values = logits.reshape(len(indices), -1)[:, 0].clamp(*STSB_RANGE).tolist()
        predictions = [f"{v:.3f}" for v in values]
    else:
        predictions = [task.label_values[i] for i in logits.argmax(-1).tolist()]
    path = out / submission_name(task.name, split)
    write_text(path, "index\tprediction\n" + "".join(f"{i}\t{p}\n" for i, p in zip(indices, predictions, strict=True)))
    return path


def file_indices(path: Path, n: int) -> list[str]:
    """The `index` column of a GLUE TSV (test files have one), else 0..n-1."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = [line.rstrip("\r\n") for line in f if line.strip()]
    header = lines[0].split("\t") if lines else []
    if "index" not in header:
        return [str(i) for i in range(n)]
    column = header.index("index")
    indices = [line.split("\t")[column] for line in lines[1:]][:n]
    if len(indices) != n:
        raise ValueError(f"{path}: {len(indices)} index values for {n} examples")
    return indices


def _write_squad(out: Path, data, result: dict, cfg: PredictConfig) -> list[Path]:
    ids = [e.id for e in data.examples]
    predictions = {i: result["predictions"][i] for i in ids}
    paths = [out / "predictions.json"]
    write_text(paths[0], json.dumps(predictions, ensure_ascii=False, indent=1) + "\n")
    if data.task.name == "squad_v2":
        paths.append(out / "na_probs.json")
        write_text(paths[1], json.dumps({i: result["na_probs"][i] for i in ids}, indent=1) + "\n")
    return paths


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
