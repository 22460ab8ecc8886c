"""The training stages end to end through the CLI on a tiny teacher and a small custom CSV: outputs,
resuming (finished stages are skipped), interruption (nothing half-written), bad data (clear error)."""

from __future__ import annotations

import csv
import json

import pytest

from moebert.cli import main
from moebert.loading import load_model

POSITIVE = ["a gorgeous, witty, seductive movie", "charming and affecting", "the best film this year", "a joy"]
NEGATIVE = ["paper-thin and lifeless", "dull, dull, dull", "it never comes alive", "a tedious mess"]


def write_csv(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


@pytest.fixture
def custom_data(tmp_path):
    rows = [(t, "pos") for t in POSITIVE] + [(t, "neg") for t in NEGATIVE]
    return write_csv(tmp_path / "train.csv", rows * 3), write_csv(tmp_path / "dev.csv", rows)


def pipeline_args(teacher, train, dev, out):
    return [
        "pipeline", "--task", "custom", "--data-dir", str(train), "--dev-file", str(dev), "-o", str(out),
        "--teacher", str(teacher), "--finetune-epochs", "1", "--epochs", "1", "--batch-size", "8",
        "--samples", "8", "--expert-dim", "21", "--shared-dim", "7", "--max-length", "32",
    ]  # fmt: skip


def test_pipeline_runs_every_stage_then_resumes(tiny_cls_dir, custom_data, tmp_path, capsys):
    train, dev = custom_data
    out = tmp_path / "run"
    assert main(pipeline_args(tiny_cls_dir, train, dev, out)) == 0
    for stage in ("teacher", "moe", "student"):
        assert (out / stage / "stage.json").is_file() and (out / stage / "config.json").is_file()
    assert (out / "importance.safetensors").is_file()
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"teacher", "moebert"} and 0 <= results["moebert"]["dev"]["accuracy"] <= 100
    student = load_model(out / "student")
    assert student.config.is_moe and student.config.id2label == {0: "neg", 1: "pos"}
    log = [json.loads(line) for line in (out / "student" / "train_log.jsonl").read_text().splitlines()]
    assert {"loss", "task", "hidden_mse", "pred_kl", "lr"} <= set(log[-1])
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/model.safetensors")}
    capsys.readouterr()
    assert main(pipeline_args(tiny_cls_dir, train, dev, out)) == 0  # everything is up to date
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/model.safetensors")} == mtimes
    # Changing a distillation setting re-runs distillation only.
    assert main([*pipeline_args(tiny_cls_dir, train, dev, out), "--distill-weight", "0.5"]) == 0
    after = {p: p.stat().st_mtime_ns for p in out.glob("*/model.safetensors")}
    assert after[out / "teacher" / "model.safetensors"] == mtimes[out / "teacher" / "model.safetensors"]
    assert after[out / "student" / "model.safetensors"] != mtimes[out / "student" / "model.safetensors"]


def test_interrupted_stage_leaves_nothing_behind(tiny_cls_dir, custom_data, tmp_path, monkeypatch):
    import training.finetune

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.finetune, "fit", interrupted)
    train, dev = custom_data
    args = [
        "finetune",
        "--task",
        "custom",
        "--data-dir",
        str(train),
        "--dev-file",
        str(dev),
        "--model",
        str(tiny_cls_dir),
    ]
    assert main([*args, "-o", str(tmp_path / "teacher")]) == 130
    assert not (tmp_path / "teacher").exists() and not list(tmp_path.glob(".teacher.tmp-*"))


def test_bad_data_is_one_clear_line(tiny_cls_dir, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nfine,pos\n,neg\n")
    args = [
        "finetune",
        "--task",
        "custom",
        "--data-dir",
        str(bad),
        "--dev-file",
        str(bad),
        "--model",
        str(tiny_cls_dir),
    ]
    assert main([*args, "-o", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "bad.csv" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["evaluate", str(tiny_cls_dir), "--task", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_only_rank_zero_publishes_a_stage_output(tmp_path, monkeypatch):
    from training.checkpoint import finished, stage_output

    with stage_output(tmp_path / "out", "finetune", "fp", {}) as tmp:
        (tmp / "weights").write_text("rank 0")
    monkeypatch.setenv("RANK", "1")  # torchrun's other processes
    with stage_output(tmp_path / "out", "finetune", "fp", {}) as tmp:
        (tmp / "weights").write_text("rank 1")
    assert (tmp_path / "out" / "weights").read_text() == "rank 0" and finished(tmp_path / "out", "fp")
    assert not tmp.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
