"""Which CPU runtime is fastest for a model, by batch shape: torch (grouped experts; fp32, and bf16 on a
CPU with native bf16 matmuls) vs ONNX Runtime int8 and fp32 (each when exported), the same numpy batch
through the server's own backends, runs interleaved so machine noise hits all alike; median of --repeats.
This measurement is what `moebert serve --backend auto` acts on: with --record it writes
<checkpoint>/backend_speed.json, naming the runtime with the lowest geometric-mean time over the timed
shapes (the batch shapes the model will see: --batches × TOKENS), and the server runs that one.
`models/build.py` ships the file with a bundle.

    python benchmarks/backend_speed.py --model sst2=runs/quality/sst2/seed0/moebert/student:24 \\
        --model squad=runs/quality/squad/seed0/moebert/student:256 --threads 2 --record

Each --model is NAME=CHECKPOINT:TOKENS (the sequence length to time). Writes
benchmarks/results/<--name>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from interleaved import time_interleaved

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    from server.backends import SPEED_FILE, OnnxBackend, TorchBackend, native_cpu_bf16, onnx_file

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="NAME=CHECKPOINT:TOKENS (repeatable)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32], help="batch sizes (rows)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for every runtime (default 1)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per cell (median)")
    p.add_argument("--record", action="store_true", help="write <checkpoint>/backend_speed.json (what auto runs)")
    p.add_argument("--name", default="backend_speed", help="results file stem (default backend_speed)")
    args = p.parse_args()

    rows, choices = [], {}
    rng = np.random.default_rng(0)
    for spec in args.model:
        name, rest = spec.split("=", 1)
        path, tokens = rest.rsplit(":", 1)
        runtimes = {"torch": TorchBackend(path, threads=args.threads)}
        if native_cpu_bf16():  # AVX512-BF16 / AMX; emulated bf16 would only lose
            runtimes["torch-bf16"] = TorchBackend(path, threads=args.threads, dtype="bfloat16")
        for precision in ("int8", "fp32"):
            if onnx_file(path, precision).is_file():
                runtimes[f"onnx-{precision}"] = OnnxBackend(path, precision, threads=args.threads)
        model_rows = []
        for batch in args.batches:
            ids = rng.integers(1000, 20000, (batch, int(tokens))).astype(np.int64)  # [B, T]
            mask, types = np.ones_like(ids), np.zeros_like(ids)
            times = time_interleaved(runtimes, (ids, mask, types), args.repeats)
            ms = {k: 1000 * float(np.median(v)) for k, v in times.items()}
            model_rows.append({"model": name, "batch": batch, "tokens": int(tokens), "ms": ms,
                               "fastest": min(ms, key=ms.get)})  # fmt: skip
            print(model_rows[-1], flush=True)
        rows += model_rows
        fastest = choose(model_rows)
        choices[name] = fastest
        if args.record:
            record = {"fastest": fastest, "threads": args.threads, "criterion": "lowest geometric-mean ms over shapes",
                      "shapes": [f"{r['batch']}x{r['tokens']}" for r in model_rows],
                      "ms": {k: [round(r["ms"][k], 2) for r in model_rows] for k in runtimes},
                      "command": f"python benchmarks/backend_speed.py {' '.join(sys.argv[1:])}"}  # fmt: skip
            (Path(path) / SPEED_FILE).write_text(json.dumps(record, indent=1) + "\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    keys = list(dict.fromkeys(k for r in rows for k in r["ms"]))
    lines = [
        "# CPU runtime speed by batch shape (ms per batch, median; interleaved runs)",
        "",
        f"`python benchmarks/backend_speed.py {' '.join(sys.argv[1:])}` — {args.threads} thread(s)",
        "",
        "| model | batch × tokens | " + " | ".join(keys) + " | fastest |",
        "|---|---|" + "---:|" * len(keys) + "---|",
    ]
    for r in rows:
        cells = " | ".join(f"{r['ms'][k]:.1f}" if k in r["ms"] else "" for k in keys)
        lines.append(f"| {r['model']} | {r['batch']} × {r['tokens']} | {cells} | {r['fastest']} |")
    lines += ["", "Fastest over all shapes (geometric mean; what `--backend auto` runs when recorded): "
              + ", ".join(f"{k}: **{v}**" for k, v in choices.items())]  # fmt: skip
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")


def choose(rows: list[dict]) -> str:
    """The runtime with the lowest geometric-mean time over a model's timed shapes."""
    runtimes = rows[0]["ms"]
    return min(runtimes, key=lambda k: sum(math.log(r["ms"][k]) for r in rows))


if __name__ == "__main__":
    main()
