"""How much of each model's time is its FFN, on the torch backends: the ceiling on MoEBERT's speed-up.

MoEBERT shrinks only the FFN (one expert of width d_e per token instead of the dense FFN), so if the dense
model spends a share f of its time in its FFNs, MoE/dense <= 1 / (1 - f) however cheap the experts are.
For ONNX Runtime graphs the per-op profiler says this (benchmarks/onnx_profile.py). Here it is measured on
the torch backends by wall clock: each model runs as it is and with its FFNs taken out (every layer's FFN
returns its input: the dense layer keeps only a GELU over the [N, d] attention output, ~1/4 of its own),
every variant timed once per repeat, in turn, so machine noise hits all alike.

A second table times the FFN's matrix products alone, on the models' own weights, layer by layer: the dense
FFN's two GEMMs (+ GELU) on N tokens against each expert's two GEMMs on the tokens its hash table routes
there. Where the expert GEMMs cost what the dense ones do, the FFN is bound by reading its weights (every
expert receives tokens, so the MoE reads as many weight bytes as the dense FFN), not by its FLOPs.

    python benchmarks/ffn_share.py --dense DIR --moe DIR --dtypes float32 bfloat16 --shapes 1x128 16x24 32x128

Writes benchmarks/results/<--name>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from results_files import pyplot, write_results

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@contextlib.contextmanager
def without_ffn(model):
    """Every layer's FFN returns its input while inside: y = attention output, no routing, no experts."""
    import torch.nn as nn

    class NoMoE(nn.Module):
        def forward(self, x, layout):  # x [N, d] → (x, no routing)
            return x, None

    class NoOutput(nn.Module):
        def forward(self, h, residual):  # the dense FFN's second matmul + LayerNorm, skipped
            return residual

    saved = []
    for layer in model.base_model.encoder.layer:
        if layer.moe is not None:
            saved.append((layer, "moe", layer.moe))
            layer.moe = NoMoE()
        else:
            saved += [(layer.intermediate, "dense", layer.intermediate.dense), (layer, "output", layer.output)]
            layer.intermediate.dense, layer.output = nn.Identity(), NoOutput()
    try:
        yield
    finally:
        for owner, name, module in saved:
            setattr(owner, name, module)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", required=True, help="dense classifier checkpoint (e.g. bench_backends.py's)")
    p.add_argument("--moe", required=True, help="its MoEBERT conversion")
    p.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"],
                   help="torch weight dtypes to time (bfloat16: the server's torch-bf16 backend)")  # fmt: skip
    p.add_argument("--shapes", nargs="+", default=["1x128", "16x24", "32x128"], help="BATCHxTOKENS shapes")
    p.add_argument(
        "--gemm-tokens",
        nargs="+",
        type=int,
        default=[128, 384, 1024, 4096],
        help="token counts for the GEMM-only table (default 128 384 1024 4096)",
    )
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1, the server's on 2 cores)")
    p.add_argument("--repeats", type=int, default=15, help="timed runs per cell (median); ×4 at batch 1")
    p.add_argument("--name", default="ffn_share", help="results file stem (default ffn_share)")
    p.add_argument("--note", default="", help="a line for the results file (e.g. what else ran on the machine)")
    args = p.parse_args()

    from server.backends import TorchBackend

    runners = {(dt, m): TorchBackend(path, threads=args.threads, dtype=dt)
               for dt in args.dtypes for m, path in (("dense", args.dense), ("moe", args.moe))}  # fmt: skip
    rng = np.random.default_rng(0)
    rows = []
    for shape in args.shapes:
        batch, tokens = (int(x) for x in shape.lower().split("x"))
        ids = rng.integers(1000, 20000, (batch, tokens)).astype(np.int64)  # [B, T]
        inputs = (ids, np.ones_like(ids), np.zeros_like(ids))
        cells = [(key, ffn) for key in runners for ffn in (True, False)]
        times = {cell: [] for cell in cells}

        def run(cell, inputs=inputs) -> float:
            (key, ffn) = cell
            runner = runners[key]
            with contextlib.nullcontext() if ffn else without_ffn(runner.model):
                start = time.perf_counter()
                runner.run(*inputs)
                return time.perf_counter() - start

        for cell in cells:  # warm-up
            run(cell), run(cell)
        for _ in range(args.repeats * (4 if batch == 1 else 1)):
            for cell in cells:
                times[cell].append(run(cell))
        ms = {cell: 1000 * statistics.median(t) for cell, t in times.items()}
        for dt in args.dtypes:
            dense, dense_rest = ms[((dt, "dense"), True)], ms[((dt, "dense"), False)]
            moe, moe_rest = ms[((dt, "moe"), True)], ms[((dt, "moe"), False)]
            share = (dense - dense_rest) / dense
            row = {"dtype": dt, "batch": batch, "tokens": tokens, "dense_ms": dense, "dense_no_ffn_ms": dense_rest,
                   "moe_ms": moe, "moe_no_ffn_ms": moe_rest, "dense_ffn_ms": dense - dense_rest,
                   "moe_ffn_ms": moe - moe_rest, "dense_ffn_share": share, "bound": 1 / (1 - share),
                   "speedup": dense / moe}  # fmt: skip
            rows.append(row)
            print(f"{shape:>7} {dt:<9} dense {dense:7.1f} (FFN {share:4.0%}) moe {moe:7.1f}  "
                  f"{row['speedup']:.2f}× (bound {row['bound']:.2f}×)", flush=True)  # fmt: skip
    gemms = [gemm_floor(runners[(dt, "dense")].model, runners[(dt, "moe")].model, n, args.repeats, rng)
             for dt in args.dtypes for n in args.gemm_tokens]  # fmt: skip
    write(rows, gemms, args)


def gemm_floor(dense, moe, tokens: int, repeats: int, rng) -> dict:
    """µs per layer of the dense FFN's GEMMs + GELU on `tokens` rows vs the MoE's expert GEMMs + GELU on the
    rows each expert is routed (hash tables of the model, random ids), summed over the layers / layers."""
    import torch
    import torch.nn.functional as F

    dtype = next(dense.parameters()).dtype
    x = torch.randn(tokens, dense.config.hidden_size).to(dtype)  # [N, d]
    ids = torch.from_numpy(rng.integers(1000, 20000, tokens))
    dense_layers = list(dense.base_model.encoder.layer)
    experts = [(m, torch.bincount(m.router.table[ids], minlength=m.fc1_weight.shape[0]).tolist())
               for m in (layer.moe for layer in moe.base_model.encoder.layer)]  # fmt: skip

    def dense_gemms():
        for layer in dense_layers:
            layer.output.dense(F.gelu(layer.intermediate.dense(x)))

    def expert_gemms():
        for m, counts in experts:
            for e, n in enumerate(counts):
                torch.addmm(m.fc2_bias[e], F.gelu(torch.addmm(m.fc1_bias[e], x[:n], m.fc1_weight[e])), m.fc2_weight[e])

    times = {"dense": [], "moe": []}
    with torch.inference_mode():
        for fn in (dense_gemms, expert_gemms):
            fn(), fn()
        for _ in range(repeats * 2):
            for key, fn in (("dense", dense_gemms), ("moe", expert_gemms)):
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    us = {key: 1e6 * statistics.median(t) / len(dense_layers) for key, t in times.items()}
    row = {"dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "dense_gemm_us": us["dense"],
           "moe_gemm_us": us["moe"], "rows_per_expert": experts[0][1]}  # fmt: skip
    print(f"GEMMs {row['dtype']:<9} {tokens:>5} tokens: dense {us['dense']:7.0f} µs/layer, experts {us['moe']:7.0f}")
    return row


def write(rows: list[dict], gemms: list[dict], args) -> None:
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    env = (f"{os.cpu_count()} cores ({platform.machine()}, torch CPU capability {capability}), "
           f"torch {torch.__version__}, {args.threads} threads")  # fmt: skip
    lines = [
        "# Where the time goes on the torch backends: the dense FFN's share and MoEBERT's ceiling",
        "",
        f"`python benchmarks/ffn_share.py {' '.join(sys.argv[1:])}`",
        "",
        f"{env}; dense = `{args.dense}`, MoE = `{args.moe}`; median of {args.repeats} interleaved runs "
        f"({4 * args.repeats} at batch 1). FFN ms = the model's time minus its time with every FFN returning "
        f"its input. Ceiling = 1 / (1 − dense FFN share): MoE/dense if its FFNs cost nothing. {args.note}".rstrip(),
        "",
        "| dtype | batch × tokens | dense ms | dense FFN ms (share) | MoE ms | MoE FFN ms | FFN speed-up "
        "| MoE speed-up | ceiling |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['batch']} × {r['tokens']} | {r['dense_ms']:.1f} | {r['dense_ffn_ms']:.1f} "
            f"({r['dense_ffn_share']:.0%}) | {r['moe_ms']:.1f} | {r['moe_ffn_ms']:.1f} "
            f"| {r['dense_ffn_ms'] / max(r['moe_ffn_ms'], 1e-9):.2f}× | {r['speedup']:.2f}× | {r['bound']:.2f}× |"
        )
    lines += [
        "",
        "## The FFN's matrix products alone (µs per layer, the models' own weights, same tokens)",
        "",
        "Dense: two GEMMs + GELU on N rows. MoE: each expert's two GEMMs + GELU on the rows its hash table "
        "routes there (layer 0's split shown). FFN-GEMM speed-up = dense / MoE; a FLOP-bound FFN would give 4×.",
        "",
        "| dtype | tokens | rows per expert (layer 0) | dense GEMMs µs | expert GEMMs µs | FFN-GEMM speed-up |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for g in gemms:
        lines.append(f"| {g['dtype']} | {g['tokens']} | {g['rows_per_expert']} | {g['dense_gemm_us']:.0f} "
                     f"| {g['moe_gemm_us']:.0f} | {g['dense_gemm_us'] / g['moe_gemm_us']:.2f}× |")  # fmt: skip
    out = write_results(args.name, lines, {"env": env, "rows": rows, "gemms": gemms})
    plt = pyplot()
    if plt is None:
        return
    labels = [f"{r['dtype'].replace('float', 'fp').replace('bfloat', 'bf')}\n{r['batch']}×{r['tokens']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(rows)), 3.4))
    xs = np.arange(len(rows))
    ax.bar(xs - 0.2, [r["speedup"] for r in rows], 0.4, label="MoE speed-up (measured)")
    ax.bar(xs + 0.2, [r["bound"] for r in rows], 0.4, label="ceiling 1/(1−FFN share)")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_ylabel("MoE / dense")
    ax.set_title(f"torch, {args.threads} threads: measured vs ceiling")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
