"""Which runtime `moebert serve` picks per model: auto runs the runtime that the folder's
backend_speed.json measured fastest (when its files are there); without a measurement, the int8 ONNX
export, then fp32, then torch; an explicit choice is honoured or refused with a clear message."""

from __future__ import annotations

import json

import pytest

from server.backends import SPEED_FILE, resolve_backend


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
