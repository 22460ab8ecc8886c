"""MoE FFN kernels: the reference definition, the grouped torch path and the fused Triton kernel.

A leaf package (torch, and triton only when its backend is asked for). `moe_ffn` is the one entry
point the model calls; `backend` picks the implementation.
"""

from __future__ import annotations

import os

import torch

from kernels.export import moe_ffn_export
from kernels.grouped import moe_ffn_grouped
from kernels.reference import moe_ffn_reference

BACKENDS = ("reference", "torch", "triton", "export")  # export: the form ONNX export traces (kernels.export)


def default_backend(device: torch.device) -> str:
    """`MOEBERT_MOE_BACKEND` if set, else triton on CUDA when importable, else the grouped torch path."""
    chosen = os.environ.get("MOEBERT_MOE_BACKEND", "").strip().lower()
    if chosen:
        if chosen not in BACKENDS:
            raise ValueError(f"MOEBERT_MOE_BACKEND={chosen!r}: expected one of {', '.join(BACKENDS)}")
        return chosen
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
    expert_ids: torch.Tensor,
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
) -> torch.Tensor:
    """Top-1 MoE FFN with fused residual + per-expert LayerNorm. x [T, d], expert_ids [T] → [T, d]."""
    backend = backend or default_backend(x.device)
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
    if backend == "triton":
        from kernels.triton_moe import moe_ffn_triton

        return moe_ffn_triton(x, expert_ids, fc1_weight, fc1_bias, fc2_weight, fc2_bias, ln_weight, ln_bias, scale, eps)
    raise ValueError(f"unknown MoE backend {backend!r}: expected one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "default_backend", "moe_ffn", "moe_ffn_export", "moe_ffn_grouped", "moe_ffn_reference"]
