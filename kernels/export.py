"""The MoE FFN as ONNX export records it: route once, one gather per expert, one scatter back.

Same function as `kernels.reference.moe_ffn_reference` for tokens routed to an expert in [0, E); a token
whose id is outside [0, E) is left as it is (y_t = x_t).

Traced form (E is a weight shape, so the loop unrolls; no Python control flow depends on the data):
per expert e a 1-D NonZero over the [T] expert ids (tiny), a row Gather x[rows_e] [n_e, d] and the
expert's FFN on those rows only; then one Concat of the E outputs and one row ScatterND of them into x.
ONNX Runtime profiles (benchmarks/results/onnx_profile.md) showed what this replaces costing more than
the experts themselves: per-expert full-tensor ScatterND copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_ffn_export(
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
) -> torch.Tensor:
    """x [T, d], expert_ids [T] (outside [0, E): row passes through), scale [T] or None → y [T, d]."""
    num_experts, d, _ = fc1_weight.shape
    rows, outputs = [], []
    for e in range(num_experts):
        rows_e = (expert_ids == e).nonzero().squeeze(-1)  # [n_e] tokens routed to expert e (maybe none)
        x_e = x.index_select(0, rows_e)  # [n_e, d]
        h = F.gelu(x_e @ fc1_weight[e] + fc1_bias[e])  # [n_e, d_e]
        y = h @ fc2_weight[e] + fc2_bias[e]  # [n_e, d]
        if scale is not None:
            y = y * scale.index_select(0, rows_e).unsqueeze(-1).to(y.dtype)
        if ln_weight is not None:
            y = F.layer_norm(x_e + y, (d,), ln_weight[e], ln_bias[e], eps)
        rows.append(rows_e)
        outputs.append(y)
    return x.index_put((torch.cat(rows),), torch.cat(outputs))
