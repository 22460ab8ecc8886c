"""The definition of the MoE FFN that every backend must reproduce.

For token t routed to expert e = expert_ids[t], with that expert's stacked weights

    y_t = fc2_e( gelu( fc1_e x_t ) )                 fc1_e: x @ W1[e] + b1[e],  fc2_e: h @ W2[e] + b2[e]
    y_t = y_t * scale[t]                              (gated routing only: the router's probability)
    y_t = LayerNorm_e( x_t + y_t )                    (when LayerNorm weights are given)

with the exact erf GELU, as BERT uses. Shapes:
    x [T, d], expert_ids [T] int, W1 [E, d, d_e], b1 [E, d_e], W2 [E, d_e, d], b2 [E, d],
    ln_weight / ln_bias [E, d], scale [T].

This file is deliberately plain: one loop over experts, no tricks. Tests compare the fast paths to it
(usually after casting everything to float64). ONNX export traces `kernels.export` instead, the same
function arranged for ONNX Runtime.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_ffn_reference(
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
    """Top-1 MoE FFN, one expert at a time. Returns y [T, d] in x's dtype."""
    num_experts, d, _ = fc1_weight.shape
    out = torch.zeros_like(x)
    for e in range(num_experts):
        rows = (expert_ids == e).nonzero().squeeze(-1)  # [n_e] tokens routed to expert e (maybe none)
        x_e = x.index_select(0, rows)  # [n_e, d]
        h = F.gelu(x_e @ fc1_weight[e] + fc1_bias[e])  # [n_e, d_e]
        y = h @ fc2_weight[e] + fc2_bias[e]  # [n_e, d]
        if scale is not None:
            y = y * scale.index_select(0, rows).unsqueeze(-1).to(y.dtype)
        if ln_weight is not None:
            y = F.layer_norm(x_e + y, (d,), ln_weight[e], ln_bias[e], eps)
        out = out.index_put((rows,), y)
    return out
