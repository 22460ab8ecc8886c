"""Recover a MoEBERT classifier's torch weights from a bundled int8 ONNX graph of the earlier export
(ORT's fused QAttention; per-channel int8 weights, per-tensor uint8 embeddings), so that the bundle can be
re-exported with the current graph without retraining. The bundled models/sst2 was rebuilt this way from
its a5d7b27 form (the graph this script reads; the current bundle is in the new form):

    git worktree add /tmp/moebert-a5d7b27 a5d7b27
    python models/recover_from_int8.py /tmp/moebert-a5d7b27/models/sst2 /work/runs/quality/sst2/seed0/moebert/student

Every weight is dequantized exactly as ONNX Runtime reads it, (q − zero_point) · scale, so the recovered
model computes what the int8 graph's weights compute, in fp32 (quantizing it again per channel gives back
the same int8 weights: each column's largest |w| is a multiple of its scale). The graph keeps no
`kept_neurons` (which teacher neurons each expert came from): they stay −1.

The expert weights carry no names in the graph (they are slices of the stacked [E, ...] parameters,
named onnx::MatMul_N / onnx::Add_N / onnx::LayerNormalization_N by the tracer in the order the layer
uses them): per layer, after the attention output projection, expert e's fc1 weight, fc1 bias, fc2
weight, fc2 bias, LayerNorm weight, LayerNorm bias, e = 0..E−1.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import torch
from build import TOKENIZER_FILES  # models/build.py, beside this script
from onnx import numpy_helper

from moebert.atomic import atomic_folder
from moebert.loading import load_config
from moebert.modeling import MoEBertForSequenceClassification


def dequantize(init: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    """(q − zero_point) · scale for <prefix>_quantized / _zero_point / _scale; per column when the scale is a vector."""
    q = init[f"{prefix}_quantized"].astype(np.float32)
    return (q - init[f"{prefix}_zero_point"].astype(np.float32)) * init[f"{prefix}_scale"].astype(np.float32)


def recover(graph_file: Path, config) -> dict[str, torch.Tensor]:
    """state dict of MoEBertForSequenceClassification(config) from the int8 graph."""
    model = onnx.load(str(graph_file))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    d, E = config.hidden_size, config.num_experts
    sd: dict[str, np.ndarray] = {}

    def named(key: str) -> None:  # tensors the graph keeps under the model's own name, prefixed "model."
        sd[key] = init[f"model.{key}"]

    for table in ("word", "position", "token_type"):
        key = f"bert.embeddings.{table}_embeddings.weight"
        sd[key] = dequantize(init, f"model.{key}")
    named("bert.embeddings.LayerNorm.weight")
    named("bert.embeddings.LayerNorm.bias")

    # the unnamed expert tensors, per layer, in trace order (see the module doc)
    layer_of_node = {}
    for node in model.graph.node:
        if m := re.search(r"/layer\.(\d+)/", node.name):
            layer_of_node.update({x: int(m.group(1)) for x in node.input if x.startswith("onnx::")})
    per_layer: dict[int, list[tuple[int, str]]] = defaultdict(list)  # layer → [(trace number, kind)]
    for name, layer in layer_of_node.items():
        m = re.fullmatch(r"onnx::(MatMul|Add|LayerNormalization)_(\d+)(_quantized)?", name)
        if m and (m.group(1) != "MatMul" or m.group(3)):
            per_layer[layer].append((int(m.group(2)), m.group(1)))

    for i in range(config.num_hidden_layers):
        pre = f"bert.encoder.layer.{i}"
        qkv = dequantize(init, f"Attention_{i}_qkv_weight")  # [d, 3d]: x @ [Wq | Wk | Wv]
        qkv_bias = init[f"Attention_{i}_qkv_bias"]
        for j, part in enumerate(("query", "key", "value")):
            sd[f"{pre}.attention.self.{part}.weight"] = qkv[:, j * d : (j + 1) * d].T
            sd[f"{pre}.attention.self.{part}.bias"] = qkv_bias[j * d : (j + 1) * d]
        for key in ("dense.bias", "LayerNorm.weight", "LayerNorm.bias"):
            named(f"{pre}.attention.output.{key}")
        tensors = sorted(per_layer[i])
        kinds = [k for _, k in tensors]
        expected = ["MatMul"] + ["MatMul", "Add", "MatMul", "Add", "LayerNormalization", "LayerNormalization"] * E
        if kinds != expected:
            raise ValueError(f"layer {i}: unexpected tensor order {kinds}")
        value = [dequantize(init, f"onnx::MatMul_{n}") if k == "MatMul" else init[f"onnx::{k}_{n}"] for n, k in tensors]
        sd[f"{pre}.attention.output.dense.weight"] = value[0].T  # MatMul weight [in, out] → Linear [out, in]
        experts = [value[1 + 6 * e : 7 + 6 * e] for e in range(E)]
        for slot, name in enumerate(("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "ln_weight", "ln_bias")):
            sd[f"{pre}.moe.{name}"] = np.stack([ex[slot] for ex in experts])
        named(f"{pre}.moe.router.table")
    sd["bert.pooler.dense.weight"] = dequantize(init, "model.bert.pooler.dense.weight_Transposed").T
    named("bert.pooler.dense.bias")
    sd["classifier.weight"] = dequantize(init, "model.classifier.weight_Transposed").T
    named("classifier.bias")
    return {k: torch.from_numpy(np.array(v, dtype=v.dtype, copy=True)) for k, v in sd.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundled model folder holding config.json, tokenizer and onnx/model.int8.onnx")
    p.add_argument("output", help="checkpoint folder to write (safetensors + config + tokenizer)")
    args = p.parse_args()
    try:
        recover_bundle(Path(args.bundle), Path(args.output))
    except KeyError as err:  # a tensor the earlier export names is missing: one line, no traceback
        sys.exit(f"{args.bundle}: no tensor {err} in its graph: not an int8 graph of the earlier (QAttention) export")
    except (OSError, ValueError) as err:
        sys.exit(f"{args.bundle}: cannot recover weights: {err}")


def recover_bundle(bundle: Path, out: Path) -> None:
    config = load_config(bundle)
    model = MoEBertForSequenceClassification(config)
    state = recover(bundle / "onnx" / "model.int8.onnx", config)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("kept_neurons")]
    if missing or set(state) - set(own):
        raise ValueError(f"missing {missing}, unexpected {sorted(set(state) - set(own))}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{k}: graph {tuple(v.shape)} vs model {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)
    with atomic_folder(out) as tmp:  # written beside `out`, renamed onto it when complete
        model.save_pretrained(tmp)
        for f in TOKENIZER_FILES:
            if (bundle / f).is_file():
                shutil.copy(bundle / f, tmp / f)
    print(f"recovered {len(state)} tensors from {bundle} → {out}")


if __name__ == "__main__":
    main()
