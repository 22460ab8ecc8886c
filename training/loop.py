"""The one training loop shared by fine-tuning and distillation: AdamW, linear decay, gradient clipping,
eval each epoch, keep the best; DDP when launched by torchrun (gloo on CPU, NCCL on GPU).

Throughput on a CPU comes from three choices: length-grouped batches (training.sampling: far less
padding), bf16 autocast where the CPU has native bf16 (AVX512-BF16 / AMX; fp32 master weights, fp32
losses) and fused attention when attention dropout is 0. The run state is saved every
`checkpoint_minutes` and at each epoch end, so a rerun of an interrupted stage continues from there."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from moebert.modeling import MoEBertSelfAttention
from moebert.precision import native_bf16
from training.sampling import TrainBatches
from training.train_state import TrainState, load_state, save_state

log = logging.getLogger(__name__)
T = TypeVar("T")


PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class OptimConfig:
    """Optimisation settings shared by `finetune` and `distill` (METHOD.md §4: AdamW, no warm-up, linear decay)."""

    epochs: float = 3.0  # fractional epochs allowed (e.g. 0.5 for a CPU budget)
    lr: float = 5e-5
    batch_size: int = 32
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    grad_clip: float = 1.0
    eval_batch_size: int = 64
    seed: int = 0
    log_every: int = 20
    max_steps: int | None = None  # stop early (tests, smoke runs)
    # Attention-probability dropout while training (None: the checkpoint's own). 0 lets the CPU use
    # its fused attention kernel: about 2x faster steps at 256 tokens. The saved config is unchanged.
    attention_dropout: float | None = None
    group_by_length: bool = True  # batches of similar length (training.sampling); False: plain shuffling
    # auto: bf16 autocast where the device computes bf16 natively (CUDA with bf16, CPUs with AVX512-BF16
    # or AMX), else fp32. Weights, optimizer and losses stay fp32 either way.
    precision: str = "auto"
    checkpoint_minutes: float = 10.0  # save the run state this often (0: only at epoch ends); not fingerprinted

    def __post_init__(self) -> None:
        """Settings that would fail deep inside training (or train nothing) are refused here, by name."""
        problems = [
            f"{name} must be {rule}, got {value}"
            for name, value, ok, rule in [
                ("epochs", self.epochs, self.epochs > 0, "> 0"),
                ("lr", self.lr, self.lr > 0, "> 0"),
                ("batch_size", self.batch_size, self.batch_size >= 1, "≥ 1"),
                ("eval_batch_size", self.eval_batch_size, self.eval_batch_size >= 1, "≥ 1"),
                ("weight_decay", self.weight_decay, self.weight_decay >= 0, "≥ 0"),
                ("warmup_ratio", self.warmup_ratio, 0 <= self.warmup_ratio < 1, "in [0, 1)"),
                ("grad_clip", self.grad_clip, self.grad_clip > 0, "> 0"),
                ("log_every", self.log_every, self.log_every >= 1, "≥ 1"),
                ("max_steps", self.max_steps, self.max_steps is None or self.max_steps >= 1, "≥ 1"),
                ("attention_dropout", self.attention_dropout,
                 self.attention_dropout is None or 0 <= self.attention_dropout < 1, "in [0, 1)"),
                ("precision", self.precision, self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
                ("checkpoint_minutes", self.checkpoint_minutes, self.checkpoint_minutes >= 0, "≥ 0"),
            ]
            if not ok
        ]  # fmt: skip
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls) -> Distributed:
        """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        return cls(dist.get_rank(), world, local)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def on_main(self, run: Callable[[], T]) -> T | None:
        """A single-process stage under torchrun: rank 0 runs it while the others wait, then every rank
        goes on (reading what rank 0 wrote). → run()'s result on rank 0, None elsewhere."""
        result = run() if self.is_main else None
        self.barrier()
        return result

    def from_main(self, value):
        """Rank 0's `value` on every rank, so that all ranks take the same decision (e.g. skip a stage)."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def default_device(d: Distributed) -> torch.device:
    return torch.device(f"cuda:{d.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and LayerNorm weights (BERT convention)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_norm = "LayerNorm" in name or name.endswith(("ln_weight", "ln_bias"))
        (no_decay if p.ndim == 1 or "bias" in name.rsplit(".", 1)[-1] or is_norm else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 or None (fp32) for a precision setting on a device; bf16 asked for where it is emulated is refused."""
    if precision == "fp32" or (precision == "auto" and not native_bf16(device)):
        return None
    if precision == "bf16" and device.type not in ("cpu", "cuda"):
        raise ValueError(f"precision bf16 is not supported on {device.type}")
    return torch.bfloat16


def set_attention_dropout(model: torch.nn.Module, rate: float) -> None:
    """Attention-probability dropout of every self-attention (not the experts' own dropout)."""
    for module in model.modules():
        if isinstance(module, MoEBertSelfAttention):
            module.attention_dropout_p = rate


def fit(
    model: torch.nn.Module,
    train_data,
    opt: OptimConfig,
    compute_loss: Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]],
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None,
    main_metric: str,
    save: Callable[[torch.nn.Module, dict], None],
    log_dir: Path,
    desc: str = "train",
    resume_dir: Path | None = None,
) -> dict:
    """Train `model` on `train_data` (a TaskData); after each epoch evaluate and `save` when the main
    metric improves (always at least once). Returns {"best": metrics, "history": [...], "train_seconds": s}.

    resume_dir: where the run state is saved (every `opt.checkpoint_minutes` and at epoch ends) and, when
    a state is there, resumed from: same weights, optimizer, schedule, RNG and batch order."""
    d = Distributed.setup()
    device = default_device(d)
    model.to(device).train()
    if opt.attention_dropout is not None:
        set_attention_dropout(model, opt.attention_dropout)
    torch.manual_seed(opt.seed)
    dataset = train_data.dataset
    lengths = dataset.lengths() if hasattr(dataset, "lengths") else [len(item["input_ids"]) for item in dataset]
    batches = TrainBatches(
        lengths, opt.batch_size, seed=opt.seed, group_by_length=opt.group_by_length,
        rank=d.rank, world_size=d.world_size,
    )  # fmt: skip
    steps_per_epoch = len(batches)
    total_steps = max(1, math.ceil(steps_per_epoch * opt.epochs))
    if opt.max_steps:
        total_steps = min(total_steps, opt.max_steps)
    wrapped = model
    if d.world_size > 1:
        # Experts without tokens in a batch get no gradient: DDP must tolerate unused parameters.
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    # The fused AdamW kernel updates each tensor in one pass (the plain loop makes ~6 passes): on a CPU it
    # was ~18% of a MiniLM-L6 fine-tuning step, most of it the 11.7M-row word-embedding update.
    optimizer = torch.optim.AdamW(
        param_groups(model, opt.weight_decay), lr=opt.lr, fused=device.type in ("cpu", "cuda")
    )
    warmup = int(total_steps * opt.warmup_ratio)
    schedule = lambda step: (
        (step + 1) / max(1, warmup) if step < warmup else max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    amp_dtype = autocast_dtype(opt.precision, device)
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    grouping = "grouped by length" if opt.group_by_length else "shuffled"
    precision = f"autocast {amp_dtype}" if amp_dtype else "fp32"
    log.info("%s: %d steps, batches %s, %s", desc, total_steps, grouping, precision)

    state = load_state(resume_dir, model, optimizer, scheduler) if resume_dir is not None else None
    if state is not None:
        log.info("%s: resuming at step %d (epoch %d, batch %d) from %s", desc, state.step, state.epoch + 1,
                 state.batch, resume_dir)  # fmt: skip
    state = state or TrainState()

    def checkpoint() -> None:
        if d.is_main and resume_dir is not None:
            save_state(resume_dir, state, model, optimizer, scheduler)

    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = (log_dir / "train_log.jsonl").open("a") if d.is_main else None
    writer = _tensorboard(log_dir) if d.is_main else None
    start = last_checkpoint = time.time()
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    try:
        while state.epoch < n_epochs and state.step < total_steps:
            epoch = state.epoch
            todo = batches.epoch_batches(epoch)[state.batch :]
            bar = tqdm(todo, desc=f"{desc} epoch {epoch + 1}/{n_epochs}", disable=not d.is_main, dynamic_ncols=True,
                       initial=state.batch, total=steps_per_epoch)  # fmt: skip
            for rows in bar:
                batch = train_data.collate([train_data.dataset[i] for i in rows])
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast:
                    if getattr(compute_loss, "needs_rows", False):  # e.g. reads cached teacher outputs by row
                        loss, parts = compute_loss(wrapped, batch, torch.tensor(rows))
                    else:
                        loss, parts = compute_loss(wrapped, batch)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.batch += 1
                if d.is_main:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                    if state.step % opt.log_every == 0 or state.step == total_steps:
                        record = {"step": state.step, "epoch": round(state.step / steps_per_epoch, 4),
                                  "loss": loss.item(), "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                                  **parts}  # fmt: skip
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                        if writer is not None:
                            for key, value in record.items():
                                if key not in ("step", "epoch"):
                                    writer.add_scalar(f"train/{key}", value, state.step)
                if state.step >= total_steps:
                    break
                if opt.checkpoint_minutes and time.time() - last_checkpoint >= 60 * opt.checkpoint_minutes:
                    state.elapsed += time.time() - start
                    start = last_checkpoint = time.time()
                    checkpoint()
            # Evaluate and save on rank 0; other ranks wait so they stay in step.
            if d.is_main:
                metrics = evaluate(model) if evaluate is not None else {}
                metrics = {**metrics, "epoch": epoch + 1, "step": state.step}
                state.history.append(metrics)
                log.info("%s epoch %d: %s", desc, epoch + 1,
                         {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})  # fmt: skip
                if writer is not None:
                    for key, value in metrics.items():
                        writer.add_scalar(f"dev/{key}", value, state.step)
                if (
                    state.best is None
                    or evaluate is None
                    or metrics.get(main_metric, -math.inf) > state.best.get(main_metric, -math.inf)
                ):
                    state.best = metrics
                    save(model, metrics)
                model.train()
            state.epoch, state.batch = epoch + 1, 0
            state.elapsed += time.time() - start
            start = last_checkpoint = time.time()
            if state.step < total_steps:
                checkpoint()
            d.barrier()
    finally:
        if log_file is not None:
            log_file.close()
        if writer is not None:
            writer.close()
    return {"best": state.best, "history": state.history, "train_seconds": state.elapsed + time.time() - start,
            "steps": state.step, "world_size": d.world_size}  # fmt: skip


def _tensorboard(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(log_dir / "tensorboard"))
