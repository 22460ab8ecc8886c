"""ONNX export: ORT-vs-torch parity for dense and MoE models
(every routing method, classification and QA), int8 quantization, and the server's onnx backend."""

from __future__ import annotations

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

FP32_ATOL = 1e-5  # measured ≤ 1e-7 on these models; ORT fuses attention and GELU (exact erf) differently
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


def test_attention_is_fused_and_gelu_exact(exported):
    _, result = exported["cls-hash-random"]
    assert result.fused_operators.get("Attention") == 3  # one per layer of the tiny model
    graph = onnx.load(str(result.files[0])).graph
    ops = {n.op_type for n in graph.node}
    assert "Attention" in ops and "FastGelu" not in ops  # exact erf GELU, not the tanh approximation
    assert [o.name for o in graph.output] == ["logits", "expert_counts"]


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
