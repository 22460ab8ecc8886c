"""Which runtime `moebert serve` picks per model: auto takes the fastest CPU export a folder holds
(int8, then fp32 ONNX), else torch; an explicit choice is honoured or refused with a clear message."""

from __future__ import annotations

import pytest

from server.backends import resolve_backend


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
