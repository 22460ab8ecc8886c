"""ort_moe_ops: every graph it times computes the FFN it is named for (weight layouts, routing weights)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from ort_moe_ops import D, E, contrib_graphs, exported_graphs, reference, weights


def test_graphs_compute_the_expert_ffn(tmp_path):
    rng = np.random.default_rng(0)
    w = weights(rng)
    x = rng.standard_normal((37, D)).astype(np.float32)  # an odd token count, experts of unequal sizes
    ids = rng.integers(0, E, 37)
    ref = reference(x, ids, w)
    sessions = {name: ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
                for name, f in exported_graphs(w, tmp_path).items()}  # fmt: skip
    sessions |= {name: ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"])
                 for name, g in contrib_graphs(w).items()}  # fmt: skip
    feeds = {
        "export": {"x": x, "ids": ids.astype(np.int64)},
        "contrib": {"x": x, "p": np.eye(E, dtype=np.float32)[ids]},
    }
    # tolerances: fp32 exact GELU; tanh GELU (contrib MoE); int8 weights and activations
    tolerance = {"export fp32": 1e-4, "contrib MoE fp32": 2e-3, "export int8": 0.2, "contrib QMoE int8": 0.2}
    for name, tol in tolerance.items():
        y = sessions[name].run(None, feeds[name.split()[0]])[0]
        assert np.abs(y - ref).max() < tol, name
    dense = sessions["dense fp32"].run(None, {"x": x})[0]
    h = x.astype(np.float64) @ w["dense1"] + w["dense_b1"]
    want = (0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))) @ w["dense2"] + w["dense_b2"]
    assert np.abs(dense - want).max() < 1e-3  # erf GELU vs its tanh form: ~1e-4 here
