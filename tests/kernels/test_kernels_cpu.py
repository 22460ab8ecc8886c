"""The grouped torch MoE FFN against the plain reference, over awkward shapes (float64 and float32),
forward and backward."""

from __future__ import annotations

import pytest
import torch

from kernels import moe_ffn, moe_ffn_grouped, moe_ffn_reference


def make_weights(E, d, d_e, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(dtype)
    return dict(
        fc1_weight=r(E, d, d_e, std=d**-0.5), fc1_bias=r(E, d_e, std=0.1),
        fc2_weight=r(E, d_e, d, std=d_e**-0.5), fc2_bias=r(E, d, std=0.1),
        ln_weight=1 + r(E, d, std=0.2), ln_bias=r(E, d, std=0.1),
    )  # fmt: skip


def token_loop(x, ids, w, scale=None, eps=1e-12):
    """A third, independent formulation: one token at a time, float64."""
    out = []
    for t in range(x.shape[0]):
        e = int(ids[t])
        h = torch.nn.functional.gelu(x[t] @ w["fc1_weight"][e] + w["fc1_bias"][e])
        y = h @ w["fc2_weight"][e] + w["fc2_bias"][e]
        if scale is not None:
            y = y * scale[t]
        z = x[t] + y
        z = (z - z.mean()) / torch.sqrt(z.var(unbiased=False) + eps)
        out.append(z * w["ln_weight"][e] + w["ln_bias"][e])
    return torch.stack(out)


@pytest.mark.parametrize("T", [1, 7, 33, 300])
@pytest.mark.parametrize(("d", "d_e", "E"), [(36, 12, 1), (36, 28, 4), (60, 17, 8)])
@pytest.mark.parametrize("routing", ["random", "one-expert", "empty-expert", "gated"])
def test_grouped_matches_reference_float64(T, d, d_e, E, routing):
    w = make_weights(E, d, d_e, torch.float64)
    x = torch.randn(T, d, dtype=torch.float64)
    ids = torch.randint(E, (T,))
    if routing == "one-expert":
        ids.fill_(E - 1)
    elif routing == "empty-expert" and E > 1:
        ids = ids.clamp(max=E - 2)  # the last expert gets nothing
    scale = torch.rand(T, dtype=torch.float64) if routing == "gated" else None
    ref = moe_ffn_reference(x, ids, **w, scale=scale)
    got = moe_ffn_grouped(x, ids, **w, scale=scale)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    if T <= 33:
        torch.testing.assert_close(ref, token_loop(x, ids, w, scale), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_float32_close_to_float64(backend):
    w64 = make_weights(4, 96, 40, torch.float64)
    x64 = torch.randn(57, 96, dtype=torch.float64)
    ids = torch.randint(4, (57,))
    ref = moe_ffn_reference(x64, ids, **w64)
    got = moe_ffn(x64.float(), ids, **{k: v.float() for k, v in w64.items()}, backend=backend)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-5)


def test_grouped_gradients_match_reference():
    w = {k: v.requires_grad_() for k, v in make_weights(3, 20, 9, torch.float64).items()}
    x = torch.randn(25, 20, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(3, (25,))
    scale = torch.rand(25, dtype=torch.float64, requires_grad=True)
    inputs = [x, scale, *w.values()]
    g_ref = torch.autograd.grad(moe_ffn_reference(x, ids, **w, scale=scale).square().sum(), inputs)
    g_got = torch.autograd.grad(moe_ffn_grouped(x, ids, **w, scale=scale).square().sum(), inputs)
    for a, b in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_no_layernorm_variant():
    w = make_weights(2, 16, 8, torch.float64)
    w.pop("ln_weight"), w.pop("ln_bias")
    x, ids = torch.randn(9, 16, dtype=torch.float64), torch.tensor([0, 1] * 4 + [1])
    torch.testing.assert_close(moe_ffn_grouped(x, ids, **w), moe_ffn_reference(x, ids, **w), rtol=0, atol=1e-12)


def test_unknown_backend_is_a_clear_error(monkeypatch):
    w = make_weights(2, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="unknown MoE backend"):
        moe_ffn(torch.randn(3, 8), torch.zeros(3, dtype=torch.long), **w, backend="cuda-magic")
    monkeypatch.setenv("MOEBERT_MOE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MOEBERT_MOE_BACKEND"):
        moe_ffn(torch.randn(3, 8), torch.zeros(3, dtype=torch.long), **w)


@pytest.mark.parametrize("T", [1, 7, 33, 300])
@pytest.mark.parametrize(("d", "d_e", "E"), [(36, 12, 1), (36, 28, 4), (60, 17, 8)])
@pytest.mark.parametrize("routing", ["random", "one-expert", "empty-expert", "gated", "padding"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_export_form_matches_reference(T, d, d_e, E, routing, dtype):
    """The form ONNX export traces: the reference on routed rows; rows routed outside [0, E) pass through."""
    w = make_weights(E, d, d_e, dtype)
    x = torch.randn(T, d, dtype=dtype)
    ids = torch.randint(E, (T,))
    if routing == "one-expert":
        ids.fill_(E - 1)
    elif routing == "empty-expert" and E > 1:
        ids = ids.clamp(max=E - 2)
    scale = torch.rand(T, dtype=dtype) if routing == "gated" else None
    skipped = torch.zeros(T, dtype=torch.bool)
    if routing == "padding":  # what the exporter does with padding tokens: expert E (or any id ≥ E)
        skipped = torch.rand(T) < 0.4
        ids = torch.where(skipped, E + torch.randint(3, (T,)), ids)
    got = moe_ffn(x, ids, **w, scale=scale, backend="export")
    routed = ~skipped
    ref = moe_ffn_reference(x[routed], ids[routed], **w, scale=None if scale is None else scale[routed])
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got[routed], ref, rtol=0, atol=atol)
    torch.testing.assert_close(got[skipped], x[skipped], rtol=0, atol=0)
