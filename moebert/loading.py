"""Load any BERT-family checkpoint (a MoEBERT folder, or a stock BERT folder / hub id as the dense
teacher) and its tokenizer into the MoEBERT classes, with clear errors for what is not one.

This is the model-loading boundary: a name that is plainly a path but names no folder is reported as
"no such folder: <path>" here, once, instead of as transformers' complaint that it is not a hub id.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Literal

import torch
from transformers import PretrainedConfig

from moebert.configuration import MoEBertConfig
from moebert.modeling import (
    MoEBertForQuestionAnswering,
    MoEBertForSequenceClassification,
    MoEBertModel,
    MoEBertPreTrainedModel,
)

Task = Literal["classification", "qa", "encoder"]
MODEL_CLASSES: dict[str, type[MoEBertPreTrainedModel]] = {
    "classification": MoEBertForSequenceClassification,
    "qa": MoEBertForQuestionAnswering,
    "encoder": MoEBertModel,
}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used: missing, not BERT, or inconsistent."""


# A hub id is `name` or `org/name` (letters, digits, -, _, .); anything else is meant as a local path.
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def looks_like_path(name: str | Path) -> bool:
    """Whether `name` can only mean a local path: a Path, absolute, ./ ../ ~ first, more than one /
    (a hub id has at most one) or the platform's own separator where that is not /."""
    if isinstance(name, Path):
        return True
    text = str(name)
    if os.path.isabs(text) or text in (".", "..") or text.startswith(("./", "../", "~")):
        return True
    if os.sep != "/" and (os.sep in text or text.startswith((".\\", "..\\"))):
        return True
    return not _HUB_ID.fullmatch(text)


def resolve(path: str | Path) -> str:
    """`path` as transformers is to be given it: a path-like name (looks_like_path) expanded (~) and
    required to be a local folder, else CheckpointError("no such folder: <path>"); a plausible hub id
    as it is (a local folder of that name still wins, as in transformers)."""
    text = str(path)
    if not looks_like_path(path):
        return text
    local = Path(os.path.expanduser(text))
    if not local.is_dir():
        raise CheckpointError(f"{'not a folder' if local.exists() else 'no such folder'}: {path}")
    return str(local)


def load_tokenizer(path: str | Path):
    """The tokenizer saved with a checkpoint (local folder or hub id)."""
    from transformers import AutoTokenizer

    name = resolve(path)
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot load a tokenizer ({str(err).splitlines()[0]})") from None


def load_config(path: str | Path, **overrides) -> MoEBertConfig:
    """The MoEBertConfig of a MoEBERT folder, or the dense-BERT MoEBertConfig of a stock BERT."""
    name = resolve(path)
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(name)
    except (OSError, json.JSONDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read a model config ({err})") from err
    if not config_dict:
        raise CheckpointError(f"{path}: no config.json found (not a model folder)")
    model_type = config_dict.get("model_type")
    if model_type not in ("bert", "moebert"):
        raise CheckpointError(
            f"{path}: model_type {model_type!r} is not a BERT checkpoint (expected 'bert' or 'moebert')"
        )
    config_dict = {k: v for k, v in config_dict.items() if k not in ("model_type", "transformers_version")}
    if model_type == "bert":
        config_dict["moe_layers"] = []
    if "num_labels" in overrides and "id2label" not in overrides:  # a new head: drop the old label names
        config_dict = {k: v for k, v in config_dict.items() if k not in ("id2label", "label2id")}
    try:
        return MoEBertConfig(**{**config_dict, **overrides})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid config ({err})") from err


def task_of(config: PretrainedConfig) -> Task:
    """Which head a checkpoint was trained with, from its recorded architecture."""
    archs = " ".join(config.architectures or [])
    if "QuestionAnswering" in archs:
        return "qa"
    if "SequenceClassification" in archs:
        return "classification"
    return "encoder"


PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.ckpt.index", "tf_model.h5")


def check_weights_files(path: str | Path) -> None:
    """A local folder must hold safetensors weights: pickled weights can run code when loaded, so they
    are refused (with what to do) rather than loaded."""
    folder = Path(path)
    if not folder.is_dir():
        return  # a hub id (or a missing folder, which load_config has reported)
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    pickled = [name for name in PICKLE_WEIGHTS if (folder / name).exists()]
    if pickled:
        raise CheckpointError(
            f"{folder / pickled[0]}: pickled weights are not loaded (they can run code); convert them to "
            "model.safetensors first (load in transformers, then save_pretrained(..., safe_serialization=True))"
        )
    raise CheckpointError(f"{folder}: no model.safetensors found (no weights in this folder)")


def load_model(
    path: str | Path, task: Task | None = None, dtype: torch.dtype = torch.float32, **overrides
) -> MoEBertPreTrainedModel:
    """Load `path` (local folder or hub id) for `task` (default: the task recorded in the checkpoint).

    Weights are cast to `dtype` (fp32 by default: checkpoints may be stored in fp16 to save space, and
    CPU inference and training want fp32).

    A stock BERT loads as a dense MoEBERT (moe_layers = []), e.g. the teacher; a head the checkpoint
    lacks (a bare encoder loaded for classification) starts from random weights, as in transformers.
    """
    config = load_config(path, **overrides)
    path = resolve(path)
    task = task or task_of(config)
    if task not in MODEL_CLASSES:
        raise CheckpointError(f"unknown task {task!r}: expected one of {', '.join(MODEL_CLASSES)}")
    check_weights_files(path)
    from safetensors import SafetensorError

    try:
        # A new head size (num_labels override) re-initialises the head instead of failing on its shape.
        model = MODEL_CLASSES[task].from_pretrained(
            str(path), config=config, dtype=dtype, ignore_mismatched_sizes="num_labels" in overrides
        )
    except SafetensorError as err:
        file = Path(path) / "model.safetensors"
        where = file if file.is_file() else f"{path}: a safetensors file"
        raise CheckpointError(f"{where} is not readable (truncated or corrupt?): {err}") from None
    except (OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot load the weights ({str(err).splitlines()[0]})") from None
    return model.eval()
