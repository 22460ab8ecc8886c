"""CUDA-graph buckets (server.cuda_graphs): the bucket grid covers every batch the batcher can form, a batch
goes to the smallest bucket that holds it, padding up to it changes no real row's output, and the settings
that drive it are validated. On the CPU the runner pads and cuts exactly as on CUDA but runs eagerly; the
`gpu` tests capture real graphs, replay them under torch.cuda.set_sync_debug_mode("error") and compare with
the eager fp32 forward.

Tolerance of the CPU comparison: fp32, atol = rtol = 1e-5 (padded vs packed layout: summation order only).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from server.cuda_graphs import BucketedRunner, graph_buckets, pad_to_bucket, pick_bucket, size_steps, unpad_outputs
from tests.conftest import REPO
from tests.tiny_moebert import batch, tiny_model

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def test_size_steps_are_powers_of_two_and_midpoints():
    assert size_steps(64) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert size_steps(512, start=16) == [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    assert size_steps(100, start=16) == [16, 24, 32, 48, 64, 96, 100]
    assert size_steps(1) == [1] and size_steps(8, start=8) == [8] and size_steps(5, start=16) == [5]


@pytest.mark.parametrize(("max_rows", "max_tokens", "max_seq"), [(24, 1000, 130), (7, 64, 40), (1, 16, 9)])
def test_every_batch_the_batcher_can_form_has_a_bucket_that_wastes_little(max_rows, max_tokens, max_seq):
    """Exhaustive over the batches plan_batches can emit (rows ≤ max_rows; rows × longest ≤ max_tokens, or a lone
    row): each gets a bucket, the bucket is within 1.5× (+ the 16-token floor) per dimension, and no bucket
    is captured that no batch can reach."""
    buckets = graph_buckets(max_rows, max_tokens, max_seq)
    assert len(set(buckets)) == len(buckets)
    areas = [b * t for b, t in buckets]
    assert areas == sorted(areas, reverse=True)  # capture order: largest first
    used = set()
    for B in range(1, max_rows + 1):
        for T in range(1, max_seq + 1):
            if B > 1 and max_tokens < B * T:
                continue
            bucket = pick_bucket(buckets, B, T)
            assert bucket is not None, (B, T)
            rows, seq = bucket
            assert B <= rows <= max(1, int(1.5 * B)) + (B == 3) and T <= seq <= max(16, int(1.5 * T) + 1), (
                B,
                T,
                bucket,
            )
            used.add(bucket)
    assert used == set(buckets)


def test_default_settings_grid_and_lookup():
    buckets = graph_buckets(64, 8192, 512)  # the server's defaults, BERT's 512 positions
    assert (64, 128) in buckets and (1, 512) in buckets and (32, 384) in buckets
    assert (64, 512) not in buckets  # 49 × 385 > 8192: no batch gets there
    assert pick_bucket(buckets, 33, 65) == (48, 96)
    assert pick_bucket(buckets, 64, 128) == (64, 128)
    assert pick_bucket(buckets, 1, 513) is None and pick_bucket(buckets, 65, 8) is None  # → eager
    assert len(buckets) <= 12 * 11  # 12 row steps × 11 length steps at most: capture takes seconds


def test_pad_to_bucket_and_unpad():
    ids = np.array([[101, 7, 102], [101, 102, 0]])
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    types = np.array([[0, 1, 1], [0, 0, 0]])
    pid, pmask, ptypes = pad_to_bucket(ids, mask, types, (4, 5), pad_id=0)
    assert pid.shape == pmask.shape == ptypes.shape == (4, 5) and pid.dtype == np.int64
    np.testing.assert_array_equal(pid[:2, :3], ids)
    np.testing.assert_array_equal(pmask.sum(1), [3, 2, 0, 0])  # filler rows: no tokens at all
    assert (pid[2:] == 0).all() and (ptypes[:, 3:] == 0).all()
    with pytest.raises(ValueError, match="does not fit"):
        pad_to_bucket(ids, mask, types, (1, 5), pad_id=0)
    outputs = {"logits": np.zeros((4, 3)), "start_logits": np.zeros((4, 5)), "expert_counts": np.ones((2, 3))}
    cut = unpad_outputs(outputs, 2, 3)
    assert (
        cut["logits"].shape == (2, 3) and cut["start_logits"].shape == (2, 3) and cut["expert_counts"].shape == (2, 3)
    )


def model_forward(model):
    """A TorchBackend-like forward: device tensors → dict of output tensors."""

    def forward(input_ids, attention_mask, token_type_ids):
        out = model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                    output_expert_counts=model.config.is_moe)  # fmt: skip
        names = ("logits",) if getattr(out, "logits", None) is not None else ("start_logits", "end_logits")
        result = {n: getattr(out, n) for n in names}
        if out.expert_counts is not None:
            result["expert_counts"] = out.expert_counts
        return result

    return forward


@pytest.mark.parametrize(("route", "task"), [("gate-sentence", "cls"), ("gate-token", "qa"), ("hash-random", "cls")])
def test_a_bucketed_batch_gives_the_unbucketed_outputs(route, task):
    """The runner's padding (filler rows with no tokens, filler columns) through the padded layout gives each
    real row what the packed eager forward gives it, and the same expert counts."""
    model = tiny_model(route, task, seed=8)
    forward = model_forward(model)
    runner = BucketedRunner(forward, graph_buckets(8, 200, 40), pad_id=0, device="cpu", graphs=False)
    for lengths in ([5, 11, 2], [17], [3, 3, 3, 3, 3]):
        inputs = batch(lengths, seed=len(lengths))
        arrays = [inputs[k].numpy() for k in ("input_ids", "attention_mask", "token_type_ids")]
        model.set_token_layout("packed")
        with torch.no_grad():
            want = {k: v.numpy() for k, v in forward(*map(torch.from_numpy, arrays)).items()}
        model.set_token_layout("padded")
        got = runner.run(*arrays)
        assert got.keys() == want.keys()
        valid = arrays[1].astype(bool)
        for name, value in want.items():
            assert got[name].shape == value.shape, name
            if name == "expert_counts":
                np.testing.assert_array_equal(got[name], value)
            elif name == "logits":
                np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5)
            else:
                np.testing.assert_allclose(got[name][valid], value[valid], rtol=1e-5, atol=1e-5)
    assert runner.replays == 3
    assert runner.run(*[np.zeros((9, 4), dtype=np.int64)] * 3) is None  # 9 rows: no bucket → the caller runs eager


def test_graphs_need_cuda():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        BucketedRunner(lambda *a: {}, [(1, 16)], pad_id=0, device="cpu", graphs=True)


def test_settings_dtype_and_cuda_graphs(monkeypatch):
    from server.settings import ServerSettings

    assert ServerSettings().dtype == "auto" and ServerSettings().cuda_graphs is True
    monkeypatch.setenv("MOEBERT_SERVE_DTYPE", "bfloat16")
    monkeypatch.setenv("MOEBERT_SERVE_CUDA_GRAPHS", "false")
    s = ServerSettings(device="cuda")
    assert s.dtype == "bfloat16" and s.cuda_graphs is False
    with pytest.raises(ValueError, match="float16 needs device cuda"):
        ServerSettings(dtype="float16")
    with pytest.raises(ValueError, match="is for the torch backend"):
        ServerSettings(dtype="bfloat16", backend="onnx", device="cuda")
    with pytest.raises(ValueError, match="dtype"):
        ServerSettings(dtype="int4")


def test_cli_flags_reach_the_settings():
    from moebert_cli import build_parser
    from server.cli import settings_from_args

    parser = build_parser()
    args = parser.parse_args(["serve", "--model", "m=/x", "--device", "cuda", "--dtype", "float16", "--no-cuda-graphs"])
    s = settings_from_args(args)
    assert (s.device, s.dtype, s.cuda_graphs) == ("cuda", "float16", False)
    assert settings_from_args(parser.parse_args(["serve", "--model", "m=/x"])).cuda_graphs is True


def test_torch_dtype_resolution():
    from server.backends import torch_dtype

    assert torch_dtype("auto", "cpu") == torch.float32 and torch_dtype("bfloat16", "cpu") == torch.bfloat16
    if CUDA:
        assert torch_dtype("auto", "cuda") in (torch.bfloat16, torch.float16)


def test_torch_backend_converts_weights_once_at_load(tiny_cls_dir):
    from server.backends import TorchBackend

    backend = TorchBackend(tiny_cls_dir, dtype="bfloat16")
    assert {p.dtype for p in backend.model.parameters()} == {torch.bfloat16}
    inputs = batch([4, 9], seed=1)
    out = backend.run(*(inputs[k].numpy() for k in ("input_ids", "attention_mask", "token_type_ids")))
    assert out["logits"].dtype == np.float32 and out["logits"].shape == (2, 3)


# ----------------------------------------------------------------------------------------------------
# GPU only: real graphs


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("route", "dtype"), [("hash-random", torch.bfloat16), ("gate-token", torch.float16),
                                              ("gate-sentence", torch.bfloat16)])  # fmt: skip
def test_gpu_graph_replay_has_no_host_sync_and_matches_fp32(route, dtype):
    """Captured per bucket, replayed under sync debug mode "error" (a synchronising op inside the forward
    would raise), with the Triton backend; logits within the 16-bit tolerance (atol = rtol = 5e-2, logits of
    O(1) from a 3-layer model) of the eager fp32 forward on the CPU."""
    reference = tiny_model(route, seed=9)
    model = tiny_model(route, seed=9).to("cuda", dtype)
    model.set_moe_backend("triton")
    forward = model_forward(model)
    runner = BucketedRunner(forward, graph_buckets(8, 256, 48), pad_id=0, device="cuda", graphs=True)
    runner.capture()
    inputs = batch([5, 31, 2], seed=2)
    arrays = [inputs[k].numpy() for k in ("input_ids", "attention_mask", "token_type_ids")]
    bucket = pick_bucket(runner.buckets, 3, 31)
    captured = runner._captured[bucket]
    padded = pad_to_bucket(*arrays, bucket, 0)
    for buffer, array in zip(captured.inputs, padded, strict=True):
        buffer.copy_(torch.from_numpy(array))
    captured.replay()  # a capture fails on any synchronising op, so the graph itself is sync-free
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():  # and the forward it captured, run eagerly: no synchronising op either
            model.set_token_layout("padded")
            forward(*captured.inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got = runner.run(*arrays)
    with torch.no_grad():
        want = model_forward(reference)(*map(torch.from_numpy, arrays))
    np.testing.assert_allclose(got["logits"], want["logits"].numpy(), rtol=5e-2, atol=5e-2)
    np.testing.assert_array_equal(got["expert_counts"].sum(), 2 * (5 + 31 + 2))


def test_e2e_gpu_benchmark_smoke_runs_on_cpu(tmp_path):
    """benchmarks/bench_e2e_gpu.py --smoke: tiny shapes, eager, CPU; the table, JSON and ratios are written,
    and the load benchmark's checkpoints load as server models."""
    import importlib.util
    import json

    path = REPO / "benchmarks" / "bench_e2e_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_e2e_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    prefix = tmp_path / "e2e"
    args = ["--smoke", "--out", str(prefix), "--save-checkpoints", str(tmp_path / "ck"), "--checkpoint-shape", "tiny"]
    assert bench.main(args) == 0
    result = json.loads(prefix.with_suffix(".json").read_text())
    assert [(r["model"], r["batch"]) for r in result["rows"]] == [
        ("dense teacher", 1), ("dense teacher", 3), ("moebert torch", 1), ("moebert torch", 3)
    ]  # fmt: skip
    assert all(r["max_abs_err_vs_fp32"] < 1e-5 for r in result["rows"])  # fp32 vs its fp32 reference
    assert [s["batch"] for s in result["ratios"]] == [1, 3]
    assert "MoEBERT ÷ teacher throughput" in prefix.with_suffix(".md").read_text()
    from moebert.loading import load_config, task_of

    for name, moe in (("dense", False), ("moe", True)):
        config = load_config(tmp_path / "ck" / name)
        assert task_of(config) == "classification" and config.is_moe == moe
