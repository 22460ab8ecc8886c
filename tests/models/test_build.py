"""models/build.py: the bundle's form follows the runtime measured fastest, and the card describes each form."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "models"))
import build  # noqa: E402

from tests.tiny_moebert import tiny_model  # noqa: E402


@pytest.mark.parametrize(
    "fastest, ok, refused",
    [("onnx-int8", "onnx-int8", "fp16"), ("torch", "fp16", "onnx-int8"), ("torch-bf16", "fp16+onnx-int8", "onnx-int8")],
)
def test_form_follows_the_fastest_runtime(tmp_path, fastest, ok, refused):
    (tmp_path / "backend_speed.json").write_text(json.dumps({"fastest": fastest}))
    build._check_speed_record(tmp_path, ok)
    with pytest.raises(SystemExit, match=fastest):
        build._check_speed_record(tmp_path, refused)


def test_card_of_both_forms_lists_each_served_form(tmp_path):
    student = tmp_path / "run" / "moebert" / "student"
    student.mkdir(parents=True)
    (student / "backend_speed.json").write_text(json.dumps({"fastest": "torch-bf16", "command": "python b.py"}))
    args = SimpleNamespace(name="squad", run=str(tmp_path / "run"), row="moebert", task="squad",
                           format="fp16+onnx-int8", max_length=256, rebuild="python q.py", budget="", why="",
                           served_eval=None)  # fmt: skip
    metrics = {"teacher": {"f1": 76.8}, "moebert": {"f1": 72.3}, "moebert_int8": {"f1": 72.0},
               "moebert_bf16": {"f1": 72.2}}  # fmt: skip
    text = build.card(args, tiny_model("hash-random", task="qa").config, metrics)
    assert "| MoEBERT int8 ONNX (served) | MoEBERT bf16 torch (served) |" in text
    assert "| f1 | 76.80 | 72.30 | 72.00 | 72.20 |" in text
    assert "|---|---:|---:|---:|---:|" in text  # one column per served form
    assert "fp16 safetensors and a dynamically quantized int8 ONNX graph" in text
    assert "Loading without this project" in text  # torch weights travel: portable code
    assert "--runtimes torch onnx-int8 torch-bf16" in text
