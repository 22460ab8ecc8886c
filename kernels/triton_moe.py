"""The fused Triton MoE FFN: routing, grouping, both GEMMs, the GELU and the residual + LayerNorm on the device.

Computes exactly `kernels.reference.moe_ffn_reference` (top-1 routing, exact erf GELU, optional gate scale,
optional per-expert LayerNorm of x + FFN(x)). Shapes:

    x [T, d] (fp16 / bf16 / fp32), expert_ids [T] int, W1 [E, d, d_e], b1 [E, d_e], W2 [E, d_e, d], b2 [E, d],
    ln_weight / ln_bias [E, d], scale [T] → y [T, d] in x's dtype.

One MoE layer is two tiny routing launches and one FFN launch, with no host synchronisation anywhere (so the
whole layer can be captured in a CUDA graph):

 1. `_count_kernel` (grid: token chunks). The expert of each token: expert_ids, or hash_table[input_ids] for
    hash routing (then written back, the model reports it), and a histogram per chunk: chunk_counts [C, E].
 2. `_align_kernel` (grid: token chunks). vLLM-style alignment: each expert gets a contiguous range of
    BLOCK_M-aligned slots in sorted_token_ids [max_blocks·BLOCK_M] (value T marks a padding slot), and
    block_expert [max_blocks] says which expert a block of BLOCK_M slots belongs to (-1: unused). The number
    of used blocks is data dependent, so the FFN grid is its upper bound cdiv(T, BLOCK_M) + E and unused
    programs return at once: that bound is what removes the host synchronisation. Tokens of one expert keep
    their order (a stable sort), and x is never copied: the FFN gathers rows by index and scatters results.
 3. `_moe_ffn_kernel` (grid: max_blocks × SPLIT_E). A program owns BLOCK_M token rows of one expert and
    loops over d_e in chunks of BLOCK_E:  h = gelu(x W1[:, chunk] + b1[chunk])  stays in registers and
    acc += h W2[chunk, :]  — the [T, d_e] intermediate never goes to global memory. The accumulator holds
    the full output row (d ≤ 1024) in NUM_N_TILES tiles of BLOCK_N columns, so the residual + LayerNorm
    epilogue runs in the same program; tiles of a power-of-two width instead of one tile of
    next_pow2(d) columns keep d = 768 from paying for 1024 (3 × 256 columns).
 4. Only when SPLIT_E > 1 (few tokens): SPLIT_E programs share a block's d_e range (no recomputation: GEMM 1
    needs only its own W1 columns), each writes its partial acc to an fp32 workspace [SPLIT_E, T, d], and
    `_epilogue_kernel` sums them and applies bias, scale, residual and LayerNorm. With a handful of tokens
    there are only ~E useful blocks, so without the split a few SMs would stream all the weights alone.
 5. The two-pass alternative (`FFNConfig.two_pass`, a tuning candidate for many tokens): the full-row
    accumulator of step 3 caps the row block (BLOCK_M × d fp32 in registers), and with d = 768 that costs
    tensor-core efficiency. Here `_grouped_gemm_kernel` runs twice as a plain tiled grouped GEMM over the
    same aligned slots (vLLM's fused_moe layout): h [slots, d_e] = gelu(x[tokens] W1[e] + b1[e]) goes to
    global memory in slot order, then partial [T, d] fp32 = h W2[e] is scattered back to token rows, and
    `_epilogue_kernel` adds b2, scale, residual and the LayerNorm. The extra traffic (h written and read
    once, the fp32 row once) is small next to 2 · T · d · d_e · 2 FLOPs once T is in the thousands.

Block sizes come from a small per-shape table (`candidate_configs`); on CUDA the first call per
(d, d_e, E, dtype, T bucket) times the candidates as CUDA-graph replays and keeps the fastest
(`MOEBERT_TRITON_TUNE=0`: table only; inside a CUDA-graph capture the choice already made is used, and
nothing is timed).
Accumulation is fp32 throughout; fp32 inputs use exact ("ieee") dots, not TF32, since fp32 is for checks.
Under the Triton interpreter (TRITON_INTERPRET=1, CPU) the same kernels run for the tests.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels._triton_interpret import make_triton_language_interpretable

make_triton_language_interpretable()  # TRITON_INTERPRET=1 set after `triton` was imported (see that module)

logger = logging.getLogger(__name__)

MAX_HIDDEN = 1024  # the full output row lives in registers: BERT-base / large widths, no more
MAX_N_TILES = 4  # accumulator tiles per row (acc0 … acc3 in the kernel)


# ----------------------------------------------------------------------------------------------------
# Routing: expert per token, histogram, aligned sorted slots


# Token counts are not specialised on (divisibility by 16, == 1): one compiled kernel serves every batch size.
@triton.jit(do_not_specialize=["T"])
def _count_kernel(
    expert_ids_ptr,  # [T] int: read, or written when HASH_ROUTING
    input_ids_ptr,  # [T] int (HASH_ROUTING only)
    hash_table_ptr,  # [vocab] int (HASH_ROUTING only)
    chunk_counts_ptr,  # [num_chunks, E_POW2] int32, out
    T,
    CHUNK: tl.constexpr,
    E_POW2: tl.constexpr,
    HASH_ROUTING: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    in_range = offs < T
    if HASH_ROUTING:
        token_id = tl.load(input_ids_ptr + offs, mask=in_range, other=0)
        expert = tl.load(hash_table_ptr + token_id, mask=in_range, other=0)
        tl.store(expert_ids_ptr + offs, expert, mask=in_range)
    else:
        expert = tl.load(expert_ids_ptr + offs, mask=in_range, other=0)
    one_hot = (expert[:, None] == tl.arange(0, E_POW2)[None, :]) & in_range[:, None]  # [CHUNK, E_POW2]
    tl.store(chunk_counts_ptr + pid * E_POW2 + tl.arange(0, E_POW2), tl.sum(one_hot.to(tl.int32), axis=0))


@triton.jit(do_not_specialize=["T", "num_chunks", "max_blocks"])
def _align_kernel(
    expert_ids_ptr,  # [T] int
    chunk_counts_ptr,  # [num_chunks, E_POW2] int32
    sorted_token_ids_ptr,  # [max_blocks * BLOCK_M] int32, out: token index per slot, T for padding
    block_expert_ptr,  # [max_blocks] int32, out: expert of each block of slots, -1 when unused
    T,
    num_chunks,
    max_blocks,
    CHUNK: tl.constexpr,
    CHUNKS_POW2: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCKS_PER_STEP: tl.constexpr,
):
    pid = tl.program_id(0)
    experts = tl.arange(0, E_POW2)
    chunk_rows = tl.arange(0, CHUNKS_POW2)
    # Every program re-derives the expert offsets from the (tiny) per-chunk histograms: cheaper than a third
    # launch. counts [CHUNKS_POW2, E_POW2]
    counts = tl.load(
        chunk_counts_ptr + chunk_rows[:, None] * E_POW2 + experts[None, :],
        mask=chunk_rows[:, None] < num_chunks,
        other=0,
    )
    total = tl.sum(counts, axis=0)  # [E_POW2] tokens per expert
    earlier = tl.sum(tl.where(chunk_rows[:, None] < pid, counts, 0), axis=0)  # [E_POW2] in chunks before mine
    padded = tl.cdiv(total, BLOCK_M) * BLOCK_M
    expert_start = tl.cumsum(padded, axis=0) - padded  # [E_POW2] first slot of each expert

    # My chunk's tokens go to expert_start + earlier + (rank among this chunk's tokens of the same expert).
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    in_range = offs < T
    expert = tl.load(expert_ids_ptr + offs, mask=in_range, other=0)
    one_hot = (expert[:, None] == experts[None, :]) & in_range[:, None]  # [CHUNK, E_POW2]
    running = tl.cumsum(one_hot.to(tl.int32), axis=0)  # inclusive count per expert down the chunk
    rank = tl.sum(tl.where(one_hot, running, 0), axis=1) - 1  # [CHUNK]
    base = tl.sum(tl.where(one_hot, (expert_start + earlier)[None, :], 0), axis=1)  # [CHUNK]
    tl.store(sorted_token_ids_ptr + base + rank, offs, mask=in_range)

    if pid == 0:
        # Padding slots (fewer than BLOCK_M per expert) read as token T, which the FFN masks out. They are
        # disjoint from the token slots above, so no ordering between programs is needed.
        pad = tl.arange(0, BLOCK_M)
        pad_slot = (expert_start + total)[:, None] + pad[None, :]  # [E_POW2, BLOCK_M]
        tl.store(sorted_token_ids_ptr + pad_slot, T, mask=pad[None, :] < (padded - total)[:, None])
        # Block b belongs to the number of experts whose slot range ends at or before its first slot.
        expert_end = expert_start + padded
        used_slots = tl.sum(padded, axis=0)
        for b0 in range(0, max_blocks, BLOCKS_PER_STEP):
            blocks = b0 + tl.arange(0, BLOCKS_PER_STEP)
            first_slot = blocks * BLOCK_M
            owner = tl.sum((expert_end[None, :] <= first_slot[:, None]).to(tl.int32), axis=1)
            owner = tl.where(first_slot < used_slots, owner, -1)
            tl.store(block_expert_ptr + blocks, owner, mask=blocks < max_blocks)


# ----------------------------------------------------------------------------------------------------
# The FFN


@triton.jit
def _gelu_erf(h):
    """Exact GELU, as BERT uses: 0.5 h (1 + erf(h / √2)). h fp32."""
    return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))


@triton.jit
def _block_expert(block_expert_ptr, pid_m, ROUTED: tl.constexpr):
    """The expert of block pid_m of aligned slots; -1 for a block beyond what this batch's routing needs
    (the caller returns at once). Without routing (one expert) every block is expert 0's."""
    if ROUTED:
        return tl.load(block_expert_ptr + pid_m)
    else:
        return 0


@triton.jit
def _block_tokens(sorted_token_ids_ptr, pid_m, T, BLOCK_M: tl.constexpr, ROUTED: tl.constexpr):
    """(row_mask [BLOCK_M], tokens [BLOCK_M] int64): the token of each slot of block pid_m (padding slots hold T,
    are masked and read row 0); without routing, tokens in order."""
    rows = tl.arange(0, BLOCK_M)
    if ROUTED:  # noqa: SIM108 - a constexpr branch: the slot buffer is only read when routing
        slot_token = tl.load(sorted_token_ids_ptr + pid_m * BLOCK_M + rows)
    else:
        slot_token = pid_m * BLOCK_M + rows
    row_mask = slot_token < T
    return row_mask, tl.where(row_mask, slot_token, 0).to(tl.int64)


@triton.jit
def _rows_times_expert(
    a_ptr, a_rows, row_mask, stride_am, w_expert_ptr, offs_n, n_mask, K, stride_wk, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """[BLOCK_M, BLOCK_N] fp32 = A[a_rows, :K] @ W[e][:K, offs_n], one expert's weights; masked rows, columns
    and the ragged end of K read as 0. GEMM 1 of the fused kernel, and both GEMMs of the two-pass path."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        a_tile = tl.load(
            a_ptr + a_rows[:, None] * stride_am + (k0 + offs_k)[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w_tile = tl.load(
            w_expert_ptr + (k0 + offs_k)[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=k_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(a_tile, w_tile, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _bias_gelu(acc, bias_ptr, expert, N, offs_n, n_mask):
    """gelu(acc + b1[e, offs_n]) in fp32: GEMM 1's epilogue. Masked columns are gelu(0) = 0."""
    acc += tl.load(bias_ptr + expert * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    return _gelu_erf(acc)


@triton.jit
def _gemm2_tile(
    acc, h, w2_expert_ptr, offs_e, e_mask, n0, d, stride_w2k, stride_w2n, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr
):
    """acc [BLOCK_M, BLOCK_N] += h [BLOCK_M, BLOCK_E] @ W2[e, chunk, n0 : n0 + BLOCK_N]"""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    w2 = tl.load(
        w2_expert_ptr + offs_e[:, None] * stride_w2k + offs_n[None, :] * stride_w2n,
        mask=e_mask[:, None] & (offs_n[None, :] < d),
        other=0.0,
    )
    return tl.dot(h, w2, acc, input_precision=PRECISION)


@triton.jit
def _pre_norm_tile(
    acc, tokens, row_mask, expert, n0, d, x_ptr, stride_xt, b2_ptr, token_scale,
    HAS_SCALE: tl.constexpr, HAS_LN: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The FFN output tile before LayerNorm: acc + b2, times the gate scale, plus the residual x when a
    LayerNorm follows. [BLOCK_M, BLOCK_N] fp32, zero in columns ≥ d (so row sums need no mask)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    col_mask = offs_n < d
    y = acc + tl.load(b2_ptr + expert * d + offs_n, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        y = y * token_scale[:, None]
    if HAS_LN:
        residual = tl.load(
            x_ptr + tokens[:, None] * stride_xt + offs_n[None, :],
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        y += residual.to(tl.float32)
    return tl.where(col_mask[None, :], y, 0.0)


@triton.jit
def _centered_sq_sum(z, mean, n0, d, BLOCK_N: tl.constexpr):
    """Σ over the tile's valid columns of (z - mean)² per row: [BLOCK_M]."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    centered = tl.where((offs_n < d)[None, :], z - mean[:, None], 0.0)
    return tl.sum(centered * centered, axis=1)


@triton.jit
def _store_tile(
    z, mean, rstd, tokens, row_mask, expert, n0, d, out_ptr, stride_ot, ln_w_ptr, ln_b_ptr,
    HAS_LN: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Normalise (when HAS_LN) and scatter the tile back to its tokens' rows of out."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    col_mask = offs_n < d
    if HAS_LN:
        ln_w = tl.load(ln_w_ptr + expert * d + offs_n, mask=col_mask, other=0.0).to(tl.float32)
        ln_b = tl.load(ln_b_ptr + expert * d + offs_n, mask=col_mask, other=0.0).to(tl.float32)
        z = (z - mean[:, None]) * rstd[:, None] * ln_w[None, :] + ln_b[None, :]
    tl.store(
        out_ptr + tokens[:, None] * stride_ot + offs_n[None, :],
        z.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


@triton.jit
def _store_partial(acc, tokens, row_mask, n0, d, partial_ptr, BLOCK_N: tl.constexpr):
    """partial [T, d] fp32 (this split's slice of the workspace) ← acc for the tile's tokens."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    tl.store(partial_ptr + tokens[:, None] * d + offs_n[None, :], acc, mask=row_mask[:, None] & (offs_n[None, :] < d))


@triton.jit(do_not_specialize=["T", "e_per_split"])
def _moe_ffn_kernel(
    x_ptr,  # [T, d], rows of stride_xt, unit column stride
    out_ptr,  # [T, d], rows of stride_ot (SPLIT_E == 1)
    partial_ptr,  # [SPLIT_E, T, d] fp32 workspace (SPLIT_E > 1)
    sorted_token_ids_ptr,  # [max_blocks * BLOCK_M] int32 (ROUTED)
    block_expert_ptr,  # [max_blocks] int32 (ROUTED)
    w1_ptr,  # [E, d, d_e]
    b1_ptr,  # [E, d_e] contiguous
    w2_ptr,  # [E, d_e, d]
    b2_ptr,  # [E, d] contiguous
    ln_w_ptr,  # [E, d] contiguous (HAS_LN)
    ln_b_ptr,  # [E, d] contiguous (HAS_LN)
    scale_ptr,  # [T] (HAS_SCALE)
    T,
    d,
    d_e,
    e_per_split,  # d_e columns per split, a multiple of BLOCK_E
    eps,
    stride_xt,
    stride_ot,
    stride_w1e,
    stride_w1k,
    stride_w1n,
    stride_w2e,
    stride_w2k,
    stride_w2n,
    BLOCK_M: tl.constexpr,  # token rows per program
    BLOCK_K: tl.constexpr,  # reduction chunk of GEMM 1 (over d)
    BLOCK_E: tl.constexpr,  # chunk of d_e: GEMM 1's N, GEMM 2's reduction
    BLOCK_N: tl.constexpr,  # output columns per accumulator tile
    NUM_N_TILES: tl.constexpr,  # 1..4 tiles cover d
    SPLIT_E: tl.constexpr,
    ROUTED: tl.constexpr,  # False: one expert, tokens in order (no routing buffers)
    HAS_SCALE: tl.constexpr,
    HAS_LN: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, "tf32" (ignored) for fp16 / bf16
):
    pid_m = tl.program_id(0)
    pid_split = tl.program_id(1)
    expert = _block_expert(block_expert_ptr, pid_m, ROUTED)
    if expert < 0:  # beyond the blocks this batch's routing needs
        return
    row_mask, tokens = _block_tokens(sorted_token_ids_ptr, pid_m, T, BLOCK_M, ROUTED)

    w1_expert_ptr = w1_ptr + expert * stride_w1e  # E · d · d_e < 2³¹: int32 offsets are enough
    w2_expert_ptr = w2_ptr + expert * stride_w2e
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    e_begin = pid_split * e_per_split
    e_end = tl.minimum(e_begin + e_per_split, d_e)
    for e0 in range(e_begin, e_end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        e_mask = offs_e < d_e
        # GEMM 1 for this chunk of d_e: h [BLOCK_M, BLOCK_E] = gelu(x[tokens] @ W1[e, :, chunk] + b1[e, chunk])
        h = _rows_times_expert(x_ptr, tokens, row_mask, stride_xt, w1_expert_ptr, offs_e, e_mask, d, stride_w1k,
                               stride_w1n, BLOCK_M, BLOCK_E, BLOCK_K, PRECISION)  # fmt: skip
        # Masked d_e columns are gelu(0) = 0 and meet zero rows of W2: they add nothing.
        h = _bias_gelu(h, b1_ptr, expert, d_e, offs_e, e_mask).to(w2_ptr.dtype.element_ty)
        # GEMM 2: acc [BLOCK_M, d] += h @ W2[e, chunk, :], one accumulator tile of BLOCK_N columns at a time
        acc0 = _gemm2_tile(acc0, h, w2_expert_ptr, offs_e, e_mask, 0, d, stride_w2k, stride_w2n, BLOCK_N, PRECISION)
        if NUM_N_TILES > 1:
            acc1 = _gemm2_tile(
                acc1, h, w2_expert_ptr, offs_e, e_mask, BLOCK_N, d, stride_w2k, stride_w2n, BLOCK_N, PRECISION
            )
        if NUM_N_TILES > 2:
            acc2 = _gemm2_tile(
                acc2, h, w2_expert_ptr, offs_e, e_mask, 2 * BLOCK_N, d, stride_w2k, stride_w2n, BLOCK_N, PRECISION
            )
        if NUM_N_TILES > 3:
            acc3 = _gemm2_tile(
                acc3, h, w2_expert_ptr, offs_e, e_mask, 3 * BLOCK_N, d, stride_w2k, stride_w2n, BLOCK_N, PRECISION
            )

    if SPLIT_E > 1:  # partial sums only; _epilogue_kernel finishes the rows
        split_ptr = partial_ptr + pid_split.to(tl.int64) * T * d
        _store_partial(acc0, tokens, row_mask, 0, d, split_ptr, BLOCK_N)
        if NUM_N_TILES > 1:
            _store_partial(acc1, tokens, row_mask, BLOCK_N, d, split_ptr, BLOCK_N)
        if NUM_N_TILES > 2:
            _store_partial(acc2, tokens, row_mask, 2 * BLOCK_N, d, split_ptr, BLOCK_N)
        if NUM_N_TILES > 3:
            _store_partial(acc3, tokens, row_mask, 3 * BLOCK_N, d, split_ptr, BLOCK_N)
    else:
        token_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if HAS_SCALE:
            token_scale = tl.load(scale_ptr + tokens, mask=row_mask, other=0.0).to(tl.float32)
        z0 = _pre_norm_tile(acc0, tokens, row_mask, expert, 0, d, x_ptr, stride_xt, b2_ptr, token_scale,
                            HAS_SCALE, HAS_LN, BLOCK_N)  # fmt: skip
        z1 = z0
        z2 = z0
        z3 = z0
        row_sum = tl.sum(z0, axis=1)
        if NUM_N_TILES > 1:
            z1 = _pre_norm_tile(acc1, tokens, row_mask, expert, BLOCK_N, d, x_ptr, stride_xt, b2_ptr,
                                token_scale, HAS_SCALE, HAS_LN, BLOCK_N)  # fmt: skip
            row_sum += tl.sum(z1, axis=1)
        if NUM_N_TILES > 2:
            z2 = _pre_norm_tile(acc2, tokens, row_mask, expert, 2 * BLOCK_N, d, x_ptr, stride_xt, b2_ptr,
                                token_scale, HAS_SCALE, HAS_LN, BLOCK_N)  # fmt: skip
            row_sum += tl.sum(z2, axis=1)
        if NUM_N_TILES > 3:
            z3 = _pre_norm_tile(acc3, tokens, row_mask, expert, 3 * BLOCK_N, d, x_ptr, stride_xt, b2_ptr,
                                token_scale, HAS_SCALE, HAS_LN, BLOCK_N)  # fmt: skip
            row_sum += tl.sum(z3, axis=1)
        mean = row_sum / d
        rstd = mean
        if HAS_LN:  # two-pass variance over the row held in registers: no cancellation, no extra traffic
            sq_sum = _centered_sq_sum(z0, mean, 0, d, BLOCK_N)
            if NUM_N_TILES > 1:
                sq_sum += _centered_sq_sum(z1, mean, BLOCK_N, d, BLOCK_N)
            if NUM_N_TILES > 2:
                sq_sum += _centered_sq_sum(z2, mean, 2 * BLOCK_N, d, BLOCK_N)
            if NUM_N_TILES > 3:
                sq_sum += _centered_sq_sum(z3, mean, 3 * BLOCK_N, d, BLOCK_N)
            rstd = 1.0 / tl.sqrt(sq_sum / d + eps)
        _store_tile(z0, mean, rstd, tokens, row_mask, expert, 0, d, out_ptr, stride_ot, ln_w_ptr, ln_b_ptr,
                    HAS_LN, BLOCK_N)  # fmt: skip
        if NUM_N_TILES > 1:
            _store_tile(z1, mean, rstd, tokens, row_mask, expert, BLOCK_N, d, out_ptr, stride_ot, ln_w_ptr,
                        ln_b_ptr, HAS_LN, BLOCK_N)  # fmt: skip
        if NUM_N_TILES > 2:
            _store_tile(z2, mean, rstd, tokens, row_mask, expert, 2 * BLOCK_N, d, out_ptr, stride_ot, ln_w_ptr,
                        ln_b_ptr, HAS_LN, BLOCK_N)  # fmt: skip
        if NUM_N_TILES > 3:
            _store_tile(z3, mean, rstd, tokens, row_mask, expert, 3 * BLOCK_N, d, out_ptr, stride_ot, ln_w_ptr,
                        ln_b_ptr, HAS_LN, BLOCK_N)  # fmt: skip


@triton.jit(do_not_specialize=["T"])
def _grouped_gemm_kernel(
    a_ptr,  # GEMM 1: x [T, K] (rows gathered by token) | GEMM 2: h [slots, K] (rows in slot order)
    c_ptr,  # GEMM 1: h [slots, N] (rows in slot order) | GEMM 2: partial [T, N] fp32 (rows scattered by token)
    w_ptr,  # [E, K, N]
    bias_ptr,  # [E, N] contiguous (BIAS_GELU only)
    sorted_token_ids_ptr,  # [max_blocks * BLOCK_M] int32 (ROUTED)
    block_expert_ptr,  # [max_blocks] int32 (ROUTED)
    T,
    N,
    K,
    stride_am,
    stride_cm,
    stride_we,
    stride_wk,
    stride_wn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    A_BY_TOKEN: tl.constexpr,  # True: A rows are tokens and C rows slots (GEMM 1); False: the reverse (GEMM 2)
    BIAS_GELU: tl.constexpr,  # epilogue gelu(acc + bias) (GEMM 1) or the raw fp32 acc (GEMM 2)
    ROUTED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of C = A[rows] @ W[e] for the BLOCK_M slots of one expert (two-pass path).
    Programs are numbered N-tile fastest, so the programs that share a block's A rows run together."""
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    expert = _block_expert(block_expert_ptr, pid_m, ROUTED)
    if expert < 0:  # beyond the blocks this batch's routing needs
        return
    row_mask, tokens = _block_tokens(sorted_token_ids_ptr, pid_m, T, BLOCK_M, ROUTED)
    slots = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    if A_BY_TOKEN:
        a_rows = tokens
        c_rows = slots
    else:
        a_rows = slots
        c_rows = tokens

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_expert_ptr = w_ptr + expert * stride_we  # E · K · N < 2³¹: int32 offsets are enough
    acc = _rows_times_expert(a_ptr, a_rows, row_mask, stride_am, w_expert_ptr, offs_n, n_mask, K, stride_wk, stride_wn,
                             BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)  # fmt: skip
    if BIAS_GELU:
        acc = _bias_gelu(acc, bias_ptr, expert, N, offs_n, n_mask)
    tl.store(
        c_ptr + c_rows[:, None] * stride_cm + offs_n[None, :],
        acc.to(c_ptr.dtype.element_ty),
        mask=row_mask[:, None] & n_mask[None, :],
    )


@triton.jit(do_not_specialize=["T"])
def _epilogue_kernel(
    partial_ptr,  # [SPLIT_E, T, d] fp32
    expert_ids_ptr,  # [T] int (ROUTED)
    x_ptr,
    out_ptr,
    b2_ptr,
    ln_w_ptr,
    ln_b_ptr,
    scale_ptr,
    T,
    d,
    eps,
    stride_xt,
    stride_ot,
    SPLIT_E: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next_pow2(d): this pass is memory-bound, the padding costs no FLOPs worth counting
    ROUTED: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_LN: tl.constexpr,
):
    """After a split-d_e FFN: y = Σ_splits partial (+ b2, · scale, + x, LayerNorm) for BLOCK_ROWS tokens
    (in token order: no routing structures needed, each row reads its own expert's vectors)."""
    tokens = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = tokens < T
    tokens = tl.where(row_mask, tokens, 0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (offs_n < d)[None, :]
    acc = tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=tl.float32)
    for s in range(SPLIT_E):
        acc += tl.load(partial_ptr + (s * T + tokens)[:, None] * d + offs_n[None, :], mask=mask, other=0.0)
    expert = tl.zeros((BLOCK_ROWS,), dtype=tl.int64)
    if ROUTED:
        expert = tl.load(expert_ids_ptr + tokens, mask=row_mask, other=0).to(tl.int64)
    vector_offs = expert[:, None] * d + offs_n[None, :]  # [BLOCK_ROWS, BLOCK_D] into [E, d] vectors
    y = acc + tl.load(b2_ptr + vector_offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + tokens, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    if HAS_LN:
        y += tl.load(x_ptr + tokens[:, None] * stride_xt + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.where(mask, y, 0.0)
        mean = tl.sum(y, axis=1) / d
        centered = tl.where(mask, y - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / d + eps)
        ln_w = tl.load(ln_w_ptr + vector_offs, mask=mask, other=0.0).to(tl.float32)
        ln_b = tl.load(ln_b_ptr + vector_offs, mask=mask, other=0.0).to(tl.float32)
        y = centered * rstd[:, None] * ln_w + ln_b
    tl.store(out_ptr + tokens[:, None] * stride_ot + offs_n[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Configurations


@dataclass(frozen=True)
class FFNConfig:
    """Launch parameters. block_m, block_k, block_e ≥ 16 (tensor-core tiles).

    Fused path (`_moe_ffn_kernel`): block_e is the chunk of d_e kept in registers, split_e the programs that
    share a block's d_e range. Two-pass path (`two_pass`, split_e = 1): block_e is the N tile of both grouped
    GEMMs (d_e columns of h, then d columns of the output)."""

    block_m: int
    block_k: int
    block_e: int
    split_e: int = 1
    num_warps: int = 4
    num_stages: int = 2
    two_pass: bool = False

    def __post_init__(self) -> None:
        if self.two_pass and self.split_e != 1:
            raise ValueError("the two-pass path does not split d_e (split_e must be 1)")

    def short(self) -> str:
        """e.g. 'fused 64x64x32 split 1 w8 s3' or 'two-pass 128x64x128 w8 s4' (block_m x block_k x block_e)."""
        path = "two-pass" if self.two_pass else "fused"
        split = "" if self.two_pass else f" split {self.split_e}"
        return f"{path} {self.block_m}x{self.block_k}x{self.block_e}{split} w{self.num_warps} s{self.num_stages}"


def n_tiling(d: int) -> tuple[int, int]:
    """(BLOCK_N, NUM_N_TILES): the narrowest power-of-two tile with at most MAX_N_TILES tiles covering d.
    768 → 3 × 256, 384 → 3 × 128, 600 → 3 × 256, 1024 → 4 × 256."""
    block_n = 16
    while triton.cdiv(d, block_n) > MAX_N_TILES:
        block_n *= 2
    return block_n, triton.cdiv(d, block_n)


def _clamp_split(split_e: int, d_e: int, block_e: int) -> tuple[int, int]:
    """(splits, d_e columns per split) with no empty split: every split writes its workspace slice."""
    chunks = triton.cdiv(d_e, block_e)
    per_split = triton.cdiv(chunks, max(1, min(split_e, chunks)))
    return triton.cdiv(chunks, per_split), per_split * block_e


def candidate_configs(T: int, d: int, d_e: int, num_experts: int) -> list[FFNConfig]:
    """The small table the tuner chooses from, by token count; the first entry is the untuned default.

    Few tokens: 16-row blocks and the d_e range split over many programs, so all SMs stream the weights.
    Many tokens: the largest row block whose full-row fp32 accumulator (block_m × d) still fits in registers
    (≈ 96-192 registers a thread), fused epilogue, no split; and the two-pass grouped GEMMs.
    1024 < T ≤ 4096 adds smaller tiles and a 4-way d_e split (split-K of GEMM 2): with ~1k rows per expert,
    128-row tiles make too few programs to fill the SMs of a large GPU.
    """
    acc_floats_per_thread = lambda block_m, warps: block_m * n_tiling(d)[0] * n_tiling(d)[1] // (32 * warps)
    chunks_32 = triton.cdiv(d_e, 32)
    rows_per_expert = triton.cdiv(T, num_experts)
    if T <= 64:
        return [
            FFNConfig(16, 64, 32, split_e=min(chunks_32, 32), num_warps=4, num_stages=3),
            FFNConfig(16, 128, 32, split_e=min(chunks_32, 16), num_warps=4, num_stages=3),
            FFNConfig(16, 64, 64, split_e=min(triton.cdiv(d_e, 64), 16), num_warps=4, num_stages=3),
            FFNConfig(16, 64, 32, split_e=min(chunks_32, 8), num_warps=4, num_stages=2),
        ]
    if T <= 1024:
        configs = [
            FFNConfig(32, 64, 32, split_e=8, num_warps=4, num_stages=3),
            FFNConfig(32, 64, 32, split_e=4, num_warps=4, num_stages=3),
            FFNConfig(64, 64, 32, split_e=8, num_warps=8, num_stages=3),
            FFNConfig(16, 64, 32, split_e=8, num_warps=4, num_stages=3),
            FFNConfig(64, 64, 32, split_e=1, num_warps=8, num_stages=3),
        ]
        if rows_per_expert <= 32:
            configs.insert(0, FFNConfig(16, 64, 32, split_e=16, num_warps=4, num_stages=3))
        configs.append(FFNConfig(64, 64, 64, num_warps=4, num_stages=4, two_pass=True))
        return configs
    if T <= 4096:  # ~1k rows per expert: 128-row tiles leave SMs idle, so smaller tiles and split d_e (split-K)
        mid_configs = [
            FFNConfig(64, 64, 32, split_e=4, num_warps=8, num_stages=3),
            FFNConfig(32, 64, 32, split_e=4, num_warps=4, num_stages=3),
            FFNConfig(64, 64, 64, num_warps=4, num_stages=4, two_pass=True),
            FFNConfig(32, 64, 64, num_warps=4, num_stages=4, two_pass=True),
        ]
    else:
        mid_configs = []
    configs = [
        FFNConfig(64, 64, 32, num_warps=8, num_stages=3),
        FFNConfig(64, 64, 64, num_warps=8, num_stages=2),
        FFNConfig(64, 64, 32, num_warps=16, num_stages=3),  # half the accumulator registers per thread
        FFNConfig(32, 64, 64, num_warps=8, num_stages=3),
        FFNConfig(64, 64, 32, split_e=2, num_warps=8, num_stages=3),
        # two-pass tiled GEMMs: the row block is no longer capped by a full-row accumulator
        FFNConfig(128, 64, 128, num_warps=8, num_stages=4, two_pass=True),
        FFNConfig(64, 64, 128, num_warps=4, num_stages=4, two_pass=True),
        FFNConfig(128, 64, 256, num_warps=8, num_stages=3, two_pass=True),
        *mid_configs,
    ]
    if acc_floats_per_thread(128, 8) <= 128:  # d ≤ 512 (MiniLM): twice the rows per weight load
        configs.insert(0, FFNConfig(128, 64, 32, num_warps=8, num_stages=3))
    return configs


_TUNED: dict[tuple, FFNConfig] = {}


def _tuning_enabled(x: torch.Tensor) -> bool:
    if x.device.type != "cuda" or os.environ.get("MOEBERT_TRITON_TUNE", "1") == "0":
        return False
    return not torch.cuda.is_current_stream_capturing()  # no timing inside a CUDA-graph capture


def _tuning_key(x, T, d, d_e, num_experts, has_ln, has_scale) -> tuple:
    return (x.device.index, x.dtype, d, d_e, num_experts, has_ln, has_scale, triton.next_power_of_2(T))


# ----------------------------------------------------------------------------------------------------
# Entry points


def moe_ffn_triton(
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
    config: FFNConfig | None = None,
) -> torch.Tensor:
    """Top-1 MoE FFN (see the module docstring). x [T, d], expert_ids [T] → y [T, d] in x's dtype.

    expert_ids must lie in [0, E) (not checked: a check would synchronise with the host). `config` pins the
    launch parameters (tests); by default they come from the table, tuned on CUDA.
    """
    y, _ = _moe_ffn(x, expert_ids, None, None, fc1_weight, fc1_bias, fc2_weight, fc2_bias, ln_weight, ln_bias,
                    scale, eps, config)  # fmt: skip
    return y


def moe_ffn_triton_hashed(
    x: torch.Tensor,
    input_ids: torch.Tensor,
    hash_table: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    eps: float = 1e-12,
    config: FFNConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hash routing inside the routing kernel: expert = hash_table[input_ids]. x [T, d], input_ids [T],
    hash_table [vocab] → (y [T, d], expert_ids [T] int64, the routing the model reports)."""
    return _moe_ffn(x, None, input_ids, hash_table, fc1_weight, fc1_bias, fc2_weight, fc2_bias, ln_weight,
                    ln_bias, None, eps, config)  # fmt: skip


def _check_inputs(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, ln_weight, ln_bias, scale) -> None:
    num_experts, d, d_e = fc1_weight.shape
    if x.dim() != 2 or x.shape[1] != d:
        raise ValueError(f"x must be [T, {d}], got {tuple(x.shape)}")
    expected = {"fc1_bias": (num_experts, d_e), "fc2_weight": (num_experts, d_e, d), "fc2_bias": (num_experts, d)}
    given = {"fc1_bias": fc1_bias, "fc2_weight": fc2_weight, "fc2_bias": fc2_bias}
    if ln_weight is not None:
        expected |= {"ln_weight": (num_experts, d), "ln_bias": (num_experts, d)}
        given |= {"ln_weight": ln_weight, "ln_bias": ln_bias}
    for name, tensor in given.items():
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{name} must be {list(expected[name])}, got {list(tensor.shape)}")
    if fc1_weight.dtype != x.dtype or fc2_weight.dtype != x.dtype:
        raise ValueError(f"x ({x.dtype}) and the expert weights ({fc1_weight.dtype}) must share a dtype")
    if scale is not None and tuple(scale.shape) != (x.shape[0],):
        raise ValueError(f"scale must be [{x.shape[0]}], got {list(scale.shape)}")
    if d > MAX_HIDDEN:
        raise ValueError(f"the fused Triton MoE FFN keeps a full row in registers: d ≤ {MAX_HIDDEN}, got {d}")


def _moe_ffn(x, expert_ids, input_ids, hash_table, fc1_weight, fc1_bias, fc2_weight, fc2_bias, ln_weight, ln_bias,
             scale, eps, config):  # fmt: skip
    _check_inputs(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, ln_weight, ln_bias, scale)
    num_experts, d, d_e = fc1_weight.shape
    T = x.shape[0]
    hash_routing = expert_ids is None
    if hash_routing:
        expert_ids = torch.empty(T, dtype=torch.long, device=x.device)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if T == 0:
        return out, expert_ids
    x = x if x.stride(1) == 1 else x.contiguous()
    has_ln, has_scale = ln_weight is not None, scale is not None
    fc1_bias, fc2_bias = fc1_bias.contiguous(), fc2_bias.contiguous()
    if has_ln:
        ln_weight, ln_bias = ln_weight.contiguous(), ln_bias.contiguous()
    if has_scale:
        scale = scale.contiguous()
    args = (x, out, expert_ids, input_ids, hash_table, fc1_weight, fc1_bias, fc2_weight, fc2_bias, ln_weight,
            ln_bias, scale, eps, hash_routing)  # fmt: skip

    if config is None:
        candidates = candidate_configs(T, d, d_e, num_experts)
        key = _tuning_key(x, T, d, d_e, num_experts, has_ln, has_scale)
        if _tuning_enabled(x) and key not in _TUNED:
            _TUNED[key] = _tune(candidates, args)
        config = _TUNED.get(key, candidates[0])  # in a CUDA-graph capture: the choice made before it
    _launch(config, *args)
    return out, expert_ids


def _time_ms(fn) -> tuple[float, str]:
    """(ms per call, how it was timed) of fn: as a CUDA-graph replay, the way a server that captures graphs runs
    it (eager timing at small T measures the host's launch overhead and chooses by its noise), falling back
    to eager timing where the launch cannot be captured. Raises when fn cannot run at all."""
    from triton import testing

    # do_bench_cudagraph runs fn on a new stream that does not wait for the current one: finish the work that
    # produces fn's inputs first (once per tuning key, never inside a capture, where nothing is tuned).
    torch.cuda.synchronize()
    try:
        return testing.do_bench_cudagraph(fn, rep=10), "graph"
    except Exception:  # noqa: BLE001 - not capturable here: time it eagerly (which raises if it cannot run)
        return testing.do_bench(fn, warmup=5, rep=25), "eager"


def _tune(candidates: list[FFNConfig], args: tuple) -> FFNConfig:
    """The fastest candidate on these very inputs (the kernels are pure: rerunning them is harmless)."""
    timings, modes = {}, set()
    for config in candidates:
        try:
            timings[config], mode = _time_ms(lambda config=config: _launch(config, *args))
        except Exception:  # noqa: BLE001 - e.g. out of shared memory for this shape: not a candidate
            continue
        modes.add(mode)
    if not timings:
        raise RuntimeError("no Triton MoE FFN configuration could run on this device")
    best = min(timings, key=timings.get)
    x, fc1_weight = args[0], args[5]
    logger.info(
        "tuned the Triton MoE FFN for T=%d, [E, d, d_e]=%s, %s, timed as %s: %s (of %s)", x.shape[0],
        list(fc1_weight.shape), x.dtype, "/".join(sorted(modes)), best.short(),
        ", ".join(f"{c.short()} {ms * 1e3:.0f}µs" for c, ms in timings.items()),
    )  # fmt: skip
    return best


def _launch(config: FFNConfig, x, out, expert_ids, input_ids, hash_table, fc1_weight, fc1_bias, fc2_weight,
            fc2_bias, ln_weight, ln_bias, scale, eps, hash_routing) -> None:  # fmt: skip
    num_experts, d, d_e = fc1_weight.shape
    T = x.shape[0]
    device = x.device
    block_m = config.block_m
    routed = num_experts > 1
    if routed:
        e_pow2 = max(2, triton.next_power_of_2(num_experts))
        chunk = max(16, min(1024, 8192 // e_pow2, triton.next_power_of_2(T)))
        num_chunks = triton.cdiv(T, chunk)
        max_blocks = triton.cdiv(T, block_m) + num_experts  # Σ_e cdiv(n_e, BLOCK_M) never exceeds this
        chunk_counts = torch.empty(num_chunks, e_pow2, dtype=torch.int32, device=device)
        sorted_token_ids = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
        block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
        _count_kernel[(num_chunks,)](
            expert_ids, input_ids if hash_routing else expert_ids, hash_table if hash_routing else expert_ids,
            chunk_counts, T, CHUNK=chunk, E_POW2=e_pow2, HASH_ROUTING=hash_routing,
        )  # fmt: skip
        _align_kernel[(num_chunks,)](
            expert_ids, chunk_counts, sorted_token_ids, block_expert, T, num_chunks, max_blocks,
            CHUNK=chunk, CHUNKS_POW2=max(2, triton.next_power_of_2(num_chunks)), E_POW2=e_pow2, BLOCK_M=block_m,
            BLOCKS_PER_STEP=min(1024, max(16, triton.next_power_of_2(max_blocks))),
        )  # fmt: skip
    else:  # one expert (a pruned dense FFN): tokens in order, no routing work
        if hash_routing:
            expert_ids.zero_()
        max_blocks = triton.cdiv(T, block_m)
        sorted_token_ids = block_expert = expert_ids  # unused placeholders

    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    has_ln, has_scale = ln_weight is not None, scale is not None
    if not has_ln:  # placeholders for pointers the kernels never read
        ln_weight = ln_bias = fc2_bias
    if not has_scale:
        scale = fc2_bias
    if config.two_pass:
        # h [slots, d_e] in x's dtype (GEMM 2's input precision, as in the fused path), slot order
        h = torch.empty(max_blocks * block_m, d_e, dtype=x.dtype, device=device)
        partial = torch.empty(1, T, d, dtype=torch.float32, device=device)
        for a, c, w, n, k, a_by_token in ((x, h, fc1_weight, d_e, d, True), (h, partial[0], fc2_weight, d, d_e, False)):
            _grouped_gemm_kernel[(max_blocks * triton.cdiv(n, config.block_e),)](
                a, c, w, fc1_bias, sorted_token_ids, block_expert, T, n, k, a.stride(0), c.stride(0), *w.stride(),
                BLOCK_M=block_m, BLOCK_N=config.block_e, BLOCK_K=config.block_k, A_BY_TOKEN=a_by_token,
                BIAS_GELU=a_by_token, ROUTED=routed, PRECISION=precision,
                num_warps=config.num_warps, num_stages=config.num_stages,
            )  # fmt: skip
        split_e = 1
    else:
        split_e, e_per_split = _clamp_split(config.split_e, d_e, config.block_e)
        partial = torch.empty(split_e, T, d, dtype=torch.float32, device=device) if split_e > 1 else out
        block_n, num_n_tiles = n_tiling(d)
        _moe_ffn_kernel[(max_blocks, split_e)](
            x, out, partial, sorted_token_ids, block_expert, fc1_weight, fc1_bias, fc2_weight, fc2_bias, ln_weight,
            ln_bias, scale, T, d, d_e, e_per_split, eps, x.stride(0), out.stride(0), *fc1_weight.stride(),
            *fc2_weight.stride(),
            BLOCK_M=block_m, BLOCK_K=config.block_k, BLOCK_E=config.block_e, BLOCK_N=block_n,
            NUM_N_TILES=num_n_tiles, SPLIT_E=split_e, ROUTED=routed, HAS_SCALE=has_scale, HAS_LN=has_ln,
            PRECISION=precision, num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip
        if split_e == 1:  # the fused epilogue already wrote out
            return
    block_d = triton.next_power_of_2(d)
    block_rows = max(1, min(16, 4096 // block_d))
    _epilogue_kernel[(triton.cdiv(T, block_rows),)](
        partial, expert_ids, x, out, fc2_bias, ln_weight, ln_bias, scale, T, d, eps, x.stride(0), out.stride(0),
        SPLIT_E=split_e, BLOCK_ROWS=block_rows, BLOCK_D=block_d, ROUTED=routed, HAS_SCALE=has_scale,
        HAS_LN=has_ln, num_warps=4,
    )  # fmt: skip


__all__ = ["FFNConfig", "candidate_configs", "moe_ffn_triton", "moe_ffn_triton_hashed", "n_tiling"]
