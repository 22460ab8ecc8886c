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
