"""Checks on a checkpoint folder before the server starts: each problem is one line naming the file and
what is wrong with it (instead of a loader's traceback, a 36-line size table, or a silent mismatch)."""

from __future__ import annotations

import json
from pathlib import Path

from moebert.loading import CheckpointError, load_config, task_of
from server.backends import onnx_file, resolve_backend


def check_checkpoint(path: str | Path, backend: str, precision: str, device: str) -> None:
    """Raise CheckpointError (or FileNotFoundError) if `path` cannot be served as configured."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder (a checkpoint is a folder with config.json)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path / 'config.json'} not found: not a checkpoint folder")
    config = load_config(path)
    task = task_of(config)
    if task not in ("classification", "qa"):
        raise CheckpointError(
            f"{path / 'config.json'}: no classification or QA head (architectures {config.architectures})"
        )
    check_tokenizer(path)
    backend, precision = resolve_backend(path, backend, precision, device)
    heads = config.num_labels if task == "classification" else 2
    if backend == "onnx":
        check_onnx(onnx_file(path, precision), heads)
    else:
        check_safetensors(path, config, heads)


def check_tokenizer(path: Path) -> None:
    """The server needs a fast tokenizer: tokenizer.json, complete and loadable."""
    file = path / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"{file} not found: the server needs the fast tokenizer saved with the model")
    try:
        json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON (truncated or corrupt?): {err}") from None
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust side raises plain Exception
        raise CheckpointError(f"{file} is not a usable tokenizer: {str(err).splitlines()[0]}") from None


def check_safetensors(path: Path, config, heads: int) -> None:
    """The weights file is readable and its embedding and head shapes agree with config.json."""
    from safetensors import SafetensorError, safe_open

    file = path / "model.safetensors"
    if not file.is_file():  # a sharded checkpoint: the loader checks its shards
        return
    try:
        with safe_open(str(file), "np") as f:
            shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    h = config.hidden_size
    expected = {
        "embeddings.word_embeddings.weight": ([config.vocab_size, h], "vocab_size, hidden_size"),
        "embeddings.position_embeddings.weight": (
            [config.max_position_embeddings, h],
            "max_position_embeddings, hidden_size",
        ),
        "classifier.weight": ([heads, h], "num_labels, hidden_size"),
        "qa_outputs.weight": ([heads, h], "2, hidden_size"),
    }
    for key, shape in shapes.items():
        for suffix, (want, names) in expected.items():
            if key.endswith(suffix) and shape != want:
                raise CheckpointError(f"{file}: {key} has shape {shape}, but config.json says [{names}] = {want}")


def check_onnx(file: Path, heads: int) -> None:
    """The ONNX graph's outputs agree with config.json (num_labels)."""
    import onnx

    try:
        graph = onnx.load(str(file), load_external_data=False).graph
    except Exception as err:  # protobuf's DecodeError and friends
        raise CheckpointError(f"{file} is not a readable ONNX model (truncated or corrupt?): {err}") from None
    outputs = {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in graph.output}
    dims = outputs.get("logits")
    if dims and isinstance(dims[-1], int) and dims[-1] != heads:
        raise CheckpointError(
            f"{file}: the graph's logits have {dims[-1]} labels, but config.json says num_labels = {heads} "
            "(export it again from this checkpoint)"
        )
