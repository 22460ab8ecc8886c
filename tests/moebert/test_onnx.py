"""ONNX export: ORT-vs-torch parity for dense and MoE models
(every routing method, classification and QA), int8 quantization, and the server's onnx backend."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import torch
from server_process import ServerProcess

from moebert.convert import ConvertConfig, convert
from moebert.loading import load_model
from moebert.onnx_export import example_batch, export_onnx, max_deviation
from server.backends import OnnxBackend

FP32_ATOL = 1e-5  # measured ≤ 1e-7 on these models; ORT fuses GELU (exact erf) and LayerNorm differently
INT8_ATOL = 0.25  # dynamic int8 on a random tiny model: a loose bound that still catches a broken graph


@pytest.fixture(scope="module")
def checkpoints(tiny_cls_dir, tiny_qa_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    out = {"cls-dense": tiny_cls_dir, "qa-dense": tiny_qa_dir}
    for route in ("hash-random", "gate-token", "gate-sentence"):
        out[f"cls-{route}"] = convert(ConvertConfig(
            teacher=str(tiny_cls_dir), output_dir=str(root / f"cls-{route}"), split="random", expert_dim=21,
            shared_dim=7, route=route,
        ))  # fmt: skip
    out["qa-hash-random"] = convert(ConvertConfig(
        teacher=str(tiny_qa_dir), output_dir=str(root / "qa-moe"), split="random", expert_dim=21, shared_dim=7
    ))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_out")
    return {name: (path, export_onnx(path, root / name, quantize=True)) for name, path in checkpoints.items()}


CASES = ["cls-dense", "qa-dense", "cls-hash-random", "cls-gate-token", "cls-gate-sentence", "qa-hash-random"]


@pytest.mark.parametrize("name", CASES)
def test_ort_matches_torch(exported, name):
    path, result = exported[name]
    fp32, int8 = result.files[0], result.files[1]
    assert result.max_abs_diff["fp32"] <= FP32_ATOL
    model = load_model(path)
    moe = bool(model.config.moe_layers)
    fp32_backend = OnnxBackend(fp32, threads=1)
    assert fp32_backend.is_moe == moe
    # Shapes never seen at export: one long unpadded row, a wide batch with ragged padding.
    g = torch.Generator().manual_seed(7)
    batches = [
        example_batch(model.config.vocab_size, 1, 60, seed=11),
        example_batch(model.config.vocab_size, 9, 33, seed=12),
    ]
    batches.append((torch.randint(1000, 30000, (3, 5), generator=g), torch.ones(3, 5, dtype=torch.long),
                    torch.zeros(3, 5, dtype=torch.long)))  # fmt: skip
    # Rows of 1, 2 and 7 real tokens in a width-7 batch: experts that get no token in some layer.
    lengths = torch.tensor([1, 2, 7])
    mask = (torch.arange(7) < lengths[:, None]).long()
    batches.append((torch.randint(1000, 30000, (3, 7), generator=g) * mask, mask, torch.zeros_like(mask)))
    assert max_deviation(model, fp32_backend.session, batches) <= FP32_ATOL
    assert max_deviation(model, OnnxBackend(int8, threads=1).session, batches) <= INT8_ATOL
    if moe:  # the routing inside the graph: the same tokens per expert per layer as torch
        for ids, mask, types_ in batches:
            got = fp32_backend.run(ids.numpy(), mask.numpy(), types_.numpy())["expert_counts"]
            with torch.inference_mode():
                ref = model(ids, mask, types_, output_expert_counts=True).expert_counts.numpy()
            np.testing.assert_array_equal(got, ref)
            assert got.sum() == mask.sum() * len(model.config.moe_layers)


@pytest.mark.parametrize("name", ["cls-dense", "cls-hash-random", "qa-hash-random"])
@pytest.mark.parametrize("precision", [0, 1])  # files[0] fp32, files[1] int8
def test_padding_is_removed_from_every_projection(exported, name, precision, tmp_path):
    """Every matmul with a weight runs on the N real tokens, not on B*T padded positions: in ORT's profile of
    a batch that is mostly padding, each 2-D MatMul/Gemm input has N rows, and only the attention core's
    batched matmuls (rank 4) see the padded layout; no fused Attention op (it projects every position)."""
    import json

    import onnxruntime as ort

    path, result = exported[name]
    file = result.files[precision]
    ops = {n.op_type for n in onnx.load(str(file)).graph.node}
    assert "Attention" not in ops and "QAttention" not in ops
    if precision == 0:
        assert "Gelu" in ops and "FastGelu" not in ops  # exact erf GELU, not the tanh approximation
    lengths = torch.tensor([3, 9, 1, 5])  # N = 18 real tokens of B*T = 4 * 11 = 44
    mask = (torch.arange(11) < lengths[:, None]).long()
    ids = torch.randint(1000, 30000, (4, 11)) * mask
    options = ort.SessionOptions()
    options.enable_profiling, options.profile_file_prefix = True, str(tmp_path / "prof")
    session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": 0 * ids.numpy()})
    events = json.loads(Path(session.end_profiling()).read_text())
    shapes = {}  # op type → first input shapes seen
    for e in events:
        op = e.get("args", {}).get("op_name")
        if e.get("cat") == "Node" and op in ("MatMul", "Gemm", "FusedMatMul", "DynamicQuantizeMatMul", "MatMulInteger"):
            first = next(iter(e["args"]["input_type_shape"][0].values()))
            shapes.setdefault(op, []).append(first)
    flat = [s for v in shapes.values() for s in v]
    assert flat, shapes
    # The QA head (2 outputs per position) is the one matmul left on the padded [B, T, d] layout.
    assert sum(len(s) == 3 for s in flat) == (1 if name.startswith("qa") else 0), shapes
    for shape in flat:
        assert len(shape) in (2, 3, 4), shapes  # [rows, d] projections, or the [B, heads, T, ·] core
        if len(shape) == 2:
            assert shape[0] <= int(lengths.sum()), shapes  # N real tokens (an expert: its share of them)
    assert any(len(s) == 2 and s[0] == int(lengths.sum()) for s in flat)
    # The attention core: plain batched matmuls (classifiers), or one fused op per layer (QA, see export_onnx)
    fused = name.startswith("qa")
    assert any(len(s) == 4 for s in flat) != fused, shapes
    assert ("MultiHeadAttention" in ops) == fused
    graph = onnx.load(str(result.files[0])).graph
    assert [o.name for o in graph.output][0] in ("logits", "start_logits")


@pytest.mark.parametrize("name", ["cls-dense", "qa-dense", "cls-hash-random", "cls-gate-sentence"])
def test_tokens_stay_packed_between_layers(exported, name):
    """The N real tokens pass from layer to layer as [N, d]: one ScatterND writes them back to [B*T, d] at the
    end, and the padded attention layout is filled by row Gathers, not by scatters into zeros (each
    ScatterND copies its whole [B*T, d] input first). An MoE layer adds one row ScatterND of its experts'
    outputs."""
    path, result = exported[name]
    moe_layers = len(load_model(path).config.moe_layers)
    for file in result.files[:2]:  # fp32, int8
        ops = [n.op_type for n in onnx.load(str(file)).graph.node]
        assert ops.count("ScatterND") == 1 + moe_layers, (file.name, ops.count("ScatterND"))


@pytest.mark.parametrize(("name", "attention"), [("cls-hash-random", "fused"), ("qa-hash-random", "plain")])
def test_either_attention_core_matches_torch(checkpoints, exported, name, attention, tmp_path):
    """The other core than `auto` picks for the task: the same function (fp32 parity, and int8 within its bound
    of the auto export's outputs), and export.json says which core the graph has."""
    path = checkpoints[name]
    result = export_onnx(path, tmp_path, quantize=True, attention=attention)
    assert result.max_abs_diff["fp32"] <= FP32_ATOL and result.max_abs_diff["int8"] <= INT8_ATOL
    ops = {n.op_type for n in onnx.load(str(result.files[0])).graph.node}
    assert ("MultiHeadAttention" in ops) == (attention == "fused")
    info = json.loads((tmp_path / "export.json").read_text())
    assert info["attention"] == ("com.microsoft.MultiHeadAttention" if attention == "fused" else "plain ops")
    model = load_model(path)
    lengths = torch.tensor([1, 6, 13])  # a row of one token; odd lengths
    mask = (torch.arange(13) < lengths[:, None]).long()
    ids = torch.randint(1000, 30000, (3, 13)) * mask
    assert max_deviation(model, OnnxBackend(result.files[0], threads=1).session, [(ids, mask, 0 * ids)]) <= FP32_ATOL


def test_unknown_attention_core_is_refused(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="unknown attention core"):
        export_onnx(checkpoints["cls-dense"], tmp_path, attention="flash")


def test_export_cli_writes_where_serve_looks(checkpoints, tmp_path):
    import shutil
    import subprocess
    import sys

    model = shutil.copytree(checkpoints["cls-dense"], tmp_path / "m")
    run = subprocess.run([sys.executable, "-m", "moebert_cli", "export-onnx", str(model), "--quantize"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (model / "onnx" / "model.onnx").is_file() and (model / "onnx" / "model.int8.onnx").is_file()
    bad = subprocess.run([sys.executable, "-m", "moebert_cli", "export-onnx", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_server_onnx_backend_matches_torch_backend(exported, tmp_path):
    import shutil

    # `serve --backend onnx` reads <checkpoint>/onnx/model.onnx: lay the exported files out that way.
    served = {}
    for name in ("cls-hash-random", "qa-hash-random"):
        path, result = exported[name]
        target = shutil.copytree(path, tmp_path / name)
        shutil.copytree(result.files[0].parent, target / "onnx")
        served[name] = target
    texts = ["a gorgeous, witty, seductive movie.", "ok", "the plot is paper-thin " * 4]
    body = {"inputs": texts, "model": "cls-hash-random", "all_scores": True, "raw_scores": True}
    qa = {"question": "Who designed it?", "context": "It was designed by the company of Gustave Eiffel. " * 6,
          "model": "qa-hash-random", "max_seq_len": 64, "doc_stride": 16, "top_k": 2}  # fmt: skip
    answers = {}
    # auto (the default) takes the int8 export the folders hold; fp32 is asked for by name.
    runs = {"torch": ["--backend", "torch"], "onnx": ["--onnx-precision", "fp32"], "onnx-int8": []}
    for backend, flags in runs.items():
        with ServerProcess(served, *flags, "--threads", "1") as proc:
            info = httpx.get(proc.url + "/v1/models").json()["models"]
            assert {m["backend"] for m in info} == {backend}
            answers[backend] = (
                httpx.post(proc.url + "/v1/classify", json=body, timeout=30).json(),
                httpx.post(proc.url + "/v1/qa", json=qa, timeout=30).json(),
            )
            metrics = httpx.get(proc.url + "/metrics").text
            assert 'moebert_expert_tokens_total{expert="0",layer="0",model="cls-hash-random"}' in metrics
    (cls_t, qa_t), (cls_o, qa_o) = answers["torch"], answers["onnx"]
    for a, b in zip(cls_t["results"], cls_o["results"], strict=True):
        assert a["label"] == b["label"]
        np.testing.assert_allclose([x["score"] for x in a["labels"]], [x["score"] for x in b["labels"]], atol=FP32_ATOL)
    assert [x["start"] for x in qa_t["results"][0]["answers"]] == [x["start"] for x in qa_o["results"][0]["answers"]]
