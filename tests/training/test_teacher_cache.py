"""Cached teacher outputs: the distillation loss read from the cache equals the loss with the teacher run
live (to fp16 rounding of the hidden states), for classification and QA; the cache is built once."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from moebert.convert import ConvertConfig, convert
from moebert.loading import load_model
from tests.conftest import REPO
from training.datasets import load_data, tokenizer_for
from training.distill import DistillConfig, distill, make_distill_loss
from training.loop import OptimConfig
from training.tasks import DataConfig
from training.teacher_cache import TeacherCache, build_cache, cache_path

FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture(params=["classification", "qa"])
def case(request, tiny_cls_dir, tiny_qa_dir, custom_data, tmp_path):
    if request.param == "qa":
        teacher, data = tiny_qa_dir, DataConfig(task="squad", data_dir=str(FIXTURES), max_length=48, doc_stride=16)
    else:
        teacher, data = tiny_cls_dir, DataConfig(task="custom", data_dir=str(custom_data[0]), max_length=32)
    moe = convert(ConvertConfig(teacher=str(teacher), output_dir=str(tmp_path / "moe"), split="random",
                                expert_dim=21, shared_dim=7))  # fmt: skip
    return teacher, moe, data


def test_cached_loss_equals_live_loss(case, tmp_path):
    teacher_dir, moe, data = case
    tokenizer = tokenizer_for(str(teacher_dir))
    train = load_data(data, data.spec().train_split, tokenizer, training=True)
    teacher = load_model(teacher_dir).requires_grad_(False).eval()
    path = build_cache(teacher, train, tmp_path / "cache.safetensors", batch_size=3)  # odd batches: mixed padding
    mtime = path.stat().st_mtime_ns
    assert build_cache(teacher, train, path).stat().st_mtime_ns == mtime  # built once
    student = load_model(moe).eval()  # eval: no dropout, so both losses see the same student outputs
    live = make_distill_loss(teacher, 2.0, True)
    cached = make_distill_loss(None, 2.0, True, TeacherCache(path))
    rows = torch.tensor([len(train.dataset) - 1, 0, 2])  # out of order, different lengths
    batch = train.collate([train.dataset[int(i)] for i in rows])
    loss_live, parts_live = live(student, batch)
    loss_cached, parts_cached = cached(student, batch, rows)
    for key in ("task", "hidden_mse", "pred_kl"):
        assert parts_cached[key] == pytest.approx(parts_live[key], rel=2e-3, abs=1e-6), key
    torch.testing.assert_close(loss_cached, loss_live, rtol=2e-3, atol=1e-6)


def test_distill_uses_the_cache_only_where_it_fits(tiny_cls_dir, custom_data, tmp_path):
    moe = convert(ConvertConfig(teacher=str(tiny_cls_dir), output_dir=str(tmp_path / "moe"), split="random",
                                expert_dim=21, shared_dim=7))  # fmt: skip
    data = DataConfig(task="custom", data_dir=str(custom_data[0]), dev_file=str(custom_data[1]), max_length=32)
    opt = OptimConfig(epochs=1, batch_size=8)
    path = cache_path(tiny_cls_dir, asdict(data))
    distill(
        DistillConfig(
            student=str(moe),
            teacher=str(tiny_cls_dir),
            data=data,
            output_dir=str(tmp_path / "off"),
            optim=opt,
            teacher_cache_gb=1e-9,
        )
    )
    assert not path.exists()  # too big for the limit: the teacher runs every step
    distill(
        DistillConfig(
            student=str(moe), teacher=str(tiny_cls_dir), data=data, output_dir=str(tmp_path / "on"), optim=opt
        )
    )
    assert path.is_file()
    # the cache is an execution detail, not a setting: it leaves a stage's fingerprint as it is
    from training.stages import fingerprint

    cfg = DistillConfig(
        student=str(moe), teacher=str(tiny_cls_dir), data=data, output_dir=str(tmp_path / "on"), optim=opt
    )
    assert fingerprint(asdict(cfg), []) == fingerprint({**asdict(cfg), "teacher_cache_gb": 0.0}, [])
