"""The training loop under torchrun with 2 CPU processes (gloo): both ranks end with identical weights."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not installed",
)
def test_two_cpu_ranks_agree(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worker.parent.parent)}
    # Own process group, so that a hang kills torchrun and both workers, not torchrun alone.
    proc = subprocess.Popen(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(worker), str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("torchrun did not finish in 180 s")
    assert proc.returncode == 0, stderr[-3000:]
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1))
    assert rank0[0] == rank1[0]  # same start
    assert rank0[1] == rank1[1]  # same end: gradients were all-reduced
    assert rank0[1] != rank0[0]  # and training changed the weights


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not installed",
)
def test_pipeline_under_torchrun(tiny_cls_dir, custom_data, tmp_path):
    """Every stage under 2 gloo ranks: rank 0 scores importance and converts while rank 1 waits, both train,
    rank 0 evaluates; the run folder ends as a single-process run leaves it."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    train, dev = custom_data
    out = tmp_path / "run"
    args = [
        "pipeline", "--task", "custom", "--data-dir", str(train), "--dev-file", str(dev), "-o", str(out),
        "--teacher", str(tiny_cls_dir), "--finetune-epochs", "1", "--epochs", "1", "--batch-size", "4",
        "--samples", "8", "--expert-dim", "21", "--shared-dim", "7", "--max-length", "32",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "moebert.cli", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("torchrun pipeline did not finish in 300 s")
    assert proc.returncode == 0, stderr[-3000:]
    for stage in ("teacher", "moe", "student"):
        assert (out / stage / "stage.json").is_file() and (out / stage / "config.json").is_file()
    assert (out / "importance.safetensors").is_file() and (out / "results.json").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no scratch or half-written folders
