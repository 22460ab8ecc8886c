"""The CPU (and fallback GPU) MoE FFN: sort tokens by expert, one matmul pair per expert.

Same function as `kernels.reference.moe_ffn_reference`, but each expert sees one contiguous slice of
the sorted tokens, so it costs one gather, E GEMM pairs on exactly the tokens routed there and one
scatter: no per-token weight gather, no dense compute of unused experts. Differentiable (training
uses it), with dropout on the expert output before the residual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_ffn_grouped(
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
) -> torch.Tensor:
    """x [T, d], expert_ids [T] → y [T, d]. See the reference for the exact definition."""
    num_experts, d, _ = fc1_weight.shape

    def expert(e: int, x_e: torch.Tensor, scale_e: torch.Tensor | None) -> torch.Tensor:
        h = F.gelu(torch.addmm(fc1_bias[e], x_e, fc1_weight[e]))  # [n_e, d_e]
        y = torch.addmm(fc2_bias[e], h, fc2_weight[e])  # [n_e, d]
        if dropout_p > 0.0 and training:
            y = F.dropout(y, dropout_p, training=True)
        if scale_e is not None:
            y = y * scale_e.unsqueeze(-1).to(y.dtype)
        if ln_weight is not None:
            y = F.layer_norm(x_e + y, (d,), ln_weight[e], ln_bias[e], eps)
        return y

    if num_experts == 1:  # a pruned dense FFN: no routing work at all
        return expert(0, x, scale)

    order = torch.argsort(expert_ids, stable=True)  # [T] token indices grouped by expert
    counts = torch.bincount(expert_ids, minlength=num_experts).tolist()
    x_sorted = x.index_select(0, order)
    scale_sorted = scale.index_select(0, order) if scale is not None else None
    pieces, start = [], 0
    for e, n in enumerate(counts):
        if n:
            s = scale_sorted[start : start + n] if scale_sorted is not None else None
            pieces.append(expert(e, x_sorted[start : start + n], s))
        start += n
    y_sorted = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    # Back to token order with a gather by the inverse permutation: index_select is several times
    # faster on CPU than the equivalent scatter (index_copy), and differentiable all the same.
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return y_sorted.index_select(0, inverse)
