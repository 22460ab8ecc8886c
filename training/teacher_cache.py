"""The frozen teacher's outputs on the training set, computed once and read back every epoch.

Distillation needs the teacher's hidden states and logits for each batch. The teacher is frozen and in
eval mode, so its outputs for an example never change: recomputing them costs a teacher forward per
step (about 40% of a MiniLM-L6 distillation step's arithmetic) in every epoch. Where they fit
(`max_gb`), they are computed once, stored for the real tokens only, and sliced back per batch.

File: one safetensors per (teacher, training data), beside the teacher folder, shared by every student
distilled from it (a file lock keeps two students from computing it twice):
  hidden [tokens, L+1, d] fp16   every example's real tokens, examples back to back
  offsets [n+1] int64            example i's tokens are hidden[offsets[i]:offsets[i+1]]
  logits [n, C] fp32             (classification / regression)
  start_logits, end_logits [tokens] fp32   (QA)
fp16 keeps ~3 decimal digits of the hidden states: far below the student-teacher MSE being minimised.
"""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from moebert.atomic import atomic_file
from training.stages import fingerprint

log = logging.getLogger(__name__)


def cache_path(teacher_dir: str | Path, data_config: dict) -> Path:
    """Where the outputs of `teacher_dir` on the training data `data_config` (a DataConfig as a dict) live."""
    teacher = Path(teacher_dir)
    fp = fingerprint({"data": data_config, "format": 1}, [teacher])
    return teacher.parent / f".{teacher.name}.outputs-{fp}.safetensors"


def cache_bytes(teacher, lengths: list[int]) -> int:
    cfg = teacher.config
    return sum(lengths) * (cfg.num_hidden_layers + 1) * cfg.hidden_size * 2


@torch.no_grad()
def build_cache(teacher, data, path: Path, batch_size: int = 64) -> Path:
    """Run `teacher` over data.dataset (sorted by length, little padding) and write the cache to `path`.
    Takes a lock beside it: a second caller waits and then finds the finished file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return path
        lengths = data.dataset.lengths()
        n = len(lengths)
        offsets = torch.zeros(n + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.long), 0)
        cfg = teacher.config
        hidden = torch.empty(int(offsets[-1]), cfg.num_hidden_layers + 1, cfg.hidden_size, dtype=torch.float16)
        qa = data.task.kind == "qa"
        starts = torch.empty(int(offsets[-1])) if qa else None
        ends = torch.empty(int(offsets[-1])) if qa else None
        logits = None
        device = next(teacher.parameters()).device
        was_training = teacher.training
        teacher.eval()
        order = sorted(range(n), key=lengths.__getitem__)
        for begin in tqdm(range(0, n, batch_size), desc="teacher outputs", dynamic_ncols=True):
            rows = order[begin : begin + batch_size]
            batch = data.collate([data.dataset[i] for i in rows])
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
            out = teacher(**inputs, output_hidden_states=True)
            stacked = torch.stack(out.hidden_states, dim=2).to("cpu", torch.float16)  # [B, T, L+1, d]
            for j, i in enumerate(rows):
                a, b = int(offsets[i]), int(offsets[i + 1])
                hidden[a:b] = stacked[j, : b - a]
                if qa:
                    starts[a:b] = out.start_logits[j, : b - a].float().cpu()
                    ends[a:b] = out.end_logits[j, : b - a].float().cpu()
            if not qa:
                if logits is None:
                    logits = torch.empty(n, out.logits.shape[-1])
                logits[rows] = out.logits.float().cpu()
        teacher.train(was_training)
        tensors = {"hidden": hidden, "offsets": offsets}
        tensors |= {"start_logits": starts, "end_logits": ends} if qa else {"logits": logits}
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp))
        log.info("teacher outputs: %d examples, %.2f GB → %s", n, path.stat().st_size / 1e9, path)
    return path


class TeacherCache:
    """Reads a cache back as teacher outputs for a batch of dataset rows (same fields as the model's)."""

    def __init__(self, path: Path):
        self.file = safe_open(str(path), "pt")
        self.offsets = self.file.get_tensor("offsets")
        self.hidden = self.file.get_slice("hidden")
        names = set(self.file.keys())
        self.qa = "start_logits" in names
        self.logits = None if self.qa else self.file.get_tensor("logits")
        self.starts = self.file.get_slice("start_logits") if self.qa else None
        self.ends = self.file.get_slice("end_logits") if self.qa else None

    def outputs(self, rows: torch.Tensor, seq_len: int, device) -> SimpleNamespace:
        """rows [B] dataset indices, padded to seq_len → hidden_states (L+1) × [B, T, d] fp32 and logits."""
        rows = rows.tolist()
        layers, d = self.hidden.get_shape()[1:]
        hidden = torch.zeros(len(rows), seq_len, layers, d)
        starts = torch.full((len(rows), seq_len), -1e4) if self.qa else None
        ends = torch.full((len(rows), seq_len), -1e4) if self.qa else None
        for j, i in enumerate(rows):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            hidden[j, : b - a] = self.hidden[a:b].float()
            if self.qa:
                starts[j, : b - a] = self.starts[a:b]
                ends[j, : b - a] = self.ends[a:b]
        hidden = hidden.to(device)
        out = SimpleNamespace(hidden_states=tuple(hidden[:, :, layer] for layer in range(layers)))
        if self.qa:
            out.start_logits, out.end_logits = starts.to(device), ends.to(device)
        else:
            out.logits = self.logits[rows].to(device)
        return out
