"""All stages in one command: finetune → importance → convert → distill → evaluate, with per-task
defaults (METHOD.md Table 7 adapted to one CPU/GPU). Resumable: a stage whose output exists and was
made from the same inputs and config (its fingerprint, training.stages) is skipped.

Layout of output_dir:  teacher/  importance.safetensors  [balance_counts.safetensors]  moe/  student/
eval_teacher.json  eval_moebert.json  results.json  (each stage output with its stage record)

Under torchrun every rank runs this function: fine-tuning and distillation train on every rank (DDP,
rank 0 publishes); importance, the hash-balance counts, convert and evaluation run on rank 0 while the
others wait at a barrier, then every rank reads the finished folders.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from safetensors.torch import save_file

from moebert.configuration import check_moe_settings
from moebert.convert import ConvertConfig, convert_into
from moebert.loading import load_config
from training.datasets import task_token_counts, tokenizer_for
from training.distill import DistillConfig, check_distill_weight, distill, distill_stage
from training.evaluate import EvaluateConfig, evaluate
from training.finetune import FinetuneConfig, default_teacher, finetune, finetune_stage
from training.importance import ImportanceConfig, importance_stage, score_importance
from training.loop import Distributed, OptimConfig
from training.stages import Stage, write_json
from training.tasks import DataConfig

log = logging.getLogger(__name__)

# Distillation hyperparameters from the paper's Table 7 (lr, epochs, weight decay, λ); batch 32 throughout.
PAPER_DISTILL = {
    "rte": (1e-5, 10, 0.01, 1.0), "cola": (2e-5, 10, 0.0, 3.0), "mrpc": (3e-5, 5, 0.0, 2.0),
    "sst2": (2e-5, 5, 0.0, 1.0), "qnli": (2e-5, 5, 0.0, 2.0), "qqp": (3e-5, 5, 0.0, 1.0),
    "mnli": (5e-5, 5, 0.0, 5.0), "squad": (3e-5, 5, 0.01, 2.0), "squad_v2": (3e-5, 4, 0.1, 1.0),
}  # fmt: skip


def task_defaults(task: str) -> tuple[OptimConfig, OptimConfig, float]:
    """(finetune optim, distill optim, λ) for a task; unknown tasks get the MRPC-like defaults."""
    lr, epochs, wd, lam = PAPER_DISTILL.get(task, (3e-5, 5, 0.0, 2.0))
    ft_epochs = 2 if task in ("squad", "squad_v2", "mnli", "qqp", "qnli", "sst2") else 4
    return OptimConfig(epochs=ft_epochs, lr=5e-5), OptimConfig(epochs=epochs, lr=lr, weight_decay=wd), lam


@dataclass
class PipelineConfig:
    data: DataConfig
    output_dir: str
    teacher: str = field(default_factory=default_teacher)  # pretrained BERT to fine-tune
    finetuned_teacher: str | None = None  # skip fine-tuning and use this dense fine-tuned model
    num_experts: int = 4
    expert_dim: int | None = None
    shared_dim: int | None = None
    route: str = "hash-random"
    split: str = "importance"
    importance_samples: int = 2048
    importance_file: str | None = None  # default <output_dir>/importance.safetensors; rows may share one
    finetune_optim: OptimConfig | None = None  # None: task defaults
    distill_optim: OptimConfig | None = None
    distill_weight: float | None = None
    distill: bool = True
    evaluate_teacher: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        """Checked before any stage runs: a bad λ or sample count must not surface after fine-tuning."""
        if self.distill_weight is not None:
            check_distill_weight(self.distill_weight)
        if self.importance_samples < 1:
            raise ValueError(f"importance_samples must be ≥ 1, got {self.importance_samples}")
        check_moe_settings(
            route=self.route, split=self.split, num_experts=self.num_experts, expert_dim=self.expert_dim,
            shared_dim=self.shared_dim,
        )  # fmt: skip


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run (or skip, when up to date) every stage; → {"teacher": {split: metrics}, "moebert": ...} on
    rank 0 ({} on the other ranks under torchrun)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = Distributed.setup()
    ft_default, ds_default, lam_default = task_defaults(cfg.data.task)
    ft_optim = replace(cfg.finetune_optim or ft_default, seed=cfg.seed)
    ds_optim = replace(cfg.distill_optim or ds_default, seed=cfg.seed)
    lam = cfg.distill_weight if cfg.distill_weight is not None else lam_default

    # 1. teacher (every rank trains)
    if cfg.finetuned_teacher:
        teacher = cfg.finetuned_teacher
    else:
        teacher = str(out / "teacher")
        ft = FinetuneConfig(data=cfg.data, output_dir=teacher, model=cfg.teacher, optim=ft_optim)
        _run_stage(finetune_stage(ft), lambda: finetune(ft), d, every_rank=True)

    # 2. importance (not needed for a random split)
    importance = Path(cfg.importance_file) if cfg.importance_file else out / "importance.safetensors"
    if cfg.split != "random":
        imp = ImportanceConfig(
            model=teacher, data=cfg.data, samples=cfg.importance_samples, output=str(importance), seed=cfg.seed
        )
        _run_stage(importance_stage(imp), lambda: score_importance(imp), d)

    # 2b. hash-balance: token counts of the task's own text columns
    balance = None
    if cfg.route == "hash-balance":
        balance = balance_stage(cfg.data, teacher, out / "balance_counts.safetensors")
        _run_stage(balance, lambda: write_balance_counts(balance, cfg.data, teacher), d)

    # 3. convert
    moe = str(out / "moe")
    conv = ConvertConfig(
        teacher=teacher, output_dir=moe, num_experts=cfg.num_experts, expert_dim=cfg.expert_dim,
        shared_dim=cfg.shared_dim, route=cfg.route, split=cfg.split,
        importance=str(importance) if cfg.split != "random" else None, seed=cfg.seed, overwrite=True,
        balance_table=str(balance.output) if balance is not None else None,
    )  # fmt: skip
    inputs = (teacher, importance if cfg.split != "random" else None, balance.output if balance else None)
    convert_stage = Stage("convert", asdict(conv), Path(moe), inputs)
    _run_stage(convert_stage, lambda: _convert(convert_stage, conv), d)

    # 4. distill (every rank trains)
    student = str(out / "student")
    ds = DistillConfig(student=moe, teacher=teacher, data=cfg.data, output_dir=student, distill_weight=lam,
                       distill=cfg.distill, optim=ds_optim)  # fmt: skip
    _run_stage(distill_stage(ds), lambda: distill(ds), d, every_rank=True)

    # 5. evaluate teacher and student on the dev split(s), on rank 0
    results = {}
    if d.is_main:
        for name, path in (("teacher", teacher), ("moebert", student)):
            if name == "teacher" and not cfg.evaluate_teacher:
                continue
            results[name] = evaluate(
                EvaluateConfig(model=path, data=cfg.data, output=str(out / f"eval_{name}.json"), reuse=True)
            )
        write_json(out / "results.json", {"config": asdict(cfg), "results": results})
    d.barrier()
    return results


def _run_stage(stage: Stage, run: Callable[[], object], d: Distributed, every_rank: bool = False) -> None:
    """Run `stage` unless its output is up to date. every_rank: a training stage that every torchrun rank
    takes part in (rank 0's view of "done" decides for all); else rank 0 runs it while the others wait."""

    def run_unless(done: bool) -> None:
        if done:
            log.info("%s: up to date, skipped (%s)", stage.name, stage.output)
        else:
            log.info("%s: running → %s", stage.name, stage.output)
            run()

    if every_rank:
        run_unless(d.from_main(stage.done()))
    else:
        d.on_main(lambda: run_unless(stage.done()))


def _convert(stage: Stage, conv: ConvertConfig) -> None:
    # moebert's convert knows nothing of stages: it fills the stage's temporary folder, published with its record.
    with stage.writing() as tmp:
        convert_into(conv, tmp)


def balance_stage(data: DataConfig, teacher: str, output: Path) -> Stage:
    """hash-balance token counts: rewritten only when the training data or tokenizer changed, so an
    up-to-date convert stays up to date (the dev file and evaluation limit do not count)."""
    config = {k: v for k, v in asdict(data).items() if k not in ("eval_limit", "dev_file")}
    return Stage("balance", config, output, (teacher,), file=True)


def write_balance_counts(stage: Stage, data: DataConfig, teacher: str) -> Path:
    """Token frequencies of the task's own text columns, as the task reads them (any GLUE task, custom
    columns, sentence pairs, SQuAD questions and contexts) → safetensors `token_counts` [vocab]."""
    counts = task_token_counts(data, tokenizer_for(teacher), load_config(teacher).vocab_size)
    with stage.writing() as tmp:
        save_file({"token_counts": counts}, str(tmp))
    return stage.output
