"""Tiny random MoEBERTs built in memory (no checkpoint, no tokenizer) and random padded batches, for the tests
of the token layouts and the CUDA-graph buckets."""

from __future__ import annotations

import torch

from moebert import MoEBertConfig
from moebert.modeling import MoEBertForQuestionAnswering, MoEBertForSequenceClassification


def tiny_model(route: str, task: str = "cls", moe_layers=(0, 2), seed: int = 0, **overrides):
    """d = 36 (3 heads of 12), d_h = 84, 3 layers, 3 experts of 20: odd everywhere, one dense layer."""
    torch.manual_seed(seed)
    config = MoEBertConfig(
        vocab_size=500, hidden_size=36, num_hidden_layers=3, num_attention_heads=3, intermediate_size=84,
        max_position_embeddings=64, num_experts=3, expert_dim=20, moe_layers=list(moe_layers), route_method=route,
        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, load_balance_weight=0.01,
        **overrides,
    )  # fmt: skip
    cls = MoEBertForQuestionAnswering if task == "qa" else MoEBertForSequenceClassification
    model = cls(config).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases, so a mixed-up row or expert shows
        for name, p in model.named_parameters():
            if "ln_weight" in name or "LayerNorm.weight" in name:
                p.uniform_(0.5, 1.5)
            elif "bias" in name:
                p.normal_(0, 0.1)
    model.set_moe_backend("torch")
    return model


def batch(lengths: list[int], T: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows of the given lengths padded to T (default: the longest), random ids (pad id 0) and token types."""
    g = torch.Generator().manual_seed(seed)
    T = T or max(lengths)
    ids = torch.randint(1, 500, (len(lengths), T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    types = (torch.rand(len(lengths), T, generator=g) < 0.3).long() * mask
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": types}
