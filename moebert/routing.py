"""Hash-routing tables (METHOD.md §3).

hash-random: each layer draws a table vocab → expert from a seed (built inside the model's HashRouter).
hash-balance: one table for all layers from token frequencies on the training split: token ids sorted
by frequency are dealt greedily to the currently lightest expert; unseen ids get a seeded random expert.
"""

from __future__ import annotations

import csv
import heapq
import json
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


def read_texts(path: str | Path) -> Iterator[str]:
    """Every text field of a task file, for token counting: GLUE TSV, CSV, JSONL, SQuAD JSON or plain text.

    Columns are taken as text when their header names one (sentence, question, string, text, …); labels,
    ids and numbers are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise ValueError(f"{path}: expected SQuAD JSON with a top-level 'data' list")
        for article in data["data"]:
            for para in article.get("paragraphs", []):
                yield para["context"]
                for qa in para.get("qas", []):
                    yield qa["question"]
        return
    if suffix == ".jsonl":
        with path.open(encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{n}: not JSON ({err.msg})") from err
                    yield from (v for k, v in row.items() if isinstance(v, str) and _is_text_column(k))
        return
    if suffix in (".tsv", ".csv"):
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(
                f,
                delimiter="\t" if suffix == ".tsv" else ",",
                quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL,
            )
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}: empty file")
            columns = [i for i, name in enumerate(header) if _is_text_column(name)]
            if not columns:
                raise ValueError(f"{path}: no text column in header {header}")
            for row in reader:
                yield from (row[i] for i in columns if i < len(row))
        return
    with path.open(encoding="utf-8") as f:
        yield from (line.rstrip("\n") for line in f if line.strip())


def _is_text_column(name: str) -> bool:
    name = name.lower()
    return any(word in name for word in ("sentence", "question", "string", "text", "context", "premise", "hypothesis"))
