"""Which CPU runtime is fastest for a model, by batch shape: torch (grouped experts) vs ONNX Runtime
int8 (and fp32), the same numpy batch through the server's own backends, runs interleaved so machine
noise hits all alike; median of --repeats. Decides what a bundled model ships as (`models/build.py
--format`): ONNX int8 wins on short inputs and small batches, torch on long QA windows.

    python benchmarks/backend_speed.py --model sst2=runs/quality/sst2/seed0/moebert/student:24 \\
        --model squad=runs/quality/squad/seed0/moebert/student:256

Each --model is NAME=CHECKPOINT:TOKENS (the sequence length to time; the checkpoint needs its onnx/
export). Writes benchmarks/results/backend_speed.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    from server.backends import OnnxBackend, TorchBackend

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="NAME=CHECKPOINT:TOKENS (repeatable)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32], help="batch sizes (rows)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for every runtime (default 1)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per cell (median)")
    p.add_argument("--fp32", action="store_true", help="also time the ONNX fp32 export")
    args = p.parse_args()

    rows = []
    rng = np.random.default_rng(0)
    for spec in args.model:
        name, rest = spec.split("=", 1)
        path, tokens = rest.rsplit(":", 1)
        runtimes = {
            "torch": TorchBackend(path, threads=args.threads),
            "onnx-int8": OnnxBackend(path, "int8", threads=args.threads),
        }
        if args.fp32:
            runtimes["onnx-fp32"] = OnnxBackend(path, "fp32", threads=args.threads)
        for batch in args.batches:
            ids = rng.integers(1000, 20000, (batch, int(tokens))).astype(np.int64)  # [B, T]
            mask, types = np.ones_like(ids), np.zeros_like(ids)
            times = {k: [] for k in runtimes}
            for backend in runtimes.values():  # warm-up
                backend.run(ids, mask, types)
            for _ in range(args.repeats):
                for key, backend in runtimes.items():
                    start = time.perf_counter()
                    backend.run(ids, mask, types)
                    times[key].append(time.perf_counter() - start)
            ms = {k: 1000 * float(np.median(v)) for k, v in times.items()}
            rows.append({"model": name, "batch": batch, "tokens": int(tokens), "ms": ms,
                         "int8_speedup_vs_torch": ms["torch"] / ms["onnx-int8"]})  # fmt: skip
            print(rows[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "backend_speed.json").write_text(json.dumps(rows, indent=1) + "\n")
    keys = list(rows[0]["ms"])
    lines = [
        "# CPU runtime speed by batch shape (ms per batch, median; interleaved runs)",
        "",
        f"`python benchmarks/backend_speed.py {' '.join(sys.argv[1:])}` — {args.threads} thread(s)",
        "",
        "| model | batch × tokens | " + " | ".join(keys) + " | int8 speed-up vs torch |",
        "|---|---|" + "---:|" * (len(keys) + 1),
    ]
    for r in rows:
        cells = " | ".join(f"{r['ms'][k]:.1f}" for k in keys)
        lines.append(f"| {r['model']} | {r['batch']} × {r['tokens']} | {cells} | {r['int8_speedup_vs_torch']:.2f}× |")
    (RESULTS / "backend_speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
