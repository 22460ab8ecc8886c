"""Recover a MoEBERT model's torch weights (classifier or extractive QA) from a bundled int8 ONNX graph, so
that a bundle can be re-exported with the current graph without retraining. Two exports are read: the
current one (Q, K, V and every named Linear as per-channel int8 MatMuls, weights stored transposed) and
the earlier one of a5d7b27 (ORT's fused QAttention, whose [d, 3d] weight holds Q, K and V); both keep the
embeddings as per-tensor uint8. The bundles were rebuilt this way:

    python models/recover_from_int8.py models/sst2 /work/runs/quality/sst2/seed0/moebert/student
    python models/recover_from_int8.py models/squad /work/runs/quality/squad/seed0/moebert/student

(session 12 read models/sst2 from its a5d7b27 form: `git worktree add /tmp/moebert-a5d7b27 a5d7b27`).

Every weight is dequantized exactly as ONNX Runtime reads it, (q − zero_point) · scale, so the recovered
model computes what the int8 graph's weights compute, in fp32 (quantizing it again gives back the same
int8 weights: each column's largest |w| is a multiple of its scale). The graph keeps no `kept_neurons`
(which teacher neurons each expert came from): they stay −1.

The expert weights carry no names in the graph (they are slices of the stacked [E, ...] parameters,
named onnx::MatMul_N / onnx::Add_N / onnx::LayerNormalization_N by the tracer in the order the layer
uses them): per layer (after the earlier export's attention output projection), expert e's fc1 weight,
fc1 bias, fc2 weight, fc2 bias, LayerNorm weight, LayerNorm bias, e = 0..E−1; the QA head's weight is
an unnamed MatMul too.
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
from moebert.modeling import MoEBertForQuestionAnswering, MoEBertForSequenceClassification


def dequantize(init: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    """(q − zero_point) · scale for <prefix>_quantized / _zero_point / _scale; per column when the scale is a vector."""
    q = init[f"{prefix}_quantized"].astype(np.float32)
    return (q - init[f"{prefix}_zero_point"].astype(np.float32)) * init[f"{prefix}_scale"].astype(np.float32)


def recover(graph_file: Path, config, task: str) -> dict[str, torch.Tensor]:
    """state dict of the task's model (MoEBertForSequenceClassification / ForQuestionAnswering) from the
    int8 graph of either export (see the module doc)."""
    model = onnx.load(str(graph_file))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    d, E = config.hidden_size, config.num_experts
    fused_qkv = "Attention_0_qkv_weight_quantized" in init  # the earlier export's QAttention
    sd: dict[str, np.ndarray] = {}

    def named(key: str) -> None:  # tensors the graph keeps under the model's own name, prefixed "model."
        sd[key] = init[f"model.{key}"]

    def linear(key: str) -> None:  # a named Linear: its weight is stored transposed ([in, out]) and quantized
        sd[f"{key}.weight"] = dequantize(init, f"model.{key}.weight_Transposed").T
        named(f"{key}.bias")

    for table in ("word", "position", "token_type"):
        key = f"bert.embeddings.{table}_embeddings.weight"
        sd[key] = dequantize(init, f"model.{key}")
    named("bert.embeddings.LayerNorm.weight")
    named("bert.embeddings.LayerNorm.bias")

    # the unnamed tensors (experts; the earlier export's attention output; the QA head) in trace order
    scope_of = {}  # unnamed tensor → the layer number, or -1 for the QA head
    for node in model.graph.node:
        if m := re.search(r"/layer\.(\d+)/", node.name):
            scope_of.update({x: int(m.group(1)) for x in node.input if x.startswith("onnx::")})
        elif node.name.startswith("/model/qa_outputs/"):
            scope_of.update({x: -1 for x in node.input if x.startswith("onnx::")})
    per_scope: dict[int, list[tuple[int, str]]] = defaultdict(list)  # scope → [(trace number, kind)]
    for name, scope in scope_of.items():
        m = re.fullmatch(r"onnx::(MatMul|Add|LayerNormalization)_(\d+)(_quantized)?", name)
        if m and (m.group(1) != "MatMul" or m.group(3)):
            per_scope[scope].append((int(m.group(2)), m.group(1)))

    def unnamed(scope: int, expected: list[str]) -> list[np.ndarray]:
        tensors = sorted(per_scope[scope])
        if [k for _, k in tensors] != expected:
            raise ValueError(f"scope {scope}: unexpected tensor order {[k for _, k in tensors]}")
        return [dequantize(init, f"onnx::MatMul_{n}") if k == "MatMul" else init[f"onnx::{k}_{n}"] for n, k in tensors]

    expert_kinds = ["MatMul", "Add", "MatMul", "Add", "LayerNormalization", "LayerNormalization"] * E
    for i in range(config.num_hidden_layers):
        pre = f"bert.encoder.layer.{i}"
        if fused_qkv:
            qkv = dequantize(init, f"Attention_{i}_qkv_weight")  # [d, 3d]: x @ [Wq | Wk | Wv]
            qkv_bias = init[f"Attention_{i}_qkv_bias"]
            for j, part in enumerate(("query", "key", "value")):
                sd[f"{pre}.attention.self.{part}.weight"] = qkv[:, j * d : (j + 1) * d].T
                sd[f"{pre}.attention.self.{part}.bias"] = qkv_bias[j * d : (j + 1) * d]
            value = unnamed(i, ["MatMul"] + expert_kinds)
            sd[f"{pre}.attention.output.dense.weight"] = value.pop(0).T  # MatMul weight [in, out] → [out, in]
            named(f"{pre}.attention.output.dense.bias")
        else:
            for part in ("query", "key", "value"):
                linear(f"{pre}.attention.self.{part}")
            linear(f"{pre}.attention.output.dense")
            value = unnamed(i, expert_kinds)
        for key in ("LayerNorm.weight", "LayerNorm.bias"):
            named(f"{pre}.attention.output.{key}")
        experts = [value[6 * e : 6 * e + 6] for e in range(E)]
        for slot, name in enumerate(("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "ln_weight", "ln_bias")):
            sd[f"{pre}.moe.{name}"] = np.stack([ex[slot] for ex in experts])
        named(f"{pre}.moe.router.table")
    if task == "qa":
        (weight,) = unnamed(-1, ["MatMul"])
        sd["qa_outputs.weight"] = weight.T
        named("qa_outputs.bias")
    else:
        linear("bert.pooler.dense")
        linear("classifier")
    return {k: torch.from_numpy(np.array(v, dtype=v.dtype, copy=True)) for k, v in sd.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundled model folder holding config.json, tokenizer and onnx/model.int8.onnx")
    p.add_argument("output", help="checkpoint folder to write (safetensors + config + tokenizer)")
    args = p.parse_args()
    try:
        recover_bundle(Path(args.bundle), Path(args.output))
    except KeyError as err:  # a tensor the earlier export names is missing: one line, no traceback
        sys.exit(f"{args.bundle}: no tensor {err} in its graph: not an int8 graph of a MoEBERT export")
    except (OSError, ValueError) as err:
        sys.exit(f"{args.bundle}: cannot recover weights: {err}")


def recover_bundle(bundle: Path, out: Path) -> None:
    config = load_config(bundle)
    qa = "MoEBertForQuestionAnswering" in (config.architectures or [])
    model = (MoEBertForQuestionAnswering if qa else MoEBertForSequenceClassification)(config)
    state = recover(bundle / "onnx" / "model.int8.onnx", config, "qa" if qa else "classification")
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
