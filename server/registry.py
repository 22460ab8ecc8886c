"""The loaded models: checkpoint → tokenizer, backend, batcher, and what /v1/models shows."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from server.backends import Backend, make_backend
from server.batching import Batcher, default_batch_tokens
from server.errors import InvalidInput, PayloadTooLarge, UnknownModel
from server.settings import ServerSettings

log = logging.getLogger("moebert.server")


@dataclass
class ServedModel:
    name: str
    path: str
    task: str  # "classification" | "qa"
    config: object  # MoEBertConfig
    tokenizer: object  # transformers fast tokenizer (QA windowing uses it)
    backend: Backend
    max_seq_len: int
    batcher: Batcher | None = None
    # Rust tokenizers, used directly for classification: the transformers wrapper costs ~10× more per call.
    _truncating: object = field(default=None, repr=False)
    _whole: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from tokenizers import Tokenizer

        rust = self.tokenizer.backend_tokenizer
        self._truncating = Tokenizer.from_str(rust.to_str())
        self._truncating.no_padding()
        self._truncating.enable_truncation(self.max_seq_len, strategy="longest_first")
        self._whole = Tokenizer.from_str(rust.to_str())
        self._whole.no_padding()
        self._whole.no_truncation()

    @property
    def labels(self) -> list[str]:
        cfg = self.config
        return [str(cfg.id2label.get(i, f"LABEL_{i}")) for i in range(cfg.num_labels)]

    @property
    def is_regression(self) -> bool:
        return self.task == "classification" and self.config.num_labels == 1

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    def info(self) -> dict:
        cfg = self.config
        moe = bool(cfg.moe_layers)
        return {
            "name": self.name,
            "task": self.task,
            "labels": self.labels if self.task == "classification" and not self.is_regression else None,
            "regression": self.is_regression,
            "routing": cfg.route_method if moe else None,
            "experts": cfg.num_experts if moe else None,
            "expert_dim": cfg.expert_dim if moe else None,
            "moe_layers": list(cfg.moe_layers),
            "max_seq_len": self.max_seq_len,
            "backend": self.backend.name,
            "int8_matmul": self.backend.int8_matmul,
            "max_batch_tokens": self.batcher.max_batch_tokens if self.batcher is not None else None,
        }

    def encode(self, items: list[tuple[str, str | None]], truncate: bool) -> list[tuple[list[int], list[int]]]:
        """Texts (or pairs) → (input_ids, token_type_ids) rows. Over-long without truncation: 413."""
        batch = [text if pair is None else (text, pair) for text, pair in items]
        if truncate:
            encodings = self._truncating.encode_batch(batch) if len(batch) > 1 else [self._truncating.encode(*items[0])]
        else:
            encodings = self._whole.encode_batch(batch) if len(batch) > 1 else [self._whole.encode(*items[0])]
            for i, enc in enumerate(encodings):
                if len(enc.ids) > self.max_seq_len:
                    raise PayloadTooLarge(
                        f"inputs[{i}] has {len(enc.ids)} tokens; model {self.name!r} takes at most "
                        f"{self.max_seq_len} (send truncate=true to cut it)"
                    )
        return [(enc.ids, enc.type_ids) for enc in encodings]


def load_served_model(name: str, path: str, settings: ServerSettings) -> ServedModel:
    from transformers import AutoTokenizer

    from moebert.loading import load_config, task_of

    if not Path(path).exists():
        raise FileNotFoundError(f"model {name!r}: {path} does not exist")
    config = load_config(path)
    task = task_of(config)
    if task not in ("classification", "qa"):
        raise ValueError(f"model {name!r} ({path}) has no classification or QA head (task {task!r})")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"model {name!r}: the server needs a fast tokenizer (tokenizer.json) in {path}")
    limit = min(int(config.max_position_embeddings), int(getattr(tokenizer, "model_max_length", 1 << 30)))
    max_seq_len = min(limit, settings.max_seq_len or limit)
    buckets = None
    if settings.device == "cuda" and settings.cuda_graphs:
        from server.cuda_graphs import graph_buckets

        buckets = graph_buckets(
            settings.max_batch_requests, settings.max_batch_tokens or default_batch_tokens(settings.device), max_seq_len
        )
    backend = make_backend(
        path, settings.backend, settings.onnx_precision, settings.device, settings.threads, settings.dtype, buckets,
        settings.int8_matmul,
    )  # fmt: skip
    int8 = f", {backend.int8_matmul} int8 products" if backend.int8_matmul else ""
    log.info("loaded %s: %s (%s, %s backend%s, max %d tokens)", name, path, task, backend.name, int8, max_seq_len)
    return ServedModel(name, path, task, config, tokenizer, backend, max_seq_len)


class Registry:
    def __init__(self) -> None:
        self.models: dict[str, ServedModel] = {}

    def get(self, name: str | None, task: str) -> ServedModel:
        """The model called `name`, or the only model of `task` when no name is given."""
        if name is None:
            candidates = [m for m in self.models.values() if m.task == task]
            if len(candidates) == 1:
                return candidates[0]
            if not candidates:
                raise UnknownModel(f"no {task} model is loaded")
            names = ", ".join(m.name for m in candidates)
            raise InvalidInput(f"several {task} models are loaded ({names}): pick one with 'model'")
        model = self.models.get(name)
        if model is None:
            raise UnknownModel(f"unknown model {name!r}; loaded: {', '.join(self.models) or 'none'}")
        if model.task != task:
            raise InvalidInput(f"model {name!r} is a {model.task} model, not {task}")
        return model
