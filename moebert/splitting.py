"""How a dense FFN is cut into experts (METHOD.md §2).

With `order` = the FFN's neurons sorted by importance (most important first), s shared neurons, N
experts of width d_e:

    expert e keeps   concat(order[:s], order[s:][e::N])[:d_e]

The top-s neurons are in every expert, the rest are dealt round-robin by rank, and whatever fits no
expert is dropped. `random` and `inverse` splits use the same rule on a shuffled or reversed order.
"""

from __future__ import annotations

import torch

from moebert.configuration import check_moe_settings


def neuron_order(scores: torch.Tensor | None, method: str, seed: int = 0) -> torch.Tensor:
    """Order of one layer's d_h neurons for the split. scores [d_h] (None allowed for 'random')."""
    check_moe_settings(split=method)
    if method == "random":
        if scores is None:
            raise ValueError("neuron_order needs the layer width; pass zeros of shape [d_h] for a random split")
        return torch.randperm(scores.numel(), generator=torch.Generator().manual_seed(seed))
    if scores is None:
        raise ValueError(f"the {method!r} split needs importance scores (run `moebert importance` first)")
    # Stable sort so that ties (e.g. dead neurons with score 0) keep index order: reproducible splits.
    return torch.sort(scores.double(), descending=(method == "importance"), stable=True).indices


def expert_neurons(order: torch.Tensor, num_experts: int, expert_dim: int, shared_dim: int) -> torch.Tensor:
    """order [d_h] → kept [N, d_e]: the teacher neurons each expert keeps (shared first, then by rank)."""
    d_h = order.numel()
    check_moe_settings(num_experts=num_experts, expert_dim=expert_dim, shared_dim=shared_dim, ffn_width=d_h)
    shared, rest = order[:shared_dim], order[shared_dim:]
    kept = []
    for e in range(num_experts):
        neurons = torch.cat([shared, rest[e::num_experts]])[:expert_dim]
        if neurons.numel() < expert_dim:
            raise ValueError(
                f"expert {e} gets only {neurons.numel()} of {expert_dim} neurons: {num_experts} experts × "
                f"({expert_dim} − {shared_dim} shared) need more than the {d_h} neurons of the FFN"
            )
        kept.append(neurons)
    return torch.stack(kept)


# ----------------------------------------------------------------------------------------------------
# The importance file written by `moebert importance` and read by `moebert convert`:
# safetensors with scores.{layer} [d_h] float32 and order.{layer} [d_h] int64 (most important first),
# and metadata (teacher, samples, num_layers, intermediate_size).


def save_importance(path, scores: list[torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for layer, s in enumerate(scores):
        tensors[f"scores.{layer}"] = s.float().contiguous()
        tensors[f"order.{layer}"] = neuron_order(s, "importance").contiguous()
    meta = {**metadata, "num_layers": str(len(scores)), "intermediate_size": str(scores[0].numel())}
    save_file(tensors, str(path), metadata=meta)


def load_importance(path, num_layers: int, intermediate_size: int) -> list[torch.Tensor]:
    """Per-layer importance scores [d_h], checked against the teacher's shape."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise ValueError(f"{path}: not a readable importance file ({err})") from err
    scores = []
    for layer in range(num_layers):
        s = tensors.get(f"scores.{layer}")
        if s is None:
            raise ValueError(f"{path}: no scores for layer {layer} (the teacher has {num_layers} layers)")
        if s.shape != (intermediate_size,):
            raise ValueError(
                f"{path}: layer {layer} scores have shape {tuple(s.shape)}, "
                f"the teacher's FFN has {intermediate_size} neurons"
            )
        scores.append(s)
    if f"scores.{num_layers}" in tensors:
        raise ValueError(f"{path}: scores for more layers than the teacher's {num_layers}")
    return scores
