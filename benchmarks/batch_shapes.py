"""Benchmark batch shapes: "BxT" (B rows of T tokens) or "BxTp" (a served batch of mixed lengths, padded)."""

from __future__ import annotations

import numpy as np


def parse_shape(shape: str) -> tuple[int, int, bool]:
    """ "8x48p" → (8, 48, True): batch, tokens, padded."""
    padded = shape.lower().endswith("p")
    batch, tokens = (int(x) for x in shape.lower().removesuffix("p").split("x"))
    return batch, tokens, padded


def make_batch(batch: int, tokens: int, padded: bool, rng: np.random.Generator):
    """→ input_ids, attention_mask, token_type_ids [B, T] int64. Padded: the longest row fills T, the others
    have T/4..T tokens (uniform), as a served batch of mixed-length texts."""
    ids = rng.integers(1000, 20000, (batch, tokens)).astype(np.int64)
    mask = np.ones_like(ids)
    if padded:
        lengths = [tokens, *rng.integers(max(1, tokens // 4), tokens + 1, batch - 1)]
        mask = (np.arange(tokens)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
        ids = ids * mask
    return ids, mask, np.zeros_like(ids)
