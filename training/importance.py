"""Stage 2: the importance of every FFN neuron (METHOD.md §1), per example, on a sample of the training split.

    I_j = Σ_examples | w1_j · ∇_{w1_j} L + w2_j · ∇_{w2_j} L |

For a linear layer the per-example weight gradient is a sum over that example's tokens of outer
products, which gives the two dot products in closed form from activations and their gradients:

    w1_j · ∇_{w1_j} L = Σ_t (∂L/∂a_tj) · (a_tj − b1_j)      a = x W1ᵀ + b1, the FFN pre-activation
    w2_j · ∇_{w2_j} L = Σ_t (∂L/∂h_tj) · h_tj                h = gelu(a), the input of fc2

Tokens of different examples never mix in BERT (eval mode, padding masked), so one backward pass of
the summed per-example losses yields every example's exact terms; the absolute value is then taken
per example, as the definition requires. `method="batch-of-one"` computes the same quantity the slow,
obvious way (one example per backward, w · grad from autograd) and serves as the test reference.

The file (default <teacher>/importance.safetensors) is a stage output (training.stages): written
atomically, its record beside it (importance.stage.json).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from moebert.convert import IMPORTANCE_FILE
from moebert.loading import load_model
from moebert.splitting import save_importance
from training.datasets import label_names_of, load_data, tokenizer_for
from training.stages import Stage
from training.tasks import DataConfig

log = logging.getLogger(__name__)


@dataclass
class ImportanceConfig:
    model: str  # the fine-tuned dense teacher folder
    data: DataConfig
    samples: int = 2048  # training examples scored (a seeded random sample; all if fewer)
    batch_size: int = 16
    method: str = "closed-form"  # or "batch-of-one" (slow reference)
    output: str | None = None  # default <model>/importance.safetensors
    seed: int = 0


def per_example_loss(model, batch) -> torch.Tensor:
    """The task loss of each example, [B]: cross-entropy, MSE for regression, mean of start/end CE for QA."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    out = model(**inputs)
    if "start_positions" in batch:
        T = out.start_logits.shape[1]
        start = F.cross_entropy(
            out.start_logits.float(), batch["start_positions"].clamp(0, T), ignore_index=T, reduction="none"
        )
        end = F.cross_entropy(
            out.end_logits.float(), batch["end_positions"].clamp(0, T), ignore_index=T, reduction="none"
        )
        return (start + end) / 2
    if out.logits.shape[-1] == 1:
        return (out.logits.squeeze(-1).float() - batch["labels"].float()) ** 2
    return F.cross_entropy(out.logits.float(), batch["labels"].long(), reduction="none")


def importance_closed_form(model, loader, desc: str = "importance") -> list[torch.Tensor]:
    """Per-layer scores [d_h] summed over the loader's examples (see module docstring)."""
    layers = list(model.base_model.encoder.layer)
    if any(layer.moe is not None for layer in layers):
        raise ValueError("importance is scored on the dense teacher, not on a MoEBERT model")
    scores = [torch.zeros(layer.intermediate.dense.out_features, dtype=torch.float64) for layer in layers]
    # Forward hooks collect each layer's pre-activation a and fc2 input h; autograd.grad then returns
    # ∂L/∂a and ∂L/∂h directly (no retain_grad, no parameter gradients accumulated).
    activations: list[torch.Tensor] = []
    hooks = []
    for layer in layers:
        hooks.append(layer.intermediate.dense.register_forward_hook(lambda m, args, out: activations.append(out)))
        hooks.append(layer.output.dense.register_forward_hook(lambda m, args, out: activations.append(args[0])))
    model.eval()
    try:
        for batch in tqdm(loader, desc=desc, dynamic_ncols=True):
            activations.clear()
            loss = per_example_loss(model, batch).sum()
            grads = torch.autograd.grad(loss, activations)
            mask = batch["attention_mask"].bool()
            seq_index = torch.arange(mask.shape[0]).repeat_interleave(mask.shape[1])[mask.reshape(-1)]  # [N]
            B = mask.shape[0]
            with torch.no_grad():
                for i, layer in enumerate(layers):
                    a, h = activations[2 * i], activations[2 * i + 1]  # [N, d_h] over the non-padding tokens
                    grad_a, grad_h = grads[2 * i], grads[2 * i + 1]
                    term = grad_a * (a - layer.intermediate.dense.bias) + grad_h * h  # [N, d_h]
                    per_example = torch.zeros(B, term.shape[1], dtype=torch.float64)
                    scores[i] += per_example.index_add_(0, seq_index, term.double()).abs().sum(0)
            del loss, grads
    finally:
        activations.clear()
        for hook in hooks:
            hook.remove()
    return [s.float() for s in scores]


def importance_batch_of_one(model, dataset, collate, desc: str = "importance (batch of one)") -> list[torch.Tensor]:
    """The definition, literally: one example per backward, w · ∇w from autograd. Slow; the test reference."""
    layers = list(model.base_model.encoder.layer)
    scores = [torch.zeros(layer.intermediate.dense.out_features, dtype=torch.float64) for layer in layers]
    model.eval()
    for idx in tqdm(range(len(dataset)), desc=desc, dynamic_ncols=True):
        model.zero_grad(set_to_none=True)
        per_example_loss(model, collate([dataset[idx]])).sum().backward()
        for i, layer in enumerate(layers):
            w1, w2 = layer.intermediate.dense.weight, layer.output.dense.weight  # [d_h, d], [d, d_h]
            term = (w1 * w1.grad).sum(1) + (w2 * w2.grad).sum(0)  # [d_h]
            scores[i] += term.double().abs()
    model.zero_grad(set_to_none=True)
    return [s.float() for s in scores]


def importance_stage(cfg: ImportanceConfig) -> Stage:
    """The importance file and its record. The file's location is not part of what it holds (left out of
    the config): rows that share a teacher share its importance."""
    out = Path(cfg.output) if cfg.output else Path(cfg.model) / IMPORTANCE_FILE
    config = {k: v for k, v in asdict(cfg).items() if k != "output"}
    return Stage("importance", config, out, (cfg.model,), file=True)


def score_importance(cfg: ImportanceConfig) -> Path:
    """Score the teacher's neurons and write the importance file (safetensors: scores and order per layer)."""
    if cfg.method not in ("closed-form", "batch-of-one"):
        raise ValueError(f"unknown importance method {cfg.method!r}: expected closed-form or batch-of-one")
    model = load_model(cfg.model)
    tokenizer = tokenizer_for(cfg.model)
    spec = cfg.data.spec()
    data = load_data(
        cfg.data, spec.train_split, tokenizer, training=True, label_names=label_names_of(model.config),
        limit=cfg.data.train_limit,
    )  # fmt: skip
    n = len(data.dataset)
    picked = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))[: cfg.samples].sort().values
    subset = Subset(data.dataset, picked.tolist())
    log.info("importance of %s on %d of %d %s training items", cfg.model, len(subset), n, spec.name)
    if cfg.method == "closed-form":
        loader = DataLoader(subset, cfg.batch_size, shuffle=False, collate_fn=data.collate)
        scores = importance_closed_form(model, loader)
    else:
        scores = importance_batch_of_one(model, subset, data.collate)
    stage = importance_stage(cfg)
    meta = {
        "teacher": str(cfg.model),
        "task": spec.name,
        "samples": str(len(subset)),
        "method": cfg.method,
        "seed": str(cfg.seed),
        "config": str(asdict(cfg)),
    }
    with stage.writing() as tmp:
        save_importance(tmp, scores, meta)
    return stage.output
