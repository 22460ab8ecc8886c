"""Exported graphs side by side: several checkpoint folders (or several exports of one model) timed
interleaved on the server's own ONNX Runtime backend, to compare graph variants (an export change, the
attention core, a bundle re-export) where bench_backends.py compares a dense teacher with its MoEBERT.

Every repeat runs every graph once, in turn, on the same batch, so machine noise hits all alike; the table
reports medians and each graph's time relative to the first one given.

    python benchmarks/graph_ab.py --graph old=models-old/sst2 --graph new=models/sst2 --shapes 16x24 8x48p
    python benchmarks/graph_ab.py --graph plain=runs/qa/onnx-plain --graph fused=runs/qa/onnx-fused \
        --precision int8 --shapes 1x256 4x256p 8x256p

A --graph is LABEL=FOLDER, the folder holding onnx/model[.int8].onnx (or the onnx/ folder itself). Shapes as
in bench_backends.py (a trailing p pads rows of mixed lengths). Writes benchmarks/results/<--name>.{md,json}.
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
from results_files import write_results

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_graph(text: str) -> tuple[str, Path]:
    label, sep, folder = text.partition("=")
    if not sep or not label or not folder:
        raise argparse.ArgumentTypeError(f"expected LABEL=FOLDER, got {text!r}")
    path = Path(folder)
    return label, path.parent if path.name == "onnx" else path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--graph", type=parse_graph, action="append", required=True,
                   help="LABEL=FOLDER (repeatable; the first is the reference)")  # fmt: skip
    p.add_argument("--precision", choices=("int8", "fp32"), default="int8", help="which export (default int8)")
    p.add_argument("--shapes", nargs="+", default=["16x24", "8x48p", "1x128"], help="BATCHxTOKENS shapes")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1, the server's here)")
    p.add_argument("--repeats", type=int, default=15, help="timed runs per cell (median); ×4 for batch 1")
    p.add_argument("--name", default="graph_ab", help="results file stem (default graph_ab)")
    p.add_argument("--note", default="", help="a line for the results file")
    args = p.parse_args()

    from server.backends import OnnxBackend

    graphs = dict(args.graph)
    if len(graphs) < 2:
        p.error("give at least two graphs")
    runners = {label: OnnxBackend(folder, args.precision, threads=args.threads) for label, folder in graphs.items()}
    rng = np.random.default_rng(0)
    rows = []
    for shape in args.shapes:
        batch, tokens, padded = parse_shape(shape)
        ids, mask, types = make_batch(batch, tokens, padded, rng)
        times = time_interleaved(runners, (ids, mask, types), args.repeats * (4 if batch == 1 else 1), warmup=2)
        ms = {label: 1000 * statistics.median(t) for label, t in times.items()}
        rows.append({"shape": shape, "ms": ms})
        print(f"{shape:>7}  " + "  ".join(f"{k} {v:7.2f} ms" for k, v in ms.items()), flush=True)
    write(rows, args, graphs)


def write(rows: list[dict], args, graphs: dict[str, Path]) -> None:
    import onnxruntime

    labels = list(graphs)
    first = labels[0]
    env = (f"{os.cpu_count()} cores ({platform.machine()}), onnxruntime {onnxruntime.__version__}, "
           f"{args.threads} threads, {args.precision}")  # fmt: skip
    lines = [
        "# Exported graphs side by side (interleaved, one run)",
        "",
        f"`python benchmarks/graph_ab.py {' '.join(sys.argv[1:])}`",
        "",
        f"{env}; median of {args.repeats} interleaved runs ({4 * args.repeats} at batch 1); "
        + ", ".join(f"{k} = `{v}`" for k, v in graphs.items())
        + f". {args.note}".rstrip(),
        "",
        "| shape | "
        + " | ".join(f"{k} ms" for k in labels)
        + " | "
        + " | ".join(f"{first} / {k}" for k in labels[1:])
        + " |",
        "|---|" + "---:|" * (2 * len(labels) - 1),
    ]
    for r in rows:
        ms = r["ms"]
        lines.append(f"| {r['shape']} | " + " | ".join(f"{ms[k]:.2f}" for k in labels) + " | "
                     + " | ".join(f"{ms[first] / ms[k]:.2f}×" for k in labels[1:]) + " |")  # fmt: skip
    write_results(args.name, lines, {"env": env, "graphs": {k: str(v) for k, v in graphs.items()}, "rows": rows})


if __name__ == "__main__":
    main()
