"""The training loop under torchrun with 2 CPU processes (gloo): both ranks end with identical weights,
launched single-node (--standalone) and as a multi-node job would be (--nnodes with a c10d rendezvous
endpoint; here one node of the job, on localhost). docs/multinode.md describes the real multi-node run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from server_process import free_port

from tests.conftest import REPO

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
pytestmark = pytest.mark.skipif(not Path(TORCHRUN).exists() and shutil.which("torchrun") is None,
                                reason="torchrun not installed")  # fmt: skip


def run_torchrun(launch: list[str], out: Path, program: list[str] | None = None, timeout_s: int = 180) -> None:
    """2 processes under torchrun: `program` (default tests/ddp_worker.py, writing into `out`)."""
    # As a module from the repository root: run as a file, tests/ would come first on sys.path and its
    # test packages (tests/moebert/, ...) would shadow the project's.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # Own process group, so that a hang kills torchrun and both workers, not torchrun alone.
    proc = subprocess.Popen(
        [TORCHRUN, *launch, "--nproc_per_node", "2", *(program or ["-m", "tests.ddp_worker", str(out)])],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"torchrun did not finish in {timeout_s} s")
    assert proc.returncode == 0, stderr[-3000:]


def check_ranks_agree(out: Path) -> None:
    rank0, rank1 = ((out / f"rank{r}.txt").read_text().split() for r in (0, 1))
    assert rank0[0] == rank1[0]  # same start
    assert rank0[1] == rank1[1]  # same end: gradients were all-reduced
    assert rank0[1] != rank0[0]  # and training changed the weights


def test_two_cpu_ranks_agree(tmp_path):
    run_torchrun(["--standalone"], tmp_path)
    check_ranks_agree(tmp_path)


def test_multinode_launch_with_a_rendezvous_endpoint(tmp_path):
    port = free_port()
    run_torchrun(
        ["--nnodes", "1", "--node-rank", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}",
         "--rdzv-id", "moebert-test", "--max-restarts", "0"],
        tmp_path,
    )  # fmt: skip
    check_ranks_agree(tmp_path)
    envs = [json.loads((tmp_path / f"env{r}.json").read_text()) for r in (0, 1)]
    assert [e["RANK"] for e in envs] == ["0", "1"] and {e["LOCAL_RANK"] for e in envs} == {"0", "1"}
    assert all(e["WORLD_SIZE"] == "2" and e["LOCAL_WORLD_SIZE"] == "2" and e["GROUP_RANK"] == "0" for e in envs)
    assert all(e["MASTER_ADDR"] and e["MASTER_PORT"] for e in envs)


def test_pipeline_under_torchrun(tiny_cls_dir, custom_data, tmp_path):
    """Every stage under 2 gloo ranks: rank 0 scores importance and converts while rank 1 waits, both train,
    rank 0 evaluates; the run folder ends as a single-process run leaves it."""
    train, dev = custom_data
    out = tmp_path / "run"
    args = [
        "pipeline", "--task", "custom", "--data-dir", str(train), "--dev-file", str(dev), "-o", str(out),
        "--teacher", str(tiny_cls_dir), "--finetune-epochs", "1", "--epochs", "1", "--batch-size", "4",
        "--samples", "8", "--expert-dim", "21", "--shared-dim", "7", "--max-length", "32",
    ]  # fmt: skip
    run_torchrun(["--standalone"], out, ["-m", "moebert_cli", *args], timeout_s=300)
    for stage in ("teacher", "moe", "student"):
        assert (out / stage / "stage.json").is_file() and (out / stage / "config.json").is_file()
    assert (out / "importance.safetensors").is_file() and (out / "results.json").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no scratch or half-written folders


DRIVER = """
import contextlib, json, os, sys
from pathlib import Path
from moebert_cli import main

# Each rank's stdout to its own file: what a command prints under torchrun, rank by rank.
with open(Path(sys.argv[1]) / f"stdout{os.environ['RANK']}.txt", "w") as out, contextlib.redirect_stdout(out):
    codes = [main(args) for args in json.loads(sys.argv[2])]
sys.exit(max(codes))
"""


def tiny_bert_with_tokenizer(folder: Path, words: list[str]) -> Path:
    """A tiny random BERT classifier and a word-level BERT tokenizer over `words` (no download, no MiniLM)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64, num_labels=2)  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def test_whole_pipeline_and_single_process_stages_under_torchrun(tmp_path):
    """2 gloo ranks, self-contained (a tiny random BERT built here, synthetic data in tmp_path): the pipeline
    with hash-balance (rank 0 scores importance, counts tokens, converts and evaluates while rank 1 waits;
    both train), then `evaluate` and `importance` on their own. Every output is written once, by rank 0,
    with its stage record; only rank 0 prints."""
    good = ["a fine warm film", "truly great fun", "a joy to watch", "warm and great"]
    bad = ["a dull cold mess", "truly awful stuff", "a bore to watch", "cold and dull"]
    words = " ".join(good + bad).split()
    teacher = tiny_bert_with_tokenizer(tmp_path / "bert", words)
    for name in ("train", "dev"):
        rows = [(t, "pos") for t in good] + [(t, "neg") for t in bad]
        (tmp_path / f"{name}.csv").write_text("review,label\n" + "".join(f"{t},{y}\n" for t, y in rows * 2))
    out = tmp_path / "run"
    data = ["--task", "custom", "--data-dir", str(tmp_path / "train.csv"), "--dev-file", str(tmp_path / "dev.csv"),
            "--text-column", "review", "--max-length", "16"]  # fmt: skip
    commands = [
        ["pipeline", *data, "-o", str(out), "--teacher", str(teacher), "--finetune-epochs", "1", "--epochs", "1",
         "--batch-size", "4", "--samples", "8", "--expert-dim", "12", "--shared-dim", "4", "--route", "hash-balance"],
        ["evaluate", str(out / "student"), *data, "--output", str(tmp_path / "eval.json")],
        ["importance", str(out / "teacher"), *data, "--samples", "4", "--output", str(tmp_path / "imp.safetensors")],
    ]  # fmt: skip
    (tmp_path / "driver.py").write_text(DRIVER)
    run_torchrun(["--standalone"], out, [str(tmp_path / "driver.py"), str(tmp_path), json.dumps(commands)],
                 timeout_s=420)  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [
        "balance_counts.safetensors", "balance_counts.stage.json", "eval_moebert.json", "eval_moebert.stage.json",
        "eval_teacher.json", "eval_teacher.stage.json", "importance.safetensors", "importance.stage.json", "moe",
        "results.json", "student", "teacher",
    ]  # fmt: skip
    for stage in ("teacher", "moe", "student"):
        assert (out / stage / "stage.json").is_file() and (out / stage / "config.json").is_file()
    assert json.loads((out / "moe" / "stage.json").read_text())["stage"] == "convert"
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"teacher", "moebert"}
    assert (tmp_path / "eval.stage.json").is_file() and (tmp_path / "imp.stage.json").is_file()
    assert (tmp_path / "stdout1.txt").read_text() == ""  # rank 1 printed nothing: no "{}", no second result
    printed = (tmp_path / "stdout0.txt").read_text()
    assert printed.count('"moebert"') == 1 and printed.count(str(tmp_path / "imp.safetensors")) == 1
    assert json.loads((tmp_path / "eval.json").read_text())["results"]["dev"]["examples"] == 16
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch or half-written files
