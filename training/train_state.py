"""A training run's full state inside a stage, so an interrupted run resumes where it stopped.

One folder `resume/` inside the stage's (stable) temporary folder: `state.safetensors` holds the model
weights, AdamW's moments and the RNG state; `state.json` the step, the position in the epoch, the
scheduler, the best metrics and the history. Written atomically (moebert.atomic), so a kill mid-write
leaves the previous state intact. safetensors, not pickle: a resume state is loaded without running code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moebert.atomic import atomic_folder

STATE_DIR = "resume"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # the epoch in progress
    batch: int = 0  # batches of that epoch already trained on
    elapsed: float = 0.0  # training seconds before this process started
    best: dict | None = None
    history: list = field(default_factory=list)


def save_state(folder: Path, state: TrainState, model, optimizer, scheduler) -> None:
    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    steps = {}
    for idx, slots in opt["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().clone().contiguous()
            else:
                steps[f"{idx}.{key}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        **state.__dict__,
        "param_groups": opt["param_groups"],
        "optim_scalars": steps,
        "scheduler": scheduler.state_dict(),
    }
    with atomic_folder(folder) as tmp:
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta, default=float))


def load_state(folder: Path, model, optimizer, scheduler) -> TrainState | None:
    """Restore model, optimizer, scheduler and RNG from `folder`; None when there is no state there."""
    folder = Path(folder)
    if not (folder / "state.json").is_file():
        return None
    meta = json.loads((folder / "state.json").read_text())
    tensors = load_file(folder / "state.safetensors")
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    slots: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            slots.setdefault(int(idx), {})[name] = value
    for key, value in meta["optim_scalars"].items():
        idx, name = key.split(".", 1)
        slots.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    fields = TrainState.__dataclass_fields__
    return TrainState(**{k: v for k, v in meta.items() if k in fields})
