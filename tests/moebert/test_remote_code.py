"""A MoEBERT folder travels: in a Python that has torch and transformers but cannot import this project,
`trust_remote_code=True` loads it through the Auto classes and `pipeline(...)`, with the same outputs as
the project's own loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, pipeline

from moebert.convert import ConvertConfig, convert
from moebert.loading import load_model
from moebert.remote_code import AUTO_MAP, CONFIG_FILE, MODELING_FILE
from tests.conftest import SENTENCES

# Runs with `python -I -S`: no PYTHONPATH, no cwd, no .pth files (so no editable install of this project);
# only the interpreter's site-packages directory is put back on the path.
IN_CLEAN_PYTHON = r"""
import json, sys
sys.path.append(sys.argv[1])
try:
    import moebert  # noqa: F401
except ImportError:
    pass
else:
    sys.exit("moebert is importable: the test environment is not clean")
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification, pipeline

folder, task, batch_path, out_path = sys.argv[2:6]
batch = load_file(batch_path)
cls = AutoModelForQuestionAnswering if task == "qa" else AutoModelForSequenceClassification
# dtype: bundled folders may store fp16 weights; the project loads them back in fp32.
model = cls.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    out = model(**batch)
tensors = {"start": out.start_logits, "end": out.end_logits} if task == "qa" else {"logits": out.logits}
save_file({k: v.contiguous() for k, v in tensors.items()}, out_path)
if task != "qa":  # transformers 5 has no question-answering pipeline any more
    texts = json.loads(sys.argv[6])
    result = pipeline("text-classification", model=folder, trust_remote_code=True, top_k=None)(texts)
    print("RESULT" + json.dumps(result))
"""


def run_clean(folder: Path, task: str, batch: dict, texts: list[str], tmp_path: Path) -> tuple[dict, object]:
    save_file({k: v.contiguous() for k, v in batch.items()}, tmp_path / "batch.safetensors")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "MOEBERT"))}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = [sysconfig.get_paths()["purelib"], str(folder), task, str(tmp_path / "batch.safetensors")]
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", IN_CLEAN_PYTHON, *args, str(tmp_path / "out.st"), json.dumps(texts)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    return load_file(tmp_path / "out.st"), json.loads(lines[0][len("RESULT") :]) if lines else None


def test_clean_python_cannot_import_moebert(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", f"import sys; sys.path.append({sysconfig.get_paths()['purelib']!r}); "
         "import transformers, torch; import moebert"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0 and "No module named 'moebert'" in proc.stderr


def _check_folder(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    for name in (CONFIG_FILE, MODELING_FILE):
        text = (folder / name).read_text()
        for forbidden in ("from moebert", "import moebert", "from kernels", "import kernels"):
            assert forbidden not in text, (name, forbidden)


@pytest.mark.parametrize("route", ["hash-random", "gate-sentence"])
def test_converted_classifier_loads_without_the_project(route, tiny_cls_dir, padded_batch, tmp_path):
    folder = convert(ConvertConfig(
        teacher=str(tiny_cls_dir), output_dir=str(tmp_path / "moe"), split="random", route=route,
        expert_dim=21, shared_dim=7, seed=3,
    ))  # fmt: skip
    _check_folder(folder)
    model = load_model(folder)
    with torch.no_grad():
        expected = model(**padded_batch).logits
    got, result = run_clean(folder, "cls", padded_batch, SENTENCES[:3], tmp_path)
    torch.testing.assert_close(got["logits"], expected, rtol=1e-5, atol=1e-6)
    # The pipeline's scores: the softmax of the project's logits on the same (unpadded) sentences.
    tok = AutoTokenizer.from_pretrained(folder)
    ours = pipeline("text-classification", model=model, tokenizer=tok, top_k=None)(SENTENCES[:3])
    for theirs_row, ours_row in zip(result, ours, strict=True):
        theirs_scores = {r["label"]: r["score"] for r in theirs_row}
        for r in ours_row:
            assert theirs_scores[r["label"]] == pytest.approx(r["score"], abs=1e-5)


def test_converted_qa_model_loads_without_the_project(tiny_qa_dir, padded_batch, tmp_path):
    folder = convert(ConvertConfig(
        teacher=str(tiny_qa_dir), output_dir=str(tmp_path / "moe"), split="random", expert_dim=21, shared_dim=7,
    ))  # fmt: skip
    _check_folder(folder)
    model = load_model(folder)
    with torch.no_grad():
        out = model(**padded_batch)
    got, _ = run_clean(folder, "qa", padded_batch, [], tmp_path)
    torch.testing.assert_close(got["start"], out.start_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["end"], out.end_logits, rtol=1e-5, atol=1e-5)
