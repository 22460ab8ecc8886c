"""The training stages end to end through the CLI on a tiny teacher and a small custom CSV: outputs,
resuming (finished stages are skipped), interruption (nothing half-written), bad data (clear error)."""

from __future__ import annotations

import csv
import json
import re

import pytest

from moebert.loading import load_model
from moebert_cli import main


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


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--distill-weight", "-1"], "distill_weight (λ) must be ≥ 0, got -1.0"),
        (["--distill-weight", "nan"], "distill_weight (λ) must be ≥ 0, got nan"),
        (["--batch-size", "0"], "batch_size must be ≥ 1, got 0"),
        (["--lr=-3e-5"], "lr must be > 0, got -3e-05"),  # the distillation's --lr (the teacher's is fine)
        (["--samples", "0"], "importance_samples must be ≥ 1, got 0"),
    ],
)  # fmt: skip
def test_bad_settings_are_refused_before_any_stage(tiny_cls_dir, custom_data, tmp_path, capsys, extra, message):
    """A bad λ or optimiser setting is one clear line at once, not a failure after fine-tuning the teacher."""
    train, dev = custom_data
    out = tmp_path / "run"
    assert main([*pipeline_args(tiny_cls_dir, train, dev, out), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (out / "teacher").exists()
    student = tmp_path / "student"
    if extra[0] == "--distill-weight":  # the distill stage on its own checks λ too
        args = ["distill", str(tiny_cls_dir), "--teacher", str(tiny_cls_dir), "-o", str(student), "--task", "custom",
                "--data-dir", str(train), "--dev-file", str(dev), *extra]  # fmt: skip
        assert main(args) == 2
        assert message in capsys.readouterr().err and not student.exists()


def test_optimiser_settings_name_every_problem():
    from training.loop import OptimConfig

    with pytest.raises(ValueError, match=r"^lr must be > 0, got 0; warmup_ratio must be in \[0, 1\), got 1$"):
        OptimConfig(lr=0, warmup_ratio=1)
    with pytest.raises(ValueError, match=r"^attention_dropout must be in \[0, 1\), got 1.5$"):
        OptimConfig(attention_dropout=1.5)
    assert OptimConfig(max_steps=1, attention_dropout=0.0).max_steps == 1


def test_only_rank_zero_publishes_a_stage_output(tmp_path, monkeypatch):
    from training.stages import finished, stage_output

    with stage_output(tmp_path / "out", "finetune", "fp", {}) as tmp:
        (tmp / "weights").write_text("rank 0")
    monkeypatch.setenv("RANK", "1")  # torchrun's other processes
    with stage_output(tmp_path / "out", "finetune", "fp", {}) as tmp:
        (tmp / "weights").write_text("rank 1")
    assert (tmp_path / "out" / "weights").read_text() == "rank 0" and finished(tmp_path / "out", "fp")
    assert not tmp.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_evaluation_is_reused_only_when_it_is_the_same_work(tiny_cls_dir, custom_data, tmp_path):
    from training.evaluate import EvaluateConfig, evaluate
    from training.tasks import DataConfig

    train, dev = custom_data
    out = tmp_path / "run"
    assert main(pipeline_args(tiny_cls_dir, train, dev, out)) == 0
    saved = json.loads((out / "eval_moebert.json").read_text())["results"]["dev"]
    # The student's kept epoch was scored during distillation on this very split: reused, not recomputed...
    assert saved["source"].startswith("kept epoch")
    # ... and it is what a fresh evaluation of the saved weights gives.
    data = DataConfig(task="custom", data_dir=str(train), dev_file=str(dev), max_length=32)
    fresh = evaluate(EvaluateConfig(model=str(out / "student"), data=data, output=str(tmp_path / "fresh.json")))
    assert fresh["dev"]["accuracy"] == saved["accuracy"]
    # Other data settings are other work: evaluated afresh, not reused.
    shorter = evaluate(
        EvaluateConfig(model=str(out / "student"), data=DataConfig(**{**vars(data), "max_length": 16}),
                       output=str(out / "eval_moebert.json"), reuse=True)
    )  # fmt: skip
    assert "source" not in shorter["dev"]
    assert json.loads((out / "eval_moebert.json").read_text())["results"] == shorter


def test_attention_dropout_setting(tiny_cls_dir, custom_data, tmp_path):
    from training.datasets import load_split, tokenizer_for
    from training.finetune import task_loss
    from training.loop import OptimConfig, fit
    from training.stages import fingerprint
    from training.tasks import DataConfig

    # Unset, the newer setting leaves older stages' fingerprints as they were; set, it counts.
    assert fingerprint({"lr": 1.0, "optim": {"attention_dropout": None}}, []) == fingerprint(
        {"lr": 1.0, "optim": {}}, []
    )
    assert fingerprint({"optim": {"attention_dropout": 0.0}}, []) != fingerprint({"optim": {}}, [])
    train, _ = custom_data
    model = load_model(tiny_cls_dir)
    data = DataConfig(task="custom", data_dir=str(train), max_length=32)
    loaded = load_split(data.spec(), train, tokenizer_for(str(tiny_cls_dir)), max_length=32, training=True)
    opt = OptimConfig(epochs=1, batch_size=8, max_steps=1, attention_dropout=0.0)
    fit(model, loaded, opt, task_loss, None, "accuracy", lambda m, metrics: None, tmp_path / "log")
    rates = {m.attention_dropout_p for m in model.modules() if hasattr(m, "attention_dropout_p")}
    assert rates == {0.0} and model.config.attention_probs_dropout_prob > 0  # the saved config keeps its own


def test_no_distill_needs_no_teacher(tiny_cls_dir, custom_data, tmp_path, capsys):
    from moebert.convert import ConvertConfig, convert

    train, dev = custom_data
    moe = convert(ConvertConfig(teacher=str(tiny_cls_dir), output_dir=str(tmp_path / "moe"), split="random",
                                expert_dim=21, shared_dim=7))  # fmt: skip
    common = [str(moe), "--task", "custom", "--data-dir", str(train), "--dev-file", str(dev), "--max-length", "32",
              "--max-steps", "1", "--epochs", "1"]  # fmt: skip
    assert main(["distill", *common, "-o", str(tmp_path / "alone"), "--no-distill"]) == 0
    assert (tmp_path / "alone" / "stage.json").is_file()
    capsys.readouterr()
    assert main(["distill", *common, "-o", str(tmp_path / "missing")]) == 2  # distillation itself does need one
    err = capsys.readouterr().err
    assert "distillation needs a teacher (--teacher)" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "missing").exists()


def test_hash_balance_reads_the_tasks_own_columns(tiny_cls_dir, tmp_path):
    """A custom text column the header guess would not know ("review"), and a sentence pair."""
    from safetensors.torch import load_file

    rows = [(f"{t} indeed", t, "pos") for t in ("a joy", "the best film")] + [
        (f"{t} sadly", t, "neg") for t in ("dull, dull", "a tedious mess")
    ]
    for name in ("train", "dev"):
        with (tmp_path / f"{name}.csv").open("w", newline="") as f:
            csv.writer(f).writerows([("review", "summary", "label"), *rows])
    out = tmp_path / "run"
    args = [
        "pipeline", "--task", "custom", "--data-dir", str(tmp_path / "train.csv"), "--dev-file",
        str(tmp_path / "dev.csv"), "--text-column", "review", "--text-pair-column", "summary", "-o", str(out),
        "--teacher", str(tiny_cls_dir), "--finetune-epochs", "1", "--epochs", "1", "--batch-size", "4",
        "--samples", "4", "--expert-dim", "21", "--shared-dim", "7", "--max-length", "32", "--route", "hash-balance",
    ]  # fmt: skip
    assert main(args) == 0
    counts = load_file(out / "balance_counts.safetensors")["token_counts"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_cls_dir))
    for word in ("indeed", "sadly", "film", "mess"):  # from both columns
        assert counts[tok.convert_tokens_to_ids(word)] > 0, word
    assert load_model(out / "student").config.route_method == "hash-balance"


COLA_ROWS = [  # CoLA's own layout: no header, source<TAB>label<TAB>original judgement<TAB>sentence
    ("gj04", "1", "", "Our friends won't buy this analysis, let alone the next one we propose."),
    ("gj04", "1", "", "One more pseudo generalization and I'm giving up."),
    ("gj04", "0", "*", "They drank the pub dry glorious."),
    ("gj04", "0", "*", "The more we study verbs, the crazier they get sleeping."),
]


def test_hash_balance_pipeline_on_cola(tiny_cls_dir, tmp_path):
    """CoLA files have no header row: the texts come from the task's own column spec, not a header guess."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    cola = tmp_path / "data" / "glue" / "CoLA"
    cola.mkdir(parents=True)
    for split in ("train", "dev"):
        (cola / f"{split}.tsv").write_text("".join("\t".join(row) + "\n" for row in COLA_ROWS))
    out = tmp_path / "run"
    args = [
        "pipeline", "--task", "cola", "--data-dir", str(tmp_path / "data"), "-o", str(out), "--finetuned-teacher",
        str(tiny_cls_dir), "--split", "random", "--route", "hash-balance", "--epochs", "1", "--max-steps", "1",
        "--batch-size", "4", "--expert-dim", "21", "--shared-dim", "7", "--max-length", "32",
    ]  # fmt: skip
    assert main(args) == 0
    counts = load_file(out / "balance_counts.safetensors")["token_counts"]
    tok = AutoTokenizer.from_pretrained(str(tiny_cls_dir))
    for word in ("friends", "giving", "drank", "verbs"):
        assert counts[tok.convert_tokens_to_ids(word)] > 0, word
    assert counts[tok.convert_tokens_to_ids("##j")] == 0  # the source column ("gj04") is not text
    assert load_model(out / "student").config.route_method == "hash-balance"
    assert (out / "balance_counts.stage.json").is_file() and (out / "moe" / "stage.json").is_file()


def test_distill_config_without_a_teacher_for_no_distill(tiny_cls_dir, custom_data, tmp_path):
    """--no-distill needs no teacher anywhere: not on the command line, not in the typed config."""
    from moebert.convert import ConvertConfig, convert
    from training.distill import DistillConfig, distill
    from training.loop import OptimConfig
    from training.tasks import DataConfig

    train, dev = custom_data
    moe = convert(ConvertConfig(teacher=str(tiny_cls_dir), output_dir=str(tmp_path / "moe"), split="random",
                                expert_dim=21, shared_dim=7))  # fmt: skip
    data = DataConfig(task="custom", data_dir=str(train), dev_file=str(dev), max_length=32)
    cfg = DistillConfig(student=str(moe), data=data, output_dir=str(tmp_path / "alone"), distill=False,
                        optim=OptimConfig(epochs=1, batch_size=8, max_steps=1))  # fmt: skip
    assert cfg.teacher is None
    assert (distill(cfg) / "stage.json").is_file()
    with pytest.raises(ValueError, match=r"distillation needs a teacher \(--teacher\)"):
        DistillConfig(student=str(moe), data=data, output_dir=str(tmp_path / "x"))


def test_a_missing_local_model_is_no_such_folder(tiny_cls_dir, custom_data, tmp_path, capsys):
    """A path-like name that is not a local folder says so, instead of transformers' "Repo id must be ..."."""
    from moebert.loading import CheckpointError, looks_like_path
    from training.datasets import tokenizer_for

    missing = tmp_path / "runs" / "teacher"
    for name in (str(missing), "./no/such/teacher", "../nowhere", "~/no-such-moebert-folder", "runs/mrpc/teacher"):
        with pytest.raises(CheckpointError, match=f"^no such folder: {re.escape(name)}$"):
            load_model(name)
        with pytest.raises(CheckpointError, match=f"^no such folder: {re.escape(name)}$"):
            tokenizer_for(name)
    # A plausible hub id that is not a local folder keeps hub behaviour (not tried here: no network).
    assert not looks_like_path("bert-base-uncased") and not looks_like_path("sentence-transformers/all-MiniLM-L6-v2")
    assert looks_like_path(missing) and looks_like_path("a b")
    train, dev = custom_data
    data = ["--task", "custom", "--data-dir", str(train), "--dev-file", str(dev)]
    for args in (
        ["finetune", *data, "--model", str(missing), "-o", str(tmp_path / "t")],
        ["distill", str(tiny_cls_dir), "--teacher", str(missing), *data, "-o", str(tmp_path / "s")],
        ["pipeline", *data, "--teacher", str(missing), "-o", str(tmp_path / "p")],
        ["convert", str(missing), "-o", str(tmp_path / "m"), "--split", "random"],
    ):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1] == f"moebert {args[0]}: error: no such folder: {missing}"
        assert "Repo id" not in err and "Traceback" not in err
