"""Where ONNX Runtime spends its time: per-op breakdown of exported graphs (ORT's own profiler), dense
teacher beside its MoEBERT conversion, at several batch shapes, on the server's session settings.

    python benchmarks/onnx_profile.py --model dense=/tmp/mb13/dense --model moe=/tmp/mb13/moe \\
        --shapes 32x128 1x128 16x24 --threads 2

Each --model is NAME=CHECKPOINT (its onnx/ export; both model.onnx and model.int8.onnx are profiled,
as "NAME fp32" / "NAME int8") or "NAME VARIANT=FILE.onnx"; "moe X" is compared with "dense X".
For each graph and shape: ms per run (the sum of node times, median run), the share of each op type,
and how many of those nodes handed no work to the pool's other thread(s) (ORT's thread scheduling
stats, sub-thread num_run == 0). Writes benchmarks/results/<--name>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from batch_shapes import make_batch, parse_shape

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"


def graphs(spec: str) -> list[tuple[str, Path]]:
    """NAME=PATH → [(label, onnx file)]: a folder's fp32 and int8 exports, or one file."""
    name, path = spec.split("=", 1)
    path = Path(path)
    if path.is_file():
        return [(name, path)]
    out = [(f"{name} {p}", path / "onnx" / f) for p, f in (("fp32", "model.onnx"), ("int8", "model.int8.onnx"))]
    return [(label, f) for label, f in out if f.is_file()]


def profile(file: Path, shape: str, threads: int, runs: int, keep_denormals: bool = False, warmup: int = 3) -> dict:
    """One graph at one shape ("BxT" or "BxTp", benchmarks/batch_shapes.py) → per-op-type ms per run and
    single-threaded counts. keep_denormals: run as the server did before it flushed them (FTZ/DAZ off)."""
    import onnxruntime as ort
    import torch

    from server.backends import ort_session_options

    options = ort_session_options(threads)  # as the server runs it
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    if keep_denormals:
        options.add_session_config_entry("session.set_denormal_as_zero", "0")
    session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    ids, mask, types = make_batch(*parse_shape(shape), np.random.default_rng(0))  # [B, T]
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}}
    torch.set_flush_denormal(not keep_denormals)  # this thread runs the graph (all of it at 1 thread)
    for _ in range(warmup + runs):
        session.run(None, feeds)
    trace = json.loads(Path(session.end_profiling()).read_text())
    run_windows = [(e["ts"], e["ts"] + e["dur"]) for e in trace if e.get("name") == "model_run"][warmup:]
    per_run = [defaultdict(float) for _ in run_windows]
    single = defaultdict(int)
    count = defaultdict(int)
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        k = next((i for i, (a, b) in enumerate(run_windows) if a <= e["ts"] <= b), None)
        if k is None:
            continue
        op = e["args"].get("op_name", "?")
        per_run[k][op] += e["dur"] / 1000
        if k == 0:
            count[op] += 1
            stats = e["args"].get("thread_scheduling_stats", {})
            if threads > 1 and not any(s.get("num_run", 0) for s in stats.get("sub_threads", {}).values()):
                single[op] += 1
    totals = [sum(r.values()) for r in per_run]
    median_run = per_run[totals.index(sorted(totals)[len(totals) // 2])]
    wall = [(b - a) / 1000 for a, b in run_windows]
    return {
        "ms": statistics.median(wall),
        "node_ms": sum(median_run.values()),
        "ops": {op: {"ms": ms, "n": count[op], "single_thread": single[op]} for op, ms in median_run.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="NAME=CHECKPOINT or NAME=FILE.onnx (repeatable)")
    p.add_argument(
        "--shapes",
        nargs="+",
        default=["32x128", "1x128", "16x24"],
        help="BATCHxTOKENS shapes; a trailing p (8x48p) pads rows of mixed lengths to TOKENS",
    )
    p.add_argument("--denormals", nargs="+", choices=("flush", "keep"), default=["flush"],
                   help="flush: FTZ/DAZ on, as the server runs; keep: off (what denormals cost); `flush keep` profiles "
                   "each graph both ways")  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    p.add_argument("--runs", type=int, default=10, help="profiled runs per cell (after 3 warm-up runs)")
    p.add_argument("--top", type=int, default=12, help="op types listed per cell")
    p.add_argument("--name", default="onnx_profile", help="results file stem (default onnx_profile)")
    args = p.parse_args()

    files = [g for spec in args.model for g in graphs(spec)]
    results = []
    for shape in args.shapes:
        for label, file in files:
            for mode in args.denormals:
                r = profile(file, shape, args.threads, args.runs, keep_denormals=mode == "keep")
                graph = label if mode == "flush" or args.denormals == ["keep"] else f"{label}, denormals kept"
                results.append({"graph": graph, "file": str(file), "shape": shape, "denormals": mode, **r})
                print(f"{shape:>7} {graph:<36} {r['ms']:8.2f} ms", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        "# ONNX Runtime per-op profile",
        "",
        f"`python benchmarks/onnx_profile.py {' '.join(sys.argv[1:])}` — ORT profiler, {args.threads} intra-op "
        f"threads, no spinning (the server's settings), median of {args.runs} runs.",
        "",
        "## Run time per graph and shape (ms; ratio = `dense X` / `moe X`, same variant X)",
        "",
        "| shape | graph | ms per run | sum of node times ms | ratio vs dense |",
        "|---|---|---:|---:|---:|",
    ]
    for r in results:
        variant = r["graph"].split(" ", 1)[-1]  # "fp32" / "int8" (or a file's label after its model name)
        dense = next((d for d in results if d["shape"] == r["shape"] and d["graph"] == f"dense {variant}"), None)
        ratio = f"{dense['ms'] / r['ms']:.2f}×" if dense else ""
        lines.append(f"| {r['shape']} | {r['graph']} | {r['ms']:.2f} | {r['node_ms']:.2f} | {ratio} |")
    for r in results:
        lines += ["", f"### {r['graph']}, {r['shape']} ({r['ms']:.2f} ms)", "",
                  "| op | ms | % | nodes | nodes on 1 thread |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        ops = sorted(r["ops"].items(), key=lambda kv: -kv[1]["ms"])
        shown, rest = ops[: args.top], ops[args.top :]
        for op, o in shown:
            lines.append(
                f"| {op} | {o['ms']:.3f} | {100 * o['ms'] / r['node_ms']:.1f} | {o['n']} | {o['single_thread']} |"
            )
        if rest:
            ms, n = sum(o["ms"] for _, o in rest), sum(o["n"] for _, o in rest)
            names = ", ".join(op for op, _ in rest)
            lines.append(f"| other ({names}) | {ms:.3f} | {100 * ms / r['node_ms']:.1f} | {n} | |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
