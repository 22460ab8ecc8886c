"""models/recover_from_int8.py: a bundle's int8 graph gives back torch weights that export to the same graph."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "models"))
import recover_from_int8  # noqa: E402

from moebert.loading import load_model  # noqa: E402
from moebert.onnx_export import export_onnx  # noqa: E402
from tests.tiny_moebert import batch, tiny_model  # noqa: E402


def _int8_outputs(folder: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(folder / "onnx" / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


@pytest.mark.parametrize("task", ["cls", "qa"])
def test_recovered_weights_export_to_the_same_int8_graph(tmp_path, task):
    source, recovered = tmp_path / "bundle", tmp_path / "recovered"
    model = tiny_model("hash-random", task=task, moe_layers=(0, 1, 2))
    model.save_pretrained(source)
    export_onnx(source, quantize=True)
    recover_from_int8.recover_bundle(source, recovered)

    # Each weight is its int8 value dequantized: within half a quantization step of the trained weight.
    got = load_model(recovered).state_dict()
    for name, want in model.state_dict().items():
        if name.endswith("kept_neurons"):
            continue
        step = float(want.abs().max()) / 127 if want.is_floating_point() else 0.0
        torch.testing.assert_close(got[name], want, atol=step, rtol=0, msg=name)
    assert any(not torch.equal(got[n], w) for n, w in model.state_dict().items() if w.is_floating_point())

    # Quantized again, the recovered weights are the same int8 weights: the same outputs, bit for bit.
    export_onnx(recovered, quantize=True)
    feed = {k: v.numpy() for k, v in batch([5, 9, 2, 9], seed=3).items()}
    for a, b in zip(_int8_outputs(source, feed), _int8_outputs(recovered, feed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_graph_of_another_model_is_refused(tmp_path):
    source = tmp_path / "bundle"
    tiny_model("hash-random", moe_layers=(0, 2)).save_pretrained(source)  # layer 1 is dense: not recoverable
    export_onnx(source, quantize=True)
    with pytest.raises((KeyError, ValueError)):
        recover_from_int8.recover_bundle(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
