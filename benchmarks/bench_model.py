"""Dense teacher vs MoEBERT on CPU: end-to-end encoder throughput with MiniLM-L6 shapes.

Both models are the same `moebert` definition (the dense one has moe_layers = []), so the ratio
isolates what the MoE FFN saves. Runs side by side in one process, interleaved, median of repeats.

    python benchmarks/bench_model.py            # MiniLM-L6 shapes, N=4, d_e=384, batch 1 and 32, seq 128
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from moebert import MoEBertConfig, MoEBertModel

RESULTS = Path(__file__).parent / "results"


def build(moe: bool, args) -> MoEBertModel:
    config = MoEBertConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        intermediate_size=args.ffn, num_experts=args.experts, expert_dim=args.expert_dim,
        moe_layers=list(range(args.layers)) if moe else [], route_method="hash-random",
    )  # fmt: skip
    return MoEBertModel(config, add_pooling_layer=False).eval()


def time_once(model, ids) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(ids)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="batch sizes to time")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per model and batch size")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--expert-dim", type=int, default=384)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument("--out", default=str(RESULTS / "bench_model"), help="output prefix (.md, .json, .png)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense, moe = build(False, args), build(True, args)

    rows = []
    for bs in args.batch_sizes:
        ids = torch.randint(1000, 30000, (bs, args.seq_len))
        for _ in range(3):  # warm-up
            time_once(dense, ids), time_once(moe, ids)
        t_dense, t_moe = [], []
        for _ in range(args.repeats):  # interleaved so that machine noise hits both alike
            t_dense.append(time_once(dense, ids))
            t_moe.append(time_once(moe, ids))
        md, mm = statistics.median(t_dense), statistics.median(t_moe)
        tokens = bs * args.seq_len
        rows.append(
            dict(batch=bs, seq=args.seq_len, dense_ms=md * 1e3, moe_ms=mm * 1e3,
                 dense_tok_s=tokens / md, moe_tok_s=tokens / mm, speedup=md / mm)
        )  # fmt: skip
        print(
            f"batch {bs:3d}: dense {md * 1e3:8.1f} ms  moe {mm * 1e3:8.1f} ms  speedup {md / mm:.2f}x",
            flush=True,
        )

    shape = f"d={args.hidden}, d_h={args.ffn}, L={args.layers}, N={args.experts}, d_e={args.expert_dim}"
    env = f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}"
    lines = [
        f"# Dense teacher vs MoEBERT, CPU ({shape})",
        "",
        f"{env}; seq {args.seq_len}; median of {args.repeats} interleaved runs.",
        "Command: `python benchmarks/bench_model.py`",
        "",
        "| batch | dense ms | MoEBERT ms | dense tokens/s | MoEBERT tokens/s | speedup |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['batch']} | {r['dense_ms']:.1f} | {r['moe_ms']:.1f} | {r['dense_tok_s']:.0f} "
        f"| {r['moe_tok_s']:.0f} | {r['speedup']:.2f}× |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"shape": shape, "env": env, "rows": rows}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["dense_tok_s"] for r in rows], 0.4, label="dense teacher")
        ax.bar([x + 0.2 for x in xs], [r["moe_tok_s"] for r in rows], 0.4, label="MoEBERT")
        ax.set_xticks(list(xs), [f"batch {r['batch']}" for r in rows])
        ax.set_ylabel("tokens / s")
        ax.set_title(f"CPU encoder throughput ({args.threads} threads)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
