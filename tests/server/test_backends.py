"""The backends' run settings: ONNX Runtime with denormals flushed on the thread that runs the model; torch
bf16 on a CPU without bf16 matmuls served, with a warning."""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort
import pytest
import torch

from moebert.loading import load_model
from moebert.onnx_export import export_onnx
from server import backends
from server.backends import OnnxBackend, TorchBackend


def denormals_survive() -> bool:
    """Whether this thread keeps denormal float32 results (1e-38 · 1e-3 = 1e-41 < the smallest normal)."""
    return bool(np.float32(1e-38) * np.float32(1e-3) != 0)


@pytest.fixture(scope="module")
def exported_moe(moe_cls_dir, tmp_path_factory):
    result = export_onnx(moe_cls_dir, tmp_path_factory.mktemp("backends") / "onnx")
    return moe_cls_dir, result.files[0]  # model.onnx (fp32)


def test_onnx_backend_runs_with_denormals_flushed_on_its_own_thread(exported_moe, padded_batch):
    checkpoint, file = exported_moe
    # A session made without the setting uses up ORT's once-per-process denormal switch for the calling
    # thread, as any earlier session in a process would: the backend must not depend on being first.
    ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    batch = {k: padded_batch[k].numpy() for k in ("input_ids", "attention_mask", "token_type_ids")}
    seen: dict = {}

    def serve() -> None:  # a fresh thread, as the server's inference thread is
        torch.set_flush_denormal(False)
        seen["before"] = denormals_survive()
        backend = OnnxBackend(file, "fp32", threads=1)
        seen["logits"] = backend.run(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])["logits"]
        seen["after"] = denormals_survive()

    thread = threading.Thread(target=serve)
    thread.start()
    thread.join()
    assert seen["before"] and not seen["after"]
    with torch.inference_mode():  # flushed denormals do not change the answer (the masked weights are ~1e-45)
        ref = load_model(checkpoint)(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    np.testing.assert_allclose(seen["logits"], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_bf16_matmuls_warns(native, moe_cls_dir, monkeypatch, caplog):
    monkeypatch.setattr(backends, "native_cpu_bf16", lambda: native)
    with caplog.at_level("WARNING", logger="moebert.server"):
        backend = TorchBackend(moe_cls_dir, dtype="bfloat16")
    assert backend.name == "torch-bf16"
    warned = [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()]
    assert bool(warned) == (not native), warned
    caplog.clear()
    with caplog.at_level("WARNING", logger="moebert.server"):
        TorchBackend(moe_cls_dir, dtype="float32")
    assert not [r for r in caplog.records if "emulated" in r.getMessage()]


def saturating_int8_matmul(folder) -> tuple[str, np.ndarray, np.ndarray]:
    """A dynamically quantized MatMul whose u8 × s8 product pairs overflow int16: x [4, 64] all 1 (→ u8 255),
    w [64, 8] of 1 and 0.9 (→ s8 127 and 114): each pair is 255 · 241 = 61,455 > 32,767. → (file, x, x @ w)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    k, n = 64, 8
    w = np.where(np.arange(k)[:, None] % 2 == 0, 1.0, 0.9).repeat(n, axis=1).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "fp32.onnx")
    int8 = str(folder / "int8.onnx")
    quantize_dynamic(str(folder / "fp32.onnx"), int8, weight_type=QuantType.QInt8, per_channel=True)
    x = np.ones((4, k), np.float32)
    return int8, x, x @ w


@pytest.mark.parametrize("int8_matmul", ["exact", "fast"])
def test_int8_products_are_exact_unless_fast_on_a_saturating_cpu(int8_matmul, tmp_path):
    """int8_matmul "exact" is exact on every CPU; "fast" saturates exactly where moebert.precision says this CPU
    does (AVX2, AVX-512 without VNNI): the CPU check and ORT's kernels agree."""
    from moebert.precision import int8_products_saturate

    file, x, ref = saturating_int8_matmul(tmp_path)
    options = backends.ort_session_options(1, int8_matmul)
    session = ort.InferenceSession(file, options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    exact = np.allclose(got, ref, rtol=0.01)  # int8 rounding: ≤ 0.5% here
    assert exact == (int8_matmul == "exact" or not int8_products_saturate()), (got[0, 0], ref[0, 0])


@pytest.mark.parametrize("int8_matmul", ["exact", "fast"])
def test_onnx_backend_says_whether_its_int8_products_saturate(int8_matmul, exported_moe, monkeypatch):
    checkpoint, fp32 = exported_moe
    for saturates in (False, True):
        monkeypatch.setattr("moebert.precision.int8_products_saturate", lambda s=saturates: s)
        int8 = OnnxBackend(fp32, "int8", threads=1, int8_matmul=int8_matmul)  # a file path: any precision name
        assert int8.int8_matmul == ("saturating" if saturates and int8_matmul == "fast" else "exact")
    assert OnnxBackend(fp32, "fp32", threads=1, int8_matmul=int8_matmul).int8_matmul is None
    assert TorchBackend.int8_matmul is None


def test_int8_matmul_setting_from_flag_or_environment(monkeypatch):
    from moebert_cli import build_parser
    from server.cli import settings_from_args

    parser = build_parser()
    serve = ["serve", "--model", "m=/x"]
    assert settings_from_args(parser.parse_args(serve)).int8_matmul == "exact"
    assert settings_from_args(parser.parse_args([*serve, "--int8-matmul", "fast"])).int8_matmul == "fast"
    monkeypatch.setenv("MOEBERT_SERVE_INT8_MATMUL", "fast")
    assert settings_from_args(parser.parse_args(serve)).int8_matmul == "fast"
    with pytest.raises(ValueError, match="int8_matmul"):
        settings_from_args(parser.parse_args([*serve, "--int8-matmul", "precise"]))
