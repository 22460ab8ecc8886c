"""Time per token against padded tokens per model call, per CPU backend, dense teacher beside MoEBERT.

What the server's start-up measurement (`server.batching.measure_batch_tokens`) picks from, shown in full:
for each backend and row length, batches of 1..N rows (no padding), every (backend, model) pair timed in
turn per repeat; µs per token, the median. Bigger calls amortise per-call work, but past some size the
activations ([B·T, 1536] FFN intermediates, [B, heads, T, T] attention scores) fall out of the caches.

    python benchmarks/batch_tokens.py --dense DENSE --moe MOE --threads 1

Writes benchmarks/results/<--name>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np
from batch_shapes import make_batch
from bench_backends import BACKENDS, add_model_args, make, model_pair
from interleaved import time_interleaved
from results_files import pyplot, write_results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS), help="backends to time")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256], help="tokens per row")
    p.add_argument("--max-tokens", type=int, default=8192, help="largest call tried (padded tokens)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1, the server's here)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per cell (median)")
    p.add_argument("--name", default="batch_tokens", help="results file stem (default batch_tokens)")
    p.add_argument("--note", default="", help="a line for the results file (e.g. what else ran on the machine)")
    args = p.parse_args()

    paths = model_pair(args)
    runners = {(b, m): make(path, b, args.threads) for b in args.backends for m, path in paths.items()}
    rng = np.random.default_rng(0)
    rows = []
    for length in args.lengths:
        batch = 1
        while batch * length <= args.max_tokens:
            inputs = make_batch(batch, length, False, rng)
            times = time_interleaved(runners, inputs, args.repeats)
            for (backend, model), ts in times.items():
                us = 1e6 * statistics.median(ts) / (batch * length)
                rows.append({"backend": backend, "model": model, "length": length, "rows": batch,
                             "tokens": batch * length, "us_per_token": us})  # fmt: skip
            done = "  ".join(f"{r['backend']}/{r['model']} {r['us_per_token']:.1f}" for r in rows[-len(runners) :])
            print(f"{length:4d} × {batch:3d} = {batch * length:5d} tokens  {done}", flush=True)
            batch *= 2
    write(rows, args, paths)


def write(rows: list[dict], args, paths: dict) -> None:
    sizes = sorted({r["tokens"] for r in rows})
    cell = {(r["backend"], r["model"], r["length"], r["tokens"]): r["us_per_token"] for r in rows}
    lines = [
        "# Time per token against tokens per model call (CPU)",
        "",
        f"`python benchmarks/batch_tokens.py {' '.join(sys.argv[1:])}`",
        "",
        f"dense = `{paths['dense']}`, MoE = `{paths['moe']}`; {args.threads} thread(s); rows without padding; µs per "
        f"token, median of {args.repeats} interleaved runs; **bold**: the fastest size per token. {args.note}".rstrip(),
        "",
        "| backend | model | row tokens | " + " | ".join(str(s) for s in sizes) + " |",
        "|---|---|---:|" + "---:|" * len(sizes),
    ]
    for backend in args.backends:
        for model in ("dense", "moe"):
            for length in args.lengths:
                values = {s: cell.get((backend, model, length, s)) for s in sizes}
                best = min(v for v in values.values() if v is not None)
                cells = ["" if v is None else (f"**{v:.1f}**" if v == best else f"{v:.1f}") for v in values.values()]
                lines.append(f"| {backend} | {model} | {length} | " + " | ".join(cells) + " |")
    out = write_results(args.name, lines, rows)
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(args.lengths), figsize=(5 * len(args.lengths), 3.4), squeeze=False)
    for ax, length in zip(axes[0], args.lengths, strict=True):
        for backend in args.backends:
            for model, style in (("dense", "--"), ("moe", "-")):
                pts = sorted((r["tokens"], r["us_per_token"]) for r in rows
                             if r["backend"] == backend and r["model"] == model and r["length"] == length)  # fmt: skip
                ax.plot(*zip(*pts, strict=True), style, marker="o", label=f"{backend} {model}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("padded tokens per call")
        ax.set_ylabel("µs per token")
        ax.set_title(f"rows of {length} tokens")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
