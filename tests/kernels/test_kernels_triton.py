"""The fused Triton MoE FFN against the PyTorch reference (kernels.reference).

Without CUDA the kernels run in Triton's interpreter on the CPU (TRITON_INTERPRET=1, set below before any
Triton kernel is imported; fp32 and fp16 only: the interpreter gets bf16 dots wrong). With CUDA the same
tests run the compiled kernels, and the `gpu` tests add bf16, every tuning candidate, large T, no host
synchronisation and CUDA-graph capture.

Tolerances (|got - want| ≤ atol + rtol · |want|, elementwise):
  fp32 kernel  vs the reference in float64 on the same values:                atol = rtol = 2e-5
  fp16 kernel  vs the reference in fp32 on the fp16-rounded inputs:          atol = rtol = 1e-2
  bf16 kernel  vs the reference in fp32 on the bf16-rounded inputs (GPU):    atol = rtol = 4e-2
The low-precision bounds cover rounding the output and the GELU activations (GEMM 2's input) to 16 bits;
outputs are O(1) (LayerNorm), so a wrong expert, bias, scale or row is off by ~0.1-1 and fails.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before kernels.triton_moe is imported: @triton.jit reads it then

pytest.importorskip("triton")

from kernels import moe_ffn  # noqa: E402
from kernels.reference import moe_ffn_reference  # noqa: E402
from kernels.triton_moe import (  # noqa: E402
    FFNConfig,
    candidate_configs,
    moe_ffn_triton,
    moe_ffn_triton_hashed,
    n_tiling,
)

DEVICE = "cuda" if CUDA else "cpu"
TOLERANCE = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def make_weights(E, d, d_e, seed=0, ln=True):
    """Float64 weights of BERT-like scale (unit-variance activations), on the CPU."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * std
    w = dict(
        fc1_weight=r(E, d, d_e, std=d**-0.5), fc1_bias=r(E, d_e, std=0.1),
        fc2_weight=r(E, d_e, d, std=d_e**-0.5), fc2_bias=r(E, d, std=0.1),
    )  # fmt: skip
    if ln:
        w |= dict(ln_weight=1 + r(E, d, std=0.2), ln_bias=r(E, d, std=0.1))
    return w


def make_routing(T, E, routing, seed=0):
    """expert_ids [T] and scale [T] or None for one of the routing cases."""
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(E, (T,), generator=g)
    if routing == "one-expert":
        ids.fill_(E - 1)
    elif routing == "empty-expert":  # expert 1 (a middle one when E > 2) gets nothing
        ids = torch.where(ids == 1, torch.zeros_like(ids), ids)
    scale = torch.rand(T, generator=g, dtype=torch.float64) if routing == "gated" else None
    return ids, scale


def check_against_reference(T, d, d_e, E, routing, dtype, ln=True, config=None, seed=0):
    """Run the Triton kernel in `dtype` and compare with the reference (float64 for fp32 inputs, fp32 on the
    rounded inputs otherwise) under TOLERANCE[dtype]. Returns the kernel output."""
    w64 = make_weights(E, d, d_e, seed, ln)
    x64 = torch.randn(T, d, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    ids, scale64 = make_routing(T, E, routing, seed)
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    as_ref = lambda t: None if t is None else t.to(dtype).to(ref_dtype)  # the very values the kernel sees
    want = moe_ffn_reference(
        as_ref(x64), ids, **{k: as_ref(v) for k, v in w64.items()}, scale=None if scale64 is None else scale64
    )
    got = moe_ffn_triton(
        x64.to(DEVICE, dtype), ids.to(DEVICE), **{k: v.to(DEVICE, dtype) for k, v in w64.items()},
        scale=None if scale64 is None else scale64.to(DEVICE, torch.float32), config=config,
    )  # fmt: skip
    assert got.dtype == dtype and got.shape == (T, d)
    torch.testing.assert_close(got.cpu().to(ref_dtype), want, **TOLERANCE[dtype])
    return got


# Launch paths: the table's default for T (split d_e when T ≤ 1024), the fully fused kernel (one program per
# block of rows owns the whole d_e range and runs the LayerNorm epilogue), an explicit split-d_e, and the
# two-pass grouped GEMMs (tiles that divide none of d = 600, d_e = 96, so every edge is masked).
PATHS = {
    "default": None,
    "fused": FFNConfig(block_m=64, block_k=64, block_e=32, split_e=1),
    "split": FFNConfig(block_m=16, block_k=32, block_e=64, split_e=3),
    "two_pass": FFNConfig(block_m=32, block_k=64, block_e=64, two_pass=True),
}

# A pairwise design (every pair of values of any two factors appears in some row; generated greedily, E = 1
# with an empty expert excluded) instead of the 4,320-case product, which the interpreter cannot afford.
# T, d, d_e, E, routing, dtype, LayerNorm, path
PAIRWISE_CASES = [
    (1, 384, 96, 1, "random", "fp32", False, "split"),
    (1, 384, 96, 4, "gated", "fp16", False, "default"),
    (1, 384, 96, 4, "one-expert", "fp16", True, "fused"),
    (1, 600, 384, 4, "empty-expert", "fp16", True, "default"),
    (1, 768, 96, 8, "empty-expert", "fp32", True, "fused"),
    (7, 384, 96, 4, "empty-expert", "fp32", False, "split"),
    (7, 384, 96, 4, "gated", "fp32", False, "default"),
    (7, 600, 384, 1, "random", "fp16", False, "default"),
    (7, 768, 96, 8, "one-expert", "fp16", True, "fused"),
    (33, 384, 96, 8, "empty-expert", "fp32", True, "split"),
    (33, 600, 96, 8, "gated", "fp32", False, "default"),
    (33, 600, 384, 1, "random", "fp16", True, "fused"),
    (33, 600, 96, 4, "one-expert", "fp32", False, "split"),
    (33, 768, 96, 8, "random", "fp16", False, "split"),
    (128, 384, 384, 8, "one-expert", "fp32", True, "split"),
    (128, 384, 96, 8, "random", "fp16", False, "default"),
    (128, 384, 96, 1, "gated", "fp32", True, "default"),
    (128, 600, 96, 4, "empty-expert", "fp16", True, "default"),
    (128, 768, 384, 4, "gated", "fp32", False, "fused"),
    (300, 384, 384, 1, "gated", "fp16", True, "split"),
    (300, 384, 96, 4, "random", "fp16", True, "fused"),
    (300, 600, 96, 8, "empty-expert", "fp32", False, "fused"),
    (300, 768, 96, 1, "one-expert", "fp32", False, "default"),
    (1, 384, 384, 8, "gated", "fp32", True, "two_pass"),
    (7, 600, 96, 4, "random", "fp16", False, "two_pass"),
    (33, 768, 384, 1, "one-expert", "fp16", True, "two_pass"),
    (128, 768, 96, 4, "empty-expert", "fp32", False, "two_pass"),
    (300, 600, 384, 8, "random", "fp16", True, "two_pass"),
]


@pytest.mark.parametrize(("T", "d", "d_e", "E", "routing", "dtype", "ln", "path"), PAIRWISE_CASES)
def test_triton_matches_reference(T, d, d_e, E, routing, dtype, ln, path):
    check_against_reference(T, d, d_e, E, routing, DTYPES[dtype], ln, PATHS[path])


def test_bert_base_shape_fp16_fused():
    """The production shape (BERT-base, 4 × 768 experts) through the fused path, with an empty expert."""
    check_against_reference(300, 768, 384, 8, "empty-expert", torch.float16, True, PATHS["fused"], seed=5)


def test_the_design_covers_every_pair():
    """Guards the table above: dropping a row must not silently lose coverage."""
    routings = ("random", "one-expert", "empty-expert", "gated")
    factors = [(1, 7, 33, 128, 300), (384, 600, 768), (96, 384), (1, 4, 8), routings, tuple(DTYPES), (True, False),
               tuple(PATHS)]  # fmt: skip
    for i in range(len(factors)):
        for j in range(i + 1, len(factors)):
            covered = {(row[i], row[j]) for row in PAIRWISE_CASES}
            for a in factors[i]:
                for b in factors[j]:
                    if {a, b} == {1, "empty-expert"} and {i, j} == {3, 4}:
                        continue
                    assert (a, b) in covered, f"no case with factor {i} = {a!r} and factor {j} = {b!r}"


@pytest.mark.parametrize(
    ("T", "E", "routing", "two_pass"),
    [(2500, 5, "random", False), (2100, 16, "empty-expert", False), (1500, 3, "gated", False),
     (2100, 16, "empty-expert", True)],
)  # fmt: skip
def test_routing_across_token_chunks(T, E, routing, two_pass):
    """More tokens than one routing chunk (1024), so slot offsets carry over from earlier chunks; many
    experts (E_POW2 > E), and most experts end in a partly padded block. Small d keeps
    the interpreter fast: these cases are about routing, the FFN shapes are covered above."""
    config = FFNConfig(64, 64, 32, split_e=1, two_pass=two_pass)
    check_against_reference(T, 48, 32, E, routing, torch.float32, True, config, seed=T)


def test_hash_routing_inside_the_kernel():
    """expert = table[input_id] computed by the routing kernel, returned, and used for the FFN."""
    E, d, d_e, T, vocab = 4, 384, 96, 45, 1000
    g = torch.Generator().manual_seed(3)
    table = torch.randint(E, (vocab,), generator=g)
    table[table == 2] = 0  # expert 2 receives no token
    input_ids = torch.randint(vocab, (T,), generator=g)
    w = make_weights(E, d, d_e, seed=3)
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    y, expert_ids = moe_ffn_triton_hashed(
        x.to(DEVICE, torch.float32), input_ids.to(DEVICE), table.to(DEVICE),
        **{k: v.to(DEVICE, torch.float32) for k, v in w.items()},
    )  # fmt: skip
    assert expert_ids.dtype == torch.long
    torch.testing.assert_close(expert_ids.cpu(), table[input_ids], rtol=0, atol=0)
    want = moe_ffn_reference(x, table[input_ids], **w)
    torch.testing.assert_close(y.cpu().double(), want, **TOLERANCE[torch.float32])


def test_dispatch_and_edge_cases():
    w = {k: v.to(DEVICE, torch.float32) for k, v in make_weights(4, 48, 32).items()}
    x = torch.randn(9, 48, device=DEVICE)
    ids = torch.tensor([3, 0, 0, 3, 1, 3, 0, 1, 0], device=DEVICE)
    want = moe_ffn_reference(x.cpu(), ids.cpu(), **{k: v.cpu() for k, v in w.items()})
    torch.testing.assert_close(moe_ffn(x, ids, **w, backend="triton").cpu(), want, **TOLERANCE[torch.float32])
    assert moe_ffn_triton(x[:0], ids[:0], **w).shape == (0, 48)  # no tokens: no launch, empty result
    # a strided x (a column slice) is handled
    wide = torch.randn(9, 96, device=DEVICE)
    torch.testing.assert_close(
        moe_ffn_triton(wide[:, :48], ids, **w).cpu(), moe_ffn_triton(wide[:, :48].contiguous(), ids, **w).cpu()
    )
    with pytest.raises(ValueError, match="share a dtype"):
        moe_ffn_triton(x.half(), ids, **w)
    with pytest.raises(ValueError, match=r"x must be \[T, 48\]"):
        moe_ffn_triton(x[:, :40], ids, **w)
    big = {k: v.to(DEVICE, torch.float32) for k, v in make_weights(1, 1040, 16).items()}
    with pytest.raises(ValueError, match="d ≤ 1024"):
        moe_ffn_triton(torch.randn(2, 1040, device=DEVICE), torch.zeros(2, dtype=torch.long, device=DEVICE), **big)


def test_accumulator_tiling_and_config_table():
    assert n_tiling(768) == (256, 3) and n_tiling(384) == (128, 3) and n_tiling(600) == (256, 3)
    assert n_tiling(1024) == (256, 4) and n_tiling(36) == (16, 3)
    for T in (1, 64, 65, 1024, 1025, 65536):
        for d, d_e in ((384, 384), (768, 768), (600, 96)):
            configs = candidate_configs(T, d, d_e, 4)
            assert configs and len(set(configs)) == len(configs)
            assert all(min(c.block_m, c.block_k, c.block_e) >= 16 and c.split_e >= 1 for c in configs)
            assert not configs[0].two_pass  # the untuned default (CPU, MOEBERT_TRITON_TUNE=0) stays fused
            assert all(c.split_e == 1 for c in configs if c.two_pass)
    with pytest.raises(ValueError, match="split_e must be 1"):
        FFNConfig(64, 64, 64, split_e=2, two_pass=True)


def test_a_tuned_choice_is_kept_where_nothing_is_timed(monkeypatch):
    """Inside a CUDA-graph capture (and with tuning off) nothing is timed: the choice the tuner made for
    this key before is launched, not the table's default; with no choice made, the default is."""
    import kernels.triton_moe as triton_moe

    w = {k: v.to(DEVICE, torch.float32) for k, v in make_weights(4, 48, 32).items()}
    x, ids = torch.randn(5000, 48, device=DEVICE), torch.randint(4, (5000,), device=DEVICE)
    launched = []
    monkeypatch.setattr(triton_moe, "_launch", lambda config, *args: launched.append(config))
    monkeypatch.setattr(triton_moe, "_tuning_enabled", lambda x: False)
    monkeypatch.setattr(triton_moe, "_TUNED", {})
    candidates = candidate_configs(5000, 48, 32, 4)
    moe_ffn_triton(x, ids, **w)
    triton_moe._TUNED[triton_moe._tuning_key(x, 5000, 48, 32, 4, True, False)] = candidates[-1]
    moe_ffn_triton(x, ids, **w)
    assert launched == [candidates[0], candidates[-1]] and candidates[0] != candidates[-1]


def test_tuner_keeps_the_fastest_candidate_that_runs(monkeypatch, caplog):
    """The tuner's choice logic without a GPU: a fake timer (candidates that fail, e.g. out of shared memory
    on the device, are skipped) and the log line that names every candidate's time."""
    import triton.testing

    import kernels.triton_moe as triton_moe

    candidates = candidate_configs(5000, 768, 768, 4)
    fake_ms = {c: 1.0 + i for i, c in enumerate(candidates)}
    fake_ms[candidates[-1]] = 0.5  # the fastest, a two-pass one
    fake_ms[candidates[0]] = None  # fails to run
    launched = []

    def fake_do_bench_cudagraph(fn, rep):
        fn()
        if fake_ms[launched[-1]] is None:
            raise RuntimeError("out of resources")
        return fake_ms[launched[-1]]

    def eager_must_not_be_used(fn, warmup, rep):
        fn()
        raise RuntimeError("out of resources")  # a candidate that cannot run fails either way

    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", fake_do_bench_cudagraph)
    monkeypatch.setattr(triton.testing, "do_bench", eager_must_not_be_used)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(triton_moe, "_launch", lambda config, *args: launched.append(config))
    args = (torch.empty(5000, 768), None, None, None, None, torch.empty(4, 768, 768))
    with caplog.at_level("INFO", logger="kernels.triton_moe"):
        assert triton_moe._tune(candidates, args) == candidates[-1]
    assert candidates[-1].two_pass and "two-pass 128x64x256 w8 s3 500µs" in caplog.text
    assert "timed as graph:" in caplog.text
    assert candidates[0].short() not in caplog.text.split("(of")[1]  # the failed one has no time


def test_tuner_falls_back_to_eager_timing_where_capture_fails(monkeypatch, caplog):
    """A candidate whose launch cannot be captured (no CUDA graphs here) is timed eagerly, not dropped."""
    import triton.testing

    import kernels.triton_moe as triton_moe

    candidates = candidate_configs(100, 384, 384, 4)[:3]
    graph_ms = {candidates[0]: 0.2, candidates[1]: None, candidates[2]: 0.3}  # None: capture fails
    launched = []

    def fake_do_bench_cudagraph(fn, rep):
        fn()
        if graph_ms[launched[-1]] is None:
            raise RuntimeError("operation not permitted when stream is capturing")
        return graph_ms[launched[-1]]

    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", fake_do_bench_cudagraph)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep: fn() or 0.1)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(triton_moe, "_launch", lambda config, *args: launched.append(config))
    args = (torch.empty(100, 384), None, None, None, None, torch.empty(4, 384, 384))
    with caplog.at_level("INFO", logger="kernels.triton_moe"):
        assert triton_moe._tune(candidates, args) == candidates[1]  # its eager 100 µs beat the replays
    assert "timed as eager/graph:" in caplog.text


MID_T_CANDIDATES = [c for c in candidate_configs(3000, 48, 40, 3) if c not in candidate_configs(5000, 48, 40, 3)]


@pytest.mark.parametrize(
    ("config", "routing", "dtype"),
    zip(
        MID_T_CANDIDATES,
        ["empty-expert", "gated", "gated", "empty-expert"],
        ["fp32", "fp16", "fp32", "fp16"],
        strict=True,
    ),
    ids=lambda v: v.short().replace(" ", "-") if isinstance(v, FFNConfig) else v,
)
def test_mid_token_count_candidates_match_reference(config, routing, dtype):
    """The smaller-tile and split-d_e (split-K) candidates the table adds for 1024 < T ≤ 4096, on awkward sizes
    (launch parameters do not depend on T, so a smaller T keeps the interpreter fast): T = 203, d = 40 and
    d_e = 100 divide no tile (4 splits of d_e, the last one ragged), 3 experts, one empty or a gate scale."""
    assert len(MID_T_CANDIDATES) == 4
    check_against_reference(203, 40, 100, 3, routing, DTYPES[dtype], True, config, seed=11)


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("route", ["hash-random", "gate-token", "gate-sentence"])
def test_model_logits_triton_equal_torch(route, layout, tiny_cls_dir, padded_batch, tmp_path, monkeypatch):
    """Whole MoEBERT (3 MoE layers, d = 36, 4 experts of 21, padding): the triton backend's logits and
    expert counts equal the grouped torch backend's (packed layout). Hash routing goes through the in-kernel
    table lookup, gated routing through expert ids from the model's gate; the padded layout (the CUDA path)
    also routes the padding tokens through the kernel and drops their results."""
    import kernels.triton_moe as triton_moe
    from moebert.convert import ConvertConfig, convert
    from moebert.loading import load_model

    out = convert(ConvertConfig(
        teacher=str(tiny_cls_dir), output_dir=str(tmp_path / "moe"), split="random", expert_dim=21, shared_dim=7,
        route=route,
    ))  # fmt: skip
    model = load_model(out).to(DEVICE).eval()
    batch = {k: v.to(DEVICE) for k, v in padded_batch.items()}
    calls = []
    for name in ("moe_ffn_triton", "moe_ffn_triton_hashed"):
        original = getattr(triton_moe, name)
        monkeypatch.setattr(triton_moe, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    results = {}
    for backend in ("torch", "triton"):
        model.set_moe_backend(backend)
        model.set_token_layout(layout if backend == "triton" else "packed")
        with torch.no_grad():
            results[backend] = model(**batch, output_expert_counts=True)
    assert calls == ["moe_ffn_triton_hashed" if route == "hash-random" else "moe_ffn_triton"] * 3  # one per layer
    torch.testing.assert_close(results["triton"].logits, results["torch"].logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(results["triton"].expert_counts, results["torch"].expert_counts, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# GPU only


# The GPU cases use LayerNorm without a gate scale, like bench_kernel.py, so the two share compiled kernels
# (Triton's cache is keyed by the constexprs): compilation, not running, is what costs time here.
GPU_SHAPES = [(768, 768, torch.bfloat16), (768, 768, torch.float16), (384, 384, torch.float16),
              (384, 384, torch.bfloat16), (600, 96, torch.bfloat16)]  # fmt: skip


@gpu
@needs_cuda
@pytest.mark.parametrize(("d", "d_e", "dtype"), GPU_SHAPES)
@pytest.mark.parametrize("T", [1, 100, 4096])
def test_gpu_every_candidate_config_matches_reference(T, d, d_e, dtype):
    """All tuning candidates compile and agree (register / shared-memory limits only show on a device),
    and so does the tuner's choice."""
    for config in [*candidate_configs(T, d, d_e, 4), None]:
        check_against_reference(T, d, d_e, 4, "empty-expert", dtype, True, config, seed=T)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_large_T(dtype):
    check_against_reference(65536, 768, 768, 4, "random", dtype, True)
    check_against_reference(16384, 384, 384, 4, "one-expert", dtype, True)


def _layer_inputs(T, d=768, d_e=768, E=4, dtype=torch.float16, seed=0):
    w = {k: v.to("cuda", dtype) for k, v in make_weights(E, d, d_e, seed).items()}
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, d, generator=g).to("cuda", dtype), torch.randint(E, (T,), generator=g).cuda(), w


@gpu
@needs_cuda
def test_gpu_no_host_synchronisation():
    """After the first call (which may tune), a layer issues no synchronising CUDA operation."""
    x, ids, w = _layer_inputs(2048)
    moe_ffn_triton(x, ids, **w)
    input_ids = torch.randint(1000, (2048,), device="cuda")
    table = torch.randint(4, (1000,), device="cuda")
    moe_ffn_triton_hashed(x, input_ids, table, **w)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moe_ffn_triton(x, ids, **w)
        moe_ffn_triton_hashed(x, input_ids, table, **w)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu
@needs_cuda
@pytest.mark.parametrize("T", [8, 2048])
def test_gpu_cuda_graph_capture_and_replay(T):
    """Capture one call in a CUDA graph, then replay it on new tokens and new routing written in place
    (with a gate scale for the few-token, split-d_e path)."""
    x, ids, w = _layer_inputs(T)
    scale = torch.rand(T, device="cuda") if T < 64 else None
    moe_ffn_triton(x, ids, **w, scale=scale)  # compile and tune outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        moe_ffn_triton(x, ids, **w, scale=scale)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = moe_ffn_triton(x, ids, **w, scale=scale)
    x.copy_(torch.randn_like(x))
    ids.copy_(torch.randint(4, (T,), device="cuda") * (torch.arange(T, device="cuda") % 3 != 0))  # expert 0 heavy
    if scale is not None:
        scale.copy_(torch.rand_like(scale))
    graph.replay()
    want = moe_ffn_reference(x.float(), ids, **{k: v.float() for k, v in w.items()}, scale=scale)
    torch.testing.assert_close(y.float(), want, **TOLERANCE[torch.float16])
