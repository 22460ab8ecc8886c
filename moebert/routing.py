"""Hash-routing tables (METHOD.md §3).

hash-random: each layer draws a table vocab → expert from a seed (built inside the model's HashRouter).
hash-balance: one table for all layers from token frequencies on the training split: token ids sorted
by frequency are dealt greedily to the currently lightest expert; unseen ids get a seeded random expert.
The counts come from `token_counts` over texts: a plain text file here (`read_lines`), a task's own text
columns in the training pipeline.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch


def token_counts(texts: Iterable[str], tokenizer, vocab_size: int, batch_size: int = 1024) -> torch.Tensor:
    """How often each token id occurs in `texts` (special tokens excluded). → counts [vocab] int64."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    batch: list[str] = []

    def flush() -> None:
        encoded = tokenizer(batch, add_special_tokens=False, truncation=False)["input_ids"]
        ids = torch.tensor([i for seq in encoded for i in seq], dtype=torch.long)
        if ids.numel():
            counts.add_(torch.bincount(ids, minlength=vocab_size)[:vocab_size])
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return counts


def balanced_hash_table(counts: torch.Tensor, num_experts: int, seed: int = 0) -> torch.Tensor:
    """counts [vocab] → table [vocab]: frequent tokens first, each to the lightest expert so far."""
    table = torch.randint(num_experts, counts.shape, generator=torch.Generator().manual_seed(seed))
    seen = counts.nonzero(as_tuple=True)[0]
    order = seen[torch.sort(counts[seen], descending=True, stable=True).indices]
    heap = [(0, e) for e in range(num_experts)]  # (load, expert); ties go to the lower expert id
    for token_id, n in zip(order.tolist(), counts[order].tolist(), strict=True):
        load, e = heapq.heappop(heap)
        table[token_id] = e
        heapq.heappush(heap, (load + n, e))
    return table


def routed_load(table: torch.Tensor, counts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens each expert receives on a corpus with these counts. → [E]"""
    return torch.zeros(num_experts, dtype=torch.long).index_add(0, table, counts)


# Task files have columns that only the task knows (GLUE's per-task layout, CoLA without a header, a custom
# "review" column): their texts are read by the training task layer (the pipeline counts them and passes
# the counts), never guessed here.
TASK_FILE_SUFFIXES = (".tsv", ".csv", ".jsonl", ".ndjson", ".json")


def read_lines(path: str | Path) -> Iterator[str]:
    """The texts of a plain text file, one per non-empty line, for token counting."""
    path = Path(path)
    if path.suffix.lower() in TASK_FILE_SUFFIXES:
        raise ValueError(
            f"{path}: --balance-data takes a plain text file, one text per line; for a task file use "
            "`moebert pipeline --route hash-balance` (it counts the task's own text columns) or pass its "
            "token counts with --balance-table"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        yield from (line.rstrip("\r\n") for line in f if line.strip())
