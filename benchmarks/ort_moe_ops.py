"""ONNX Runtime's own MoE operators (com.microsoft.MoE, QMoE) against the MoE FFN this project exports.

One FFN layer at MiniLM-L6 sizes (d = 384; dense FFN 1536; MoE: 4 experts of 384, top-1, tokens spread
evenly), each as its own small ONNX graph on the server's session settings (benchmarks share
`server.backends.ort_session_options`), timed interleaved, 1 thread by default:
- dense fp32 / dense int8: MatMul → Gelu → MatMul, int8 by ORT dynamic quantization (as the dense export);
- export fp32 / export int8: `kernels.export.moe_ffn_export` traced (per-expert Gather → FFN, one row
  ScatterND), int8 the same way: what the MoEBERT graph runs per layer;
- contrib MoE fp32: com.microsoft.MoE (k = 1, one-hot routing weights, normalized);
- contrib QMoE int8: com.microsoft.QMoE with 8-bit symmetric per-channel expert weights.
The contrib ops' GELU is the tanh approximation: max |Δ| against the exact (erf) expert FFN is reported.

    python benchmarks/ort_moe_ops.py --tokens 128 384 1024 4096

Writes benchmarks/results/<--name>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from results_files import pyplot, write_results

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
D, D_FFN, E, D_E = 384, 1536, 4, 384


def weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Expert weights as the model stacks them: fc1 [E, d, d_e], fc2 [E, d_e, d]; and a dense FFN."""
    w = lambda *shape: (rng.standard_normal(shape) * 0.05).astype(np.float32)  # noqa: E731
    return {"fc1": w(E, D, D_E), "b1": w(E, D_E), "fc2": w(E, D_E, D), "b2": w(E, D),
            "dense1": w(D, D_FFN), "dense_b1": w(D_FFN), "dense2": w(D_FFN, D), "dense_b2": w(D)}  # fmt: skip


def contrib_graphs(w: dict[str, np.ndarray]) -> dict:
    """com.microsoft.MoE and QMoE graphs: inputs x [n, d], routing weights [n, E] → y [n, d]."""
    from onnx import TensorProto, helper, numpy_helper

    def graph(node, arrays):
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D]),
                  helper.make_tensor_value_info("p", TensorProto.FLOAT, ["n", E])]  # fmt: skip
        out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", D])]
        inits = [numpy_helper.from_array(a, name) for name, a in arrays.items()]
        g = helper.make_graph([node], "ffn", inputs, out, inits)
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        return helper.make_model(g, opset_imports=opsets)

    # The contrib ops take expert weights as [E, out, in].
    fc1_t, fc2_t = w["fc1"].transpose(0, 2, 1).copy(), w["fc2"].transpose(0, 2, 1).copy()
    attrs = {"k": 1, "activation_type": "gelu", "normalize_routing_weights": 1}
    moe = graph(
        helper.make_node("MoE", ["x", "p", "w1", "b1", "w2", "b2"], ["y"], domain="com.microsoft", **attrs),
        {"w1": fc1_t, "b1": w["b1"], "w2": fc2_t, "b2": w["b2"]},
    )

    def quantize(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # symmetric per output channel, uint8 + 128
        scale = np.abs(t).max(-1) / 127.0
        q = np.clip(np.round(t / scale[..., None]), -127, 127).astype(np.int32) + 128
        return q.astype(np.uint8), scale.astype(np.float32)

    (q1, s1), (q2, s2) = quantize(fc1_t), quantize(fc2_t)
    qmoe = graph(
        helper.make_node(
            "QMoE",
            ["x", "p", "w1", "s1", "b1", "w2", "s2", "b2"],
            ["y"],
            domain="com.microsoft",
            expert_weight_bits=8,
            **attrs,
        ),  # fmt: skip
        {"w1": q1, "s1": s1, "b1": w["b1"], "w2": q2, "s2": s2, "b2": w["b2"]},
    )
    return {"contrib MoE fp32": moe, "contrib QMoE int8": qmoe}


def exported_graphs(w: dict[str, np.ndarray], workdir: Path) -> dict[str, Path]:
    """The dense FFN and the project's export MoE FFN, traced by torch.onnx and quantized as the exports are."""
    import torch
    import torch.nn.functional as F

    from kernels.export import moe_ffn_export
    from moebert.onnx_export import quantize_int8

    class Weights(torch.nn.Module):  # parameters, so that they export as initializers the quantizer finds
        def __init__(self):
            super().__init__()
            for k, v in w.items():
                self.register_parameter(k, torch.nn.Parameter(torch.from_numpy(v)))

    class Dense(Weights):
        def forward(self, x):
            return F.gelu(x @ self.dense1 + self.dense_b1) @ self.dense2 + self.dense_b2

    class Export(Weights):
        def forward(self, x, expert_ids):
            return moe_ffn_export(x, expert_ids, self.fc1, self.b1, self.fc2, self.b2)

    x, ids = torch.randn(64, D), torch.arange(64) % E
    files = {}
    for name, module, args, inputs in (("dense", Dense(), (x,), ["x"]), ("export", Export(), (x, ids), ["x", "ids"])):
        fp32 = workdir / f"{name}.onnx"
        axes = {i: {0: "n"} for i in inputs}
        torch.onnx.export(module, args, str(fp32), input_names=inputs, output_names=["y"], dynamic_axes=axes,
                          dynamo=False)  # fmt: skip
        int8 = workdir / f"{name}.int8.onnx"
        quantize_int8(fp32, int8)  # as `moebert export-onnx --quantize` does
        files[f"{name} fp32"], files[f"{name} int8"] = fp32, int8
    return files


def reference(x: np.ndarray, ids: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """The exact expert FFN (erf GELU) in float64: x [n, d], ids [n] → [n, d]."""
    from math import erf

    gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / np.sqrt(2))))
    y = np.zeros(x.shape, np.float64)
    for e in range(E):
        rows = ids == e
        h = x[rows].astype(np.float64) @ w["fc1"][e] + w["b1"][e]
        y[rows] = gelu(h) @ w["fc2"][e] + w["b2"][e]
    return y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 384, 1024, 4096], help="tokens per layer call")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1, the server's here)")
    p.add_argument("--repeats", type=int, default=15, help="timed runs per cell (median)")
    p.add_argument("--name", default="ort_moe_ops", help="results file stem (default ort_moe_ops)")
    args = p.parse_args()
    import onnxruntime as ort

    from server.backends import flush_denormals_on_this_thread, ort_session_options

    rng = np.random.default_rng(0)
    w = weights(rng)
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {**exported_graphs(w, Path(tmp)), **contrib_graphs(w)}
        sessions = {}
        for name, g in graphs.items():
            model = str(g) if isinstance(g, Path) else g.SerializeToString()
            sessions[name] = ort.InferenceSession(model, ort_session_options(args.threads),
                                                  providers=["CPUExecutionProvider"])  # fmt: skip
    flush_denormals_on_this_thread()
    rows = []
    for n in args.tokens:
        x = rng.standard_normal((n, D)).astype(np.float32)
        ids = rng.permutation(np.arange(n) % E)  # every expert gets n / E tokens
        feeds = {"dense": {"x": x}, "export": {"x": x, "ids": ids.astype(np.int64)},
                 "contrib": {"x": x, "p": np.eye(E, dtype=np.float32)[ids]}}  # fmt: skip
        feed = {name: feeds[name.split()[0]] for name in sessions}  # "contrib MoE fp32" → feeds["contrib"]
        ref = reference(x, ids, w)
        times = {name: [] for name in sessions}
        for _ in range(args.repeats + 2):  # the first two are warm-up
            for name, s in sessions.items():
                start = time.perf_counter()
                s.run(None, feed[name])
                times[name].append(time.perf_counter() - start)
        for name, s in sessions.items():
            dev = None if name.startswith("dense") else float(np.abs(s.run(None, feed[name])[0] - ref).max())
            ms = 1000 * statistics.median(times[name][2:])
            rows.append({"tokens": n, "graph": name, "ms": ms, "max_abs_dev": dev})
            print(f"{n:5d} {name:<18} {ms:8.3f} ms" + (f"  max|Δ| {dev:.1e}" if dev is not None else ""), flush=True)
    write(rows, args)


def write(rows: list[dict], args) -> None:
    import onnxruntime

    graphs = list(dict.fromkeys(r["graph"] for r in rows))
    tokens = list(dict.fromkeys(r["tokens"] for r in rows))
    cell = {(r["tokens"], r["graph"]): r for r in rows}
    lines = [
        "# ONNX Runtime's MoE operators vs the exported MoE FFN (one FFN layer, MiniLM-L6 sizes)",
        "",
        f"`python benchmarks/ort_moe_ops.py {' '.join(sys.argv[1:])}`",
        "",
        f"onnxruntime {onnxruntime.__version__}, {args.threads} intra-op thread(s), the server's session settings "
        f"(denormals flushed); median of {args.repeats} interleaved runs; d = {D}, dense FFN {D_FFN}, {E} experts "
        f"of {D_E}, top-1, tokens spread evenly. ms per layer call; in brackets the speed-up over the dense FFN "
        "of the same precision; max |Δ| against the exact (erf GELU) expert FFN in float64.",
        "",
        "| tokens | " + " | ".join(graphs) + " |",
        "|---:|" + "---:|" * len(graphs),
    ]
    for n in tokens:
        cells = []
        for g in graphs:
            r = cell[(n, g)]
            base = cell[(n, "dense int8" if "int8" in g else "dense fp32")]["ms"]
            txt = f"{r['ms']:.3f}" + ("" if g.startswith("dense") else f" ({base / r['ms']:.2f}×)")
            cells.append(txt)
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "| tokens | " + " | ".join(g for g in graphs if not g.startswith("dense")) + " |",
              "|---:|" + "---:|" * sum(not g.startswith("dense") for g in graphs)]  # fmt: skip
    for n in tokens:
        devs = [f"max \\|Δ\\| {cell[(n, g)]['max_abs_dev']:.1e}" for g in graphs if not g.startswith("dense")]
        lines.append(f"| {n} | " + " | ".join(devs) + " |")
    out = write_results(args.name, lines, rows)
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for g in graphs:
        ax.plot(tokens, [cell[(n, g)]["ms"] for n in tokens], marker="o", label=g,
                linestyle="--" if g.startswith("dense") else "-")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens per layer call")
    ax.set_ylabel("ms per FFN layer")
    ax.set_title(f"FFN layer on ONNX Runtime, {args.threads} thread(s)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
