"""MoE FFN kernels: the reference definition, the grouped torch path and the fused Triton kernel.

A leaf package (torch, and triton only when its backend is asked for). The model calls it in two steps:
`resolve_backend` once per forward (the one place that turns a request, the MOEBERT_MOE_BACKEND
environment variable and the device into a backend name, and the one place that validates a name),
then `moe_ffn` with that name: the one entry point, for routing computed by the model's router or, on
the triton backend with hash routing, computed inside the kernel from the input ids.
"""

from __future__ import annotations

import os

import torch

from kernels.export import moe_ffn_export
from kernels.grouped import moe_ffn_grouped
from kernels.reference import moe_ffn_reference

BACKENDS = ("reference", "torch", "triton", "export")  # export: the form ONNX export traces (kernels.export)


def check_backend(name: str, source: str = "MoE backend") -> str:
    """`name` if it is a backend, else a ValueError naming where it came from."""
    if name not in BACKENDS:
        raise ValueError(f"unknown {source} {name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """The backend to run: `requested` if given, else `MOEBERT_MOE_BACKEND` if set, else triton on CUDA
    when importable, else the grouped torch path."""
    if requested is not None:
        return check_backend(requested)
    chosen = os.environ.get("MOEBERT_MOE_BACKEND", "").strip().lower()
    if chosen:
        return check_backend(chosen, "MOEBERT_MOE_BACKEND value")
    if device.type == "cuda" and triton_available():
        return "triton"
    return "torch"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def moe_ffn(
    x: torch.Tensor,
    expert_ids: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    eps: float = 1e-12,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str | None = None,
    hash_routing: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Top-1 MoE FFN with fused residual + per-expert LayerNorm. x [T, d], expert_ids [T] → y [T, d].

    `backend` None resolves it here (`resolve_backend`); the model passes the name it resolved. With
    `hash_routing=(input_ids [T], table [vocab])` and expert_ids None, the triton backend routes inside
    its kernel (expert = table[input_ids]) and the call returns (y [T, d], expert_ids [T] int64); only
    the triton backend takes it.
    """
    backend = resolve_backend(backend, x.device)
    if hash_routing is not None:
        if backend != "triton" or expert_ids is not None:
            raise ValueError("hash_routing is the triton backend's fused routing; give expert_ids otherwise")
        from kernels.triton_moe import moe_ffn_triton_hashed

        input_ids, table = hash_routing
        return moe_ffn_triton_hashed(
            x, input_ids, table, fc1_weight, fc1_bias, fc2_weight, fc2_bias, ln_weight, ln_bias, eps
        )
    if backend == "torch":
        return moe_ffn_grouped(
            x, expert_ids, fc1_weight, fc1_bias, fc2_weight, fc2_bias, ln_weight, ln_bias, scale, eps,
            dropout_p, training,
        )  # fmt: skip
    if training and dropout_p > 0.0 and torch.is_grad_enabled():
        raise ValueError(f"the {backend!r} MoE backend is for inference; train with backend 'torch'")
    if backend == "export":
        return moe_ffn_export(x, expert_ids, fc1_weight, fc1_bias, fc2_weight, fc2_bias, ln_weight, ln_bias, scale, eps)
    if backend == "reference":
        return moe_ffn_reference(
            x, expert_ids, fc1_weight, fc1_bias, fc2_weight, fc2_bias, ln_weight, ln_bias, scale, eps
        )
    from kernels.triton_moe import moe_ffn_triton

    return moe_ffn_triton(x, expert_ids, fc1_weight, fc1_bias, fc2_weight, fc2_bias, ln_weight, ln_bias, scale, eps)


__all__ = [
    "BACKENDS", "check_backend", "moe_ffn", "moe_ffn_export", "moe_ffn_grouped", "moe_ffn_reference",
    "resolve_backend", "triton_available",
]  # fmt: skip
