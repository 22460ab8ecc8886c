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

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
pytestmark = pytest.mark.skipif(not Path(TORCHRUN).exists() and shutil.which("torchrun") is None,
                                reason="torchrun not installed")  # fmt: skip


def run_torchrun(launch: list[str], out: Path, program: list[str] | None = None, timeout_s: int = 180) -> None:
    """2 processes under torchrun: `program` (default tests/ddp_worker.py writing into `out`)."""
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worker.parent.parent)}
    # Own process group, so that a hang kills torchrun and both workers, not torchrun alone.
    proc = subprocess.Popen(
        [TORCHRUN, *launch, "--nproc_per_node", "2", *(program or [str(worker), str(out)])],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
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
