"""Whole model on one GPU: the dense teacher vs MoEBERT, as the server runs them, side by side in one run.

Both are the one `moebert` definition with random weights (speed does not depend on the values): the dense
teacher (moe_layers = []) and MoEBERT (every FFN an MoE of E experts of d_e, hash routing, Triton backend),
in fp16 or bf16 with torch SDPA attention and the padded token layout (no host sync), each timed as
  graph   CUDA-graph replay of the forward (server.cuda_graphs.BucketedRunner, the server's path), GPU time
          between CUDA events;
  served  BucketedRunner.run: host → device copy, replay, outputs back to numpy (what a batch costs the server);
  eager   the plain forward, for reference (host-bound at small batches).
Shapes: BERT-base (12 layers, d 768, d_h 3072 → 4 × 768) and MiniLM-L6 (6 layers, d 384, d_h 1536 → 4 × 384);
batch × 128 tokens for batch 1, 8, 64, 256. Reports tokens/s and MoEBERT ÷ teacher throughput, checks the
targets of issue #16 (BERT-base, graphs: ≥ 1.5× at 64 × 128, ≥ 1.2× at 8 × 128), and the 16-bit logits
against the fp32 eager forward of the same weights (max |Δ| relative to the fp32 logits' spread).

    python benchmarks/bench_e2e_gpu.py                         # on a CUDA GPU (≈ 2-3 min on an H200)
    python benchmarks/bench_e2e_gpu.py --smoke                 # tiny shapes, CPU, eager: checks the script
    python benchmarks/bench_e2e_gpu.py --save-checkpoints DIR  # also write random classifiers (load bench)

Writes benchmarks/results/bench_e2e_gpu.{md,json} after every row (`--out` to change the prefix).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
SHAPES = {  # name: (layers, d, heads, d_h, E, d_e)
    "bert-base": (12, 768, 12, 3072, 4, 768),
    "minilm": (6, 384, 12, 1536, 4, 384),
    "tiny": (2, 48, 4, 96, 4, 24),  # --smoke
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TARGETS = {("bert-base", 64): 1.5, ("bert-base", 8): 1.2}  # MoEBERT ÷ teacher throughput, CUDA graphs
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build(shape: str, moe: bool, num_labels: int = 2, seed: int = 0):
    from moebert import MoEBertConfig
    from moebert.modeling import MoEBertForSequenceClassification

    layers, d, heads, d_h, E, d_e = SHAPES[shape]
    config = MoEBertConfig(
        hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=d_h, num_experts=E,
        expert_dim=d_e, moe_layers=list(range(layers)) if moe else [], route_method="hash-random",
        num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        architectures=["MoEBertForSequenceClassification"],
    )  # fmt: skip
    torch.manual_seed(seed)
    return MoEBertForSequenceClassification(config).eval()


def forward_of(model):
    """The TorchBackend forward: device tensors → {logits, expert_counts}."""

    def forward(input_ids, attention_mask, token_type_ids):
        out = model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                    output_expert_counts=model.config.is_moe)  # fmt: skip
        result = {"logits": out.logits}
        if out.expert_counts is not None:
            result["expert_counts"] = out.expert_counts
        return result

    return forward


def time_ms(fn, device: torch.device, budget_s: float, repeats: int = 9) -> float:
    """Median over repeats of the mean time per call of back-to-back calls (CUDA events on a GPU)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - start, 1e-6)
    inner = max(1, min(100, int(budget_s / repeats / once)))
    samples = []
    for _ in range(repeats):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(samples)


def bench_model(label, model, fp32_model, batches, seq_len, device, dtype, graphs, budget) -> list[dict]:
    from server.cuda_graphs import BucketedRunner

    model = model.to(device, dtype)
    if model.config.is_moe:
        model.set_moe_backend("triton" if device.type == "cuda" else "torch")
    model.set_token_layout("padded" if device.type == "cuda" else "packed")
    forward = forward_of(model)
    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(1000, 30000, (batch, seq_len), generator=g)
        arrays = (ids.numpy(), np.ones((batch, seq_len), dtype=np.int64), np.zeros((batch, seq_len), dtype=np.int64))
        on_device = [torch.from_numpy(a).to(device) for a in arrays]
        ms = {}
        with torch.inference_mode():
            ms["eager"] = time_ms(lambda on_device=on_device: forward(*on_device), device, budget)
            logits = forward(*on_device)["logits"].float().cpu()
            if graphs:
                runner = BucketedRunner(forward, [(batch, seq_len)], 0, device, graphs=True)
                runner.capture()
                _, replay, _ = runner.replay_of((batch, seq_len))
                ms["graph"] = time_ms(replay, device, budget)
                ms["served"] = time_ms(lambda runner=runner, arrays=arrays: runner.run(*arrays), device, budget)
                logits = torch.from_numpy(runner.run(*arrays)["logits"])
                del runner
            want = fp32_model(*on_device)["logits"] if fp32_model is not None else logits
        spread = float(want.std()) or 1.0
        rows.append(dict(model=label, batch=batch, seq_len=seq_len, ms=ms,
                         tok_s={k: batch * seq_len / v * 1e3 for k, v in ms.items()},
                         max_abs_err_vs_fp32=float((logits - want).abs().max()), fp32_logit_std=spread))  # fmt: skip
        print(f"{label:28s} {batch:4d}×{seq_len}: " + "  ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
              + f"  |Δ logits| {rows[-1]['max_abs_err_vs_fp32']:.2e} (fp32 std {spread:.2e})", flush=True)  # fmt: skip
    model.cpu()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def fp32_reference(model, device: torch.device):
    """The fp32 eager forward (packed layout, grouped torch MoE backend, no TF32) on `device`: the reference
    the 16-bit logits are held to. → forward(*tensors) → {name: CPU fp32 tensor}"""
    import copy

    ref = copy.deepcopy(model).float().eval()
    if ref.config.is_moe:
        ref.set_moe_backend("torch")
    ref.set_token_layout("packed")
    forward = forward_of(ref)

    def run(*tensors):
        ref.to(device)
        try:
            return {k: v.float().cpu() for k, v in forward(*(t.to(device) for t in tensors)).items()}
        finally:
            ref.cpu()  # the GPU holds one model at a time

    return run


def ratios(rows: list[dict]) -> list[dict]:
    out = []
    by_key = {(r["shape"], r["model"].split()[0], r["batch"]): r for r in rows}
    for (shape, kind, batch), moe in by_key.items():
        dense = by_key.get((shape, "dense", batch))
        if kind != "moebert" or dense is None:
            continue
        ratio = {m: dense["ms"][m] / moe["ms"][m] for m in moe["ms"] if m in dense["ms"]}
        target = TARGETS.get((shape, batch))
        met = None if target is None or "graph" not in ratio else ratio["graph"] >= target
        out.append(dict(shape=shape, batch=batch, seq_len=moe["seq_len"], ratio=ratio, target=target, met=met))
    return out


def write(prefix: Path, meta: dict, rows: list[dict]) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    summary = ratios(rows)
    prefix.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows, ratios=summary), indent=1))
    modes = [m for m in ("graph", "served", "eager") if any(m in r["ms"] for r in rows)]
    lines = [
        "# Whole model on the GPU: dense teacher vs MoEBERT",
        "",
        f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; {meta['dtype']}; "
        f"{meta['date']}. Random weights, hash routing, Triton MoE backend, SDPA attention, padded token layout.",
        "`graph`: CUDA-graph replay (GPU time); `served`: copy in + replay + copy out (the server's cost per batch); "
        "`eager`: plain forward. Median of back-to-back runs. Command: `python benchmarks/bench_e2e_gpu.py`.",
        "",
        "| shape | model | batch × seq | "
        + " | ".join(f"{m} ms | {m} tokens/s" for m in modes)
        + " | max abs Δ logits vs fp32 (fp32 std) |",
        "|---|---|---|" + "---:|---:|" * len(modes) + "---:|",
    ]
    for r in rows:
        cells = " | ".join(f"{r['ms'][m]:.3f} | {r['tok_s'][m]:,.0f}" if m in r["ms"] else "– | –" for m in modes)
        lines.append(f"| {r['shape']} | {r['model']} | {r['batch']} × {r['seq_len']} | {cells} | "
                     f"{r['max_abs_err_vs_fp32']:.2e} ({r['fp32_logit_std']:.2e}) |")  # fmt: skip
    if summary:
        lines += ["", "## MoEBERT ÷ teacher throughput", "",
                  "| shape | batch × seq | " + " | ".join(modes) + " | target (graph) |",
                  "|---|---|" + "---:|" * len(modes) + "---|"]  # fmt: skip
        for s in summary:
            verdict = "–" if s["target"] is None else f"≥ {s['target']}: " + ("**met**" if s["met"] else "**not met**")
            cells = " | ".join(f"{s['ratio'][m]:.2f}×" if m in s["ratio"] else "–" for m in modes)
            lines.append(f"| {s['shape']} | {s['batch']} × {s['seq_len']} | {cells} | {verdict} |")
    prefix.with_suffix(".md").write_text("\n".join(lines) + "\n")


def save_checkpoints(directory: Path, shape: str, tokenizer_dir: Path) -> None:
    """Random dense + MoEBERT classifiers of `shape` with a BERT tokenizer, for the GPU load benchmark."""
    for name, moe in (("dense", False), ("moe", True)):
        out = directory / name
        build(shape, moe).save_pretrained(out)
        for file in TOKENIZER_FILES:
            shutil.copy(tokenizer_dir / file, out / file)
        print(f"wrote {out}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["bert-base", "minilm"], choices=list(SHAPES))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256], help="batch sizes (rows)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bf16 where supported, else fp16")
    p.add_argument("--budget", type=float, default=0.5, help="seconds of timed runs per model, batch and mode")
    p.add_argument("--no-graphs", action="store_true", help="eager only")
    p.add_argument("--no-fp32-check", action="store_true", help="skip the fp32 reference forward")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, batch 1 and 3 × 16, CPU fp32: checks the script")
    p.add_argument("--save-checkpoints", metavar="DIR", help="also write dense/ and moe/ BERT-base classifiers there")
    p.add_argument("--checkpoint-shape", default="bert-base", choices=list(SHAPES), help="shape of those checkpoints")
    p.add_argument("--tokenizer-dir", default=str(REPO / "models" / "squad"),
                   help="where their tokenizer.json comes from (default: the bundled models/squad)")  # fmt: skip
    p.add_argument("--out", help="output prefix (default benchmarks/results/bench_e2e_gpu; smoke: a temp folder)")
    args = p.parse_args(argv)
    if args.save_checkpoints:
        save_checkpoints(Path(args.save_checkpoints), args.checkpoint_shape, Path(args.tokenizer_dir))
    cuda = torch.cuda.is_available() and not args.smoke
    if args.smoke:
        args.shapes, args.batches, args.seq_len, args.budget = ["tiny"], [1, 3], 16, 0.05
        dtype_name = "fp32"
    elif not cuda:
        print("bench_e2e_gpu.py needs a CUDA GPU (or --smoke for the CPU check)", file=sys.stderr)
        return 2
    elif args.dtype == "auto":
        dtype_name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        dtype_name = args.dtype
    device = torch.device("cuda" if cuda else "cpu")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    meta = dict(device=torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
                torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda, dtype=dtype_name,
                python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M"))  # fmt: skip
    if args.out:
        prefix = Path(args.out)
    elif args.smoke:
        import tempfile

        prefix = Path(tempfile.mkdtemp(prefix="bench-e2e-smoke-")) / "bench_e2e_gpu"
    else:
        prefix = RESULTS / "bench_e2e_gpu"
    print(f"{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  {dtype_name}", flush=True)
    rows: list[dict] = []
    for shape in args.shapes:
        for label, moe in (("dense teacher", False), ("moebert triton" if cuda else "moebert torch", True)):
            model = build(shape, moe)
            reference = None if args.no_fp32_check else fp32_reference(model, device)
            for row in bench_model(label, model, reference, args.batches, args.seq_len, device, DTYPES[dtype_name],
                                   cuda and not args.no_graphs, args.budget):  # fmt: skip
                rows.append(dict(shape=shape, **row))
                write(prefix, meta, rows)
            del model, reference
    for s in ratios(rows):
        verdict = "" if s["target"] is None else f"  target ≥ {s['target']} (graph): {'met' if s['met'] else 'NOT met'}"
        speedups = "  ".join(f"{m} {v:.2f}×" for m, v in s["ratio"].items())
        print(f"{s['shape']} {s['batch']}×{s['seq_len']}: MoEBERT ÷ teacher {speedups}{verdict}")
    print(f"wrote {prefix}.md, {prefix}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
