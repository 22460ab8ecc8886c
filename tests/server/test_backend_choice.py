"""Which runtime `moebert serve` picks per model: auto runs the runtime that the folder's
backend_speed.json measured fastest (when its files are there); without a measurement, the int8 ONNX
export, then fp32, then torch; an explicit choice is honoured or refused with a clear message."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from server import backends
from server.backends import SPEED_FILE, make_backend, resolve_backend


def folder(tmp_path, *files):
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


@pytest.mark.parametrize(
    ("files", "backend", "precision", "device", "want"),
    [
        (["model.safetensors"], "auto", "auto", "cpu", ("torch", "fp32")),
        (["model.safetensors", "onnx/model.onnx"], "auto", "auto", "cpu", ("onnx", "fp32")),
        (["model.safetensors", "onnx/model.onnx", "onnx/model.int8.onnx"], "auto", "auto", "cpu", ("onnx", "int8")),
        (["onnx/model.int8.onnx"], "auto", "auto", "cpu", ("onnx", "int8")),  # a bundled serving-only folder
        (["model.safetensors", "onnx/model.int8.onnx"], "torch", "auto", "cpu", ("torch", "fp32")),
        (["model.safetensors", "onnx/model.onnx", "onnx/model.int8.onnx"], "onnx", "fp32", "cpu", ("onnx", "fp32")),
        (["model.safetensors", "onnx/model.int8.onnx"], "auto", "auto", "cuda", ("torch", "fp32")),  # Triton
        (["onnx/model.int8.onnx"], "auto", "auto", "cuda", ("onnx", "int8")),  # export-only: ORT, even on CUDA
    ],
)
def test_choice(tmp_path, files, backend, precision, device, want):
    assert resolve_backend(folder(tmp_path, *files), backend, precision, device) == want


def test_torch_without_weights_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="no torch weights.*--backend onnx"):
        resolve_backend(folder(tmp_path, "onnx/model.int8.onnx"), "torch", "auto", "cpu")
    with pytest.raises(FileNotFoundError, match="no torch weights"):
        resolve_backend(folder(tmp_path / "empty"), "auto", "auto", "cpu")


ALL = ["model.safetensors", "onnx/model.onnx", "onnx/model.int8.onnx"]


@pytest.mark.parametrize(
    ("files", "fastest", "want"),
    [
        (ALL, "torch", ("torch", "fp32")),  # measured: torch beats the int8 export the folder also holds
        (ALL, "onnx-fp32", ("onnx", "fp32")),
        (ALL, "onnx-int8", ("onnx", "int8")),
        (["onnx/model.int8.onnx"], "onnx-int8", ("onnx", "int8")),  # a bundled serving-only folder
        (["onnx/model.int8.onnx"], "torch", ("onnx", "int8")),  # measured runtime's files absent: fallback
        (["model.safetensors"], "onnx-int8", ("torch", "fp32")),
    ],
)
def test_auto_runs_the_measured_fastest(tmp_path, files, fastest, want):
    path = folder(tmp_path, *files)
    (path / SPEED_FILE).write_text(json.dumps({"fastest": fastest, "shapes": ["1x24"], "ms": {}}))
    assert resolve_backend(path, "auto", "auto", "cpu") == want
    if "model.safetensors" in files:
        assert resolve_backend(path, "auto", "auto", "cuda") == ("torch", "fp32")  # the measurement is CPU's
    if "onnx/model.onnx" in files:
        assert resolve_backend(path, "onnx", "fp32", "cpu") == ("onnx", "fp32")  # an explicit choice wins


@pytest.mark.parametrize("content", ["{not json", '{"fastest": "tpu"}', "[]"])
def test_unreadable_measurement_falls_back(tmp_path, content):
    path = folder(tmp_path, *ALL)
    (path / SPEED_FILE).write_text(content)
    assert resolve_backend(path, "auto", "auto", "cpu") == ("onnx", "int8")


@pytest.mark.parametrize("native", [True, False])
def test_auto_runs_torch_bf16_only_on_a_cpu_with_native_bf16(tmp_path, monkeypatch, native):
    """A torch-bf16 measurement is acted on where the CPU has bf16 matmuls; elsewhere (emulated bf16 is
    slower than fp32) auto falls back as if nothing had been measured."""
    monkeypatch.setattr(backends, "native_cpu_bf16", lambda: native)
    path = folder(tmp_path, *ALL)
    (path / SPEED_FILE).write_text(json.dumps({"fastest": "torch-bf16", "shapes": ["16x256"], "ms": {}}))
    assert resolve_backend(path, "auto", "auto", "cpu") == (("torch", "bf16") if native else ("onnx", "int8"))
    assert resolve_backend(path, "torch", "auto", "cpu") == ("torch", "fp32")  # explicit torch: as trained


def test_measured_torch_bf16_serves_bf16_weights_close_to_fp32(tiny_cls_dir, tmp_path, monkeypatch):
    """make_backend turns the torch-bf16 choice into bfloat16 weights (named so in logs and metrics); its
    logits agree with the fp32 model's within bf16's tolerance (5e-2 on O(1) logits of a tiny model), and
    an explicit --dtype still wins."""
    monkeypatch.setattr(backends, "native_cpu_bf16", lambda: True)
    path = shutil.copytree(tiny_cls_dir, tmp_path / "model")
    (path / SPEED_FILE).write_text(json.dumps({"fastest": "torch-bf16", "shapes": ["1x9"], "ms": {}}))
    bf16 = make_backend(str(path), "auto", "auto", "cpu", 1)
    fp32 = make_backend(str(path), "auto", "auto", "cpu", 1, dtype="float32")
    assert bf16.name == "torch-bf16" and {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert fp32.name == "torch" and {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    rng = np.random.default_rng(3)
    ids = rng.integers(1000, 2000, (3, 11)).astype(np.int64)
    mask = (np.arange(11)[None, :] < np.array([[11], [5], [8]])).astype(np.int64)
    got, want = (b.run(ids * mask, mask, np.zeros_like(ids))["logits"] for b in (bf16, fp32))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=5e-2, rtol=5e-2)
