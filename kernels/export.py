"""The export-friendly MoE FFN: the same function as `kernels.reference`, written without Python control
flow on data (no `.tolist()`, no `numel()` tests), so that tracing (`torch.onnx.export`) records the
routing itself, for every input: per expert, NonZero → Gather → FFN → ScatterND in the graph.

Slower than the grouped path in eager PyTorch (E boolean scans instead of one sort); meant for export.
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
    """x [T, d], expert_ids [T] → y [T, d]. An expert with no tokens runs on an empty [0, d] slice."""
    num_experts, d, _ = fc1_weight.shape
    out = torch.zeros_like(x)
    for e in range(num_experts):  # E is a weight shape, fixed at export: the loop unrolls
        rows = (expert_ids == e).nonzero().squeeze(-1)  # [n_e]
        x_e = x.index_select(0, rows)  # [n_e, d]
        h = F.gelu(torch.matmul(x_e, fc1_weight[e]) + fc1_bias[e])  # [n_e, d_e]
        y = torch.matmul(h, fc2_weight[e]) + fc2_bias[e]  # [n_e, d]
        if scale is not None:  # depends on the routing method, not on the data
            y = y * scale.index_select(0, rows).unsqueeze(-1).to(y.dtype)
        if ln_weight is not None:
            y = F.layer_norm(x_e + y, (d,), ln_weight[e], ln_bias[e], eps)
        out = out.index_put((rows,), y)
    return out
