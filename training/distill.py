"""Stage 4: train the MoEBERT student with layer-wise distillation from the frozen teacher (METHOD.md §4).

    L = L_task + λ · ( Σ_{ℓ=0..L} MSE(h_ℓ, h_ℓ^teacher) + L_pred )

h_0 is the embedding output, h_ℓ each layer's output; padding positions are masked out of the MSE.
L_pred is the symmetric KL ½(KL(p‖p_t) + KL(p_t‖p)) over class probabilities in fp32, from
log-softmax (QA: mean over start and end distributions; regression: MSE between predictions).
The teacher is frozen in eval mode and is not saved with the student. `--no-distill` trains on the
task loss alone (the ablation). A gated student's balance loss is part of its own loss (L_task).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from moebert.loading import load_model
from training.datasets import label_names_of, load_data, tokenizer_for
from training.evaluate import device_of, evaluate_model
from training.loop import Distributed, OptimConfig, fit
from training.stages import Stage, resume_folder, write_json
from training.tasks import DataConfig
from training.teacher_cache import TeacherCache, build_cache, cache_bytes, cache_path
from training.train_state import STATE_DIR

log = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    student: str  # the converted MoEBERT folder (or a pruned dense one)
    data: DataConfig
    output_dir: str
    teacher: str | None = None  # the fine-tuned dense teacher (not needed without distillation)
    distill_weight: float = 1.0  # λ
    distill: bool = True  # False: task loss only (ablation)
    # Store the teacher's outputs on the training set once (beside the teacher, shared by students) when
    # they take at most this many GB, instead of a teacher forward every step; 0 turns it off.
    teacher_cache_gb: float = 8.0
    optim: OptimConfig = field(default_factory=OptimConfig)
    overwrite: bool = True

    def __post_init__(self) -> None:
        check_distill_weight(self.distill_weight)
        if self.distill and not self.teacher:
            raise ValueError("distillation needs a teacher (--teacher), or train on the task loss alone (--no-distill)")


def check_distill_weight(value: float) -> None:
    """λ weighs the distillation terms against the task loss: it must be ≥ 0 (a NaN is refused too)."""
    if not value >= 0:
        raise ValueError(f"distill_weight (λ) must be ≥ 0, got {value}")


def hidden_mse(student_hidden, teacher_hidden, mask: torch.Tensor) -> torch.Tensor:
    """Σ over layers of the mean squared error on non-padding positions. hidden: L+1 × [B, T, d]; mask [B, T]."""
    valid = mask.bool()
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for hs, ht in zip(student_hidden, teacher_hidden, strict=True):
        total = total + F.mse_loss(hs[valid].float(), ht[valid].float())
    return total


def symmetric_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """½(KL(p‖p_t) + KL(p_t‖p)) over the last dim, fp32, averaged over rows."""
    log_p, log_q = F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.float(), -1)
    kl_pq = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")  # KL(p ‖ q)
    kl_qp = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")  # KL(q ‖ p)
    return (kl_pq + kl_qp) / 2


def prediction_loss(student_out, teacher_out, mask: torch.Tensor) -> torch.Tensor:
    if hasattr(student_out, "start_logits"):  # QA: distributions over the real tokens only
        pad = ~mask.bool()
        fill = lambda x: x.float().masked_fill(pad, -1e4)
        return (
            symmetric_kl(fill(student_out.start_logits), fill(teacher_out.start_logits))
            + symmetric_kl(fill(student_out.end_logits), fill(teacher_out.end_logits))
        ) / 2
    if student_out.logits.shape[-1] == 1:  # regression
        return F.mse_loss(student_out.logits.float(), teacher_out.logits.float())
    return symmetric_kl(student_out.logits, teacher_out.logits)


class DistillLoss:
    """L_task + λ (hidden MSE + prediction KL) for a student batch. The teacher's outputs come from the
    teacher itself (no autograd) or, with `cache`, from its stored outputs for the batch's rows."""

    def __init__(self, teacher, weight: float, enabled: bool, cache: TeacherCache | None = None):
        self.teacher, self.weight, self.enabled, self.cache = teacher, weight, enabled, cache
        self.needs_rows = cache is not None  # training.loop.fit passes the batch's dataset rows

    def __call__(self, student, batch, rows: torch.Tensor | None = None):
        out = student(**batch, output_hidden_states=self.enabled)
        if not self.enabled:
            return out.loss, {"task": out.loss.item()}
        if self.cache is not None:
            t_out = self.cache.outputs(rows, batch["input_ids"].shape[1], batch["input_ids"].device)
        else:
            with torch.no_grad():
                inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
                t_out = self.teacher(**inputs, output_hidden_states=True)
        mse = hidden_mse(out.hidden_states, t_out.hidden_states, batch["attention_mask"])
        pred = prediction_loss(out, t_out, batch["attention_mask"])
        loss = out.loss + self.weight * (mse + pred)
        return loss, {"task": out.loss.item(), "hidden_mse": mse.item(), "pred_kl": pred.item()}


def make_distill_loss(teacher, weight: float, enabled: bool, cache: TeacherCache | None = None) -> DistillLoss:
    return DistillLoss(teacher, weight, enabled, cache)


def distill_stage(cfg: DistillConfig) -> Stage:
    return Stage("distill", asdict(cfg), Path(cfg.output_dir), (cfg.student, cfg.teacher))


def distill(cfg: DistillConfig) -> Path:
    spec = cfg.data.spec()
    torch.manual_seed(cfg.optim.seed)
    tokenizer = tokenizer_for(cfg.student)
    student = load_model(cfg.student)
    teacher = load_model(cfg.teacher) if cfg.distill else None
    if teacher is not None:
        teacher.requires_grad_(False).eval()
        if teacher.config.num_hidden_layers != student.config.num_hidden_layers:
            raise ValueError("layer-wise distillation needs teacher and student with the same number of layers")
    labels = label_names_of(student.config)
    train = load_data(cfg.data, spec.train_split, tokenizer, training=True, label_names=labels,
                      limit=cfg.data.train_limit)  # fmt: skip
    dev = load_data(cfg.data, spec.dev_splits[0], tokenizer, training=False, label_names=labels,
                    limit=cfg.data.eval_limit)  # fmt: skip
    stage = distill_stage(cfg)
    d = Distributed.setup()
    if teacher is not None:
        teacher.to("cuda" if torch.cuda.is_available() else "cpu")
    cache = _teacher_cache(cfg, teacher, train, d)
    with stage.writing(cfg.overwrite, resumable=True) as tmp:
        result = fit(
            student,
            train,
            cfg.optim,
            make_distill_loss(teacher, cfg.distill_weight, cfg.distill, cache),
            evaluate=lambda m: evaluate_model(m, dev, batch_size=cfg.optim.eval_batch_size, device=device_of(m)),
            main_metric=spec.main_metric,
            save=lambda m, metrics: (m.save_pretrained(tmp), tokenizer.save_pretrained(tmp)),
            log_dir=tmp,
            resume_dir=resume_folder(cfg.output_dir, stage.fingerprint) / STATE_DIR,
            desc=f"distill {spec.name}",
        )
        if d.is_main:
            conversion = Path(cfg.student) / "conversion.json"
            if conversion.is_file():  # keep the record of which teacher neurons each expert came from
                (tmp / "conversion.json").write_text(conversion.read_text())
            write_json(tmp / "metrics.json", {"task": spec.name, "split": spec.dev_splits[0], **result})
    d.barrier()
    log.info("distill %s: best %s", spec.name, result["best"])
    return Path(cfg.output_dir)


def _teacher_cache(cfg: DistillConfig, teacher, train, d: Distributed) -> TeacherCache | None:
    """The teacher's stored outputs on `train` when they fit in cfg.teacher_cache_gb (single process)."""
    if teacher is None or cfg.teacher_cache_gb <= 0 or d.world_size > 1:
        return None
    size = cache_bytes(teacher, train.dataset.lengths())
    if size > cfg.teacher_cache_gb * 1e9:
        log.info("teacher outputs: %.1f GB > teacher_cache_gb %.1f: computed every step", size / 1e9,
                 cfg.teacher_cache_gb)  # fmt: skip
        return None
    path = cache_path(cfg.teacher, asdict(cfg.data))
    return TeacherCache(build_cache(teacher, train, path, batch_size=cfg.optim.eval_batch_size))
