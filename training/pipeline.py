"""All stages in one command: finetune → importance → convert → distill → evaluate, with per-task
defaults (METHOD.md Table 7 adapted to one CPU/GPU). Resumable: a stage whose output exists and was
made from the same inputs and config (its fingerprint) is skipped.

Layout of output_dir:  teacher/  importance.safetensors  moe/  student/  results.json
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from safetensors import safe_open

from moebert.convert import ConvertConfig, convert
from training.checkpoint import STAGE_FILE, fingerprint, finished
from training.common import DataConfig, default_teacher, write_json
from training.distill import DistillConfig, check_distill_weight, distill
from training.evaluate import EvaluateConfig, evaluate
from training.finetune import FinetuneConfig, finetune
from training.importance import ImportanceConfig, score_importance
from training.loop import Distributed, OptimConfig

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
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be ≥ 1, got {self.num_experts}")


def run_pipeline(cfg: PipelineConfig) -> dict:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ft_default, ds_default, lam_default = task_defaults(cfg.data.task)
    ft_optim = replace(cfg.finetune_optim or ft_default, seed=cfg.seed)
    ds_optim = replace(cfg.distill_optim or ds_default, seed=cfg.seed)
    lam = cfg.distill_weight if cfg.distill_weight is not None else lam_default

    # 1. teacher
    if cfg.finetuned_teacher:
        teacher = cfg.finetuned_teacher
    else:
        teacher = str(out / "teacher")
        ft = FinetuneConfig(data=cfg.data, output_dir=teacher, model=cfg.teacher, optim=ft_optim)
        _run_stage("finetune", ft, teacher, [cfg.teacher], lambda: finetune(ft))

    # Under torchrun, fine-tuning and distillation train on every rank (they publish from rank 0 and wait
    # for it); the single-process stages run on rank 0 while the others wait, then read its folders.
    d = Distributed.setup()

    # 2. importance (not needed for a random split)
    importance = Path(cfg.importance_file) if cfg.importance_file else out / "importance.safetensors"
    if cfg.split != "random" and d.is_main:
        imp = ImportanceConfig(
            model=teacher, data=cfg.data, samples=cfg.importance_samples, output=str(importance), seed=cfg.seed
        )
        # The file's location is not part of what it holds: rows sharing a teacher share its importance.
        imp_fp = fingerprint({k: v for k, v in asdict(imp).items() if k != "output"}, [teacher])
        if _importance_fingerprint(importance) == imp_fp:
            log.info("importance: up to date, skipped (%s)", importance)
        else:
            score_importance(imp)
            _stamp_importance(importance, imp_fp)
    d.barrier()

    # 3. convert
    moe = str(out / "moe")
    conv = ConvertConfig(
        teacher=teacher, output_dir=moe, num_experts=cfg.num_experts, expert_dim=cfg.expert_dim,
        shared_dim=cfg.shared_dim, route=cfg.route, split=cfg.split,
        importance=str(importance) if cfg.split != "random" else None, seed=cfg.seed, overwrite=True,
        balance_table=str(_balance_counts(cfg.data, teacher, out)) if cfg.route == "hash-balance" and d.is_main
        else None,
    )  # fmt: skip
    if d.is_main:
        convert_inputs = [teacher, importance if cfg.split != "random" else None]
        _run_stage("convert", conv, moe, convert_inputs, lambda: convert(conv), stamp=True)
    d.barrier()

    # 4. distill
    student = str(out / "student")
    ds = DistillConfig(student=moe, teacher=teacher, data=cfg.data, output_dir=student, distill_weight=lam,
                       distill=cfg.distill, optim=ds_optim)  # fmt: skip
    _run_stage("distill", ds, student, [moe, teacher], lambda: distill(ds))

    # 5. evaluate teacher and student on the dev split(s), on rank 0
    results = {}
    if not d.is_main:
        d.barrier()
        return results
    for name, path in (("teacher", teacher), ("moebert", student)):
        if name == "teacher" and not cfg.evaluate_teacher:
            continue
        results[name] = evaluate(
            EvaluateConfig(model=path, data=cfg.data, output=str(out / f"eval_{name}.json"), reuse=True)
        )
    write_json(out / "results.json", {"config": asdict(cfg), "results": results})
    d.barrier()
    return results


def _run_stage(name: str, stage_cfg, out_dir: str, inputs: list, run, stamp: bool = False) -> None:
    # finetune and distill compute this same fingerprint themselves and write stage.json; convert
    # (a model-core function that knows nothing of stages) is stamped here once it has finished.
    config_dict = asdict(stage_cfg)
    fp = fingerprint(config_dict, inputs)
    if finished(out_dir, fp):
        log.info("%s: up to date, skipped (%s)", name, out_dir)
        return
    log.info("%s: running → %s", name, out_dir)
    run()
    if stamp:
        (Path(out_dir) / STAGE_FILE).write_text(
            json.dumps({"stage": name, "fingerprint": fp, "config": config_dict}, default=str)
        )


def _balance_counts(data: DataConfig, teacher: str, out: Path) -> Path:
    """hash-balance: token frequencies of the task's own text columns (as the task reads them: any GLUE
    task, custom columns, sentence pairs, SQuAD questions and contexts) → balance_counts.safetensors.
    Rewritten only when the data or tokenizer changed, so an up-to-date convert stays up to date."""
    from safetensors.torch import save_file

    from moebert.loading import load_config
    from moebert.routing import token_counts
    from training.common import tokenizer_for
    from training.data import read_examples

    path = out / "balance_counts.safetensors"
    fp = fingerprint({k: v for k, v in asdict(data).items() if k not in ("eval_limit", "dev_file")}, [teacher])
    if _importance_fingerprint(path) == fp:
        return path
    spec = data.spec()
    train = data.path(spec.train_split)
    if spec.kind == "qa":
        from training.squad import read_squad

        examples = read_squad(train, v2=spec.name == "squad_v2", limit=data.train_limit)
        texts = (t for e in examples for t in (e.question, e.context))
    else:
        examples, _ = read_examples(spec, train, data.train_limit)
        texts = (t for e in examples for t in (e.text, e.text_pair) if t)
    counts = token_counts(texts, tokenizer_for(teacher), load_config(teacher).vocab_size)
    if not counts.any():
        raise ValueError(f"{train}: no tokens found to balance the hash table on")
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"token_counts": counts}, str(tmp), metadata={"fingerprint": fp})
    tmp.replace(path)
    return path


def _importance_fingerprint(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("fingerprint")
    except Exception:  # an unreadable file is simply recomputed
        return None


def _stamp_importance(path: Path, fp: str) -> None:
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(load_file(str(path)), str(tmp), metadata={**meta, "fingerprint": fp})
    tmp.replace(path)
