"""Conversion: the split rule, checkpoints that round-trip bit for bit in a fresh process, the real
MiniLM teacher, and the CLI refusing bad arguments without writing anything."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import moebert  # noqa: F401
from moebert.convert import ConvertConfig, convert
from moebert.loading import load_model
from moebert.splitting import expert_neurons, load_importance, neuron_order, save_importance
from moebert_cli import main


def test_split_is_shared_top_s_then_round_robin_by_rank():
    order = torch.tensor([9, 3, 7, 0, 5, 1, 8, 2, 6, 4, 11, 10])  # most important first
    kept = expert_neurons(order, num_experts=3, expert_dim=5, shared_dim=2)
    # shared: 9, 3; the rest [7, 0, 5, 1, 8, 2, 6, 4, 11, 10] dealt round-robin by rank
    assert kept.tolist() == [[9, 3, 7, 1, 6], [9, 3, 0, 8, 4], [9, 3, 5, 2, 11]]
    assert expert_neurons(order, 1, 12, 5).tolist() == [order.tolist()]  # N=1, full width keeps everything
    assert expert_neurons(order, 2, 4, 0).tolist() == [[9, 7, 5, 8], [3, 0, 1, 2]]  # no sharing
    with pytest.raises(ValueError, match="gets only"):
        expert_neurons(order, 3, 6, 1)  # 1 + ceil(11/3)=4 < 6


def test_split_orders():
    scores = torch.tensor([0.5, 2.0, 0.1, 3.0, 1.0])
    assert neuron_order(scores, "importance").tolist() == [3, 1, 4, 0, 2]
    assert neuron_order(scores, "inverse").tolist() == [2, 0, 4, 1, 3]
    rnd = neuron_order(scores, "random", seed=1)
    assert sorted(rnd.tolist()) == [0, 1, 2, 3, 4]
    assert (
        neuron_order(torch.zeros(200), "random", seed=1).tolist()
        != neuron_order(torch.zeros(200), "random", seed=2).tolist()
    )
    with pytest.raises(ValueError, match="needs importance"):
        neuron_order(None, "importance")


def test_importance_and_inverse_splits_keep_the_named_neurons(tiny_cls_dir, tmp_path):
    scores = [torch.arange(84, dtype=torch.float32).flip(0) * (layer + 1) for layer in range(3)]  # neuron 0 best
    save_importance(tmp_path / "imp.safetensors", scores, {})
    kw = dict(
        teacher=str(tiny_cls_dir),
        num_experts=4,
        expert_dim=20,
        shared_dim=8,
        importance=str(tmp_path / "imp.safetensors"),
    )
    best = load_model(convert(ConvertConfig(output_dir=str(tmp_path / "a"), split="importance", **kw)))
    worst = load_model(convert(ConvertConfig(output_dir=str(tmp_path / "b"), split="inverse", **kw)))
    rnd = load_model(convert(ConvertConfig(output_dir=str(tmp_path / "c"), split="random", **kw)))
    kb = best.bert.encoder.layer[1].moe.kept_neurons
    assert kb[:, :8].tolist() == [list(range(8))] * 4  # the 8 most important shared by all
    assert kb[2, 8:].tolist() == list(range(10, 58, 4))  # then every 4th by rank
    kw_ = worst.bert.encoder.layer[1].moe.kept_neurons
    assert kw_[:, :8].tolist() == [list(range(83, 75, -1))] * 4
    kr = rnd.bert.encoder.layer[1].moe.kept_neurons
    assert kr[:, :8].tolist() != kb[:, :8].tolist() and kr[:, :8].tolist() != kw_[:, :8].tolist()
    record = json.loads((tmp_path / "a" / "conversion.json").read_text())
    assert record["kept_neurons"]["1"] == kb.tolist()


LOAD_IN_FRESH_PROCESS = """
import sys, torch, moebert
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification
batch = load_file(sys.argv[2])
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()
assert type(model).__name__ == "MoEBertForSequenceClassification", type(model)
with torch.no_grad():
    save_file({"logits": model(**batch).logits}, sys.argv[3])
"""


@pytest.mark.parametrize("route", ["hash-random", "hash-balance", "gate-token", "gate-sentence"])
def test_checkpoint_round_trips_bit_identically_in_a_fresh_process(
    route, tiny_cls_dir, padded_batch, tmp_path, data_dir
):
    balance = None
    if route == "hash-balance":  # `moebert convert --balance-data` reads plain text, one text per line
        lines = [line.split("\t")[0] for line in (data_dir / "glue" / "SST-2" / "dev.tsv").read_text().splitlines()[1:]]
        balance = tmp_path / "dev.txt"
        balance.write_text("\n".join(lines) + "\n")
    out = convert(ConvertConfig(
        teacher=str(tiny_cls_dir), output_dir=str(tmp_path / "moe"), split="random", route=route,
        expert_dim=21, shared_dim=7, balance_data=balance and str(balance), seed=5,
    ))  # fmt: skip
    model = load_model(out)
    with torch.no_grad():
        expected = model(**padded_batch).logits
    save_file({k: v.contiguous() for k, v in padded_batch.items()}, tmp_path / "batch.safetensors")
    args = [str(out), str(tmp_path / "batch.safetensors"), str(tmp_path / "o.st")]
    subprocess.run([sys.executable, "-c", LOAD_IN_FRESH_PROCESS, *args], check=True, capture_output=True)
    got = load_file(tmp_path / "o.st")["logits"]
    assert torch.equal(got, expected)
    tables = {k: v for k, v in load_file(out / "model.safetensors").items() if k.endswith("router.table")}
    if route.startswith("hash"):
        assert len(tables) == 3  # the tables travel in the checkpoint
        if route == "hash-balance":
            assert all(torch.equal(t, tables["bert.encoder.layer.0.moe.router.table"]) for t in tables.values())
        else:
            assert not torch.equal(
                tables["bert.encoder.layer.0.moe.router.table"],
                tables["bert.encoder.layer.1.moe.router.table"],
            )


def test_qa_checkpoint_loads_with_auto_class(tiny_qa_dir, tmp_path):
    from transformers import AutoModelForQuestionAnswering

    out = convert(
        ConvertConfig(
            teacher=str(tiny_qa_dir),
            output_dir=str(tmp_path / "moe"),
            split="random",
            expert_dim=21,
            shared_dim=7,
        )
    )
    model = AutoModelForQuestionAnswering.from_pretrained(str(out))
    assert type(model).__name__ == "MoEBertForQuestionAnswering" and model.config.is_moe


def test_real_minilm_teacher_converts_and_runs(minilm_dir, tokenizer, tmp_path):
    out = convert(ConvertConfig(
        teacher=str(minilm_dir), output_dir=str(tmp_path / "moe"), num_experts=4, expert_dim=384, shared_dim=256,
        split="random",
    ))  # fmt: skip
    model = load_model(out)
    cfg = model.config
    assert (cfg.num_experts, cfg.expert_dim, cfg.shared_dim, cfg.moe_layers) == (4, 384, 256, list(range(6)))
    assert (out / "tokenizer.json").is_file()
    batch = tokenizer(["a gorgeous, witty, seductive movie.", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        res = model(**batch, output_hidden_states=True, output_expert_counts=True)
    assert res.last_hidden_state.shape == (2, batch["input_ids"].shape[1], 384)
    assert torch.isfinite(res.last_hidden_state).all()
    assert res.expert_counts.shape == (6, 4) and (res.expert_counts.sum(1) == batch["attention_mask"].sum()).all()
    dense = load_model(minilm_dir)
    with torch.no_grad():
        ref = dense(**batch).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(res.last_hidden_state[:, 0], ref[:, 0], dim=-1)
    assert (cos > 0.5).all(), cos  # untrained experts of a random split still track the teacher


# ---------------------------------------------------------------------------------------------------
# The CLI refuses bad arguments with one clear line and writes nothing.


def run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--split", "random", "--expert-dim", "100"], "exceeds the teacher's FFN width 84"),
        (["--split", "random", "--expert-dim", "21", "--shared-dim", "21"], "must be below --expert-dim"),
        ([], "needs an importance file"),
        (["--split", "random", "--num-experts", "8", "--expert-dim", "20", "--shared-dim", "4"], "gets only"),
        (["--split", "random", "--route", "hash-balance"], "needs --balance-data"),
    ],
)
def test_cli_refuses_bad_arguments(extra, message, tiny_cls_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(["convert", str(tiny_cls_dir), "-o", str(out), *extra], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_cli_refuses_mismatched_importance_and_non_bert(tiny_cls_dir, tmp_path, capsys):
    save_importance(tmp_path / "wrong.safetensors", [torch.rand(100) for _ in range(3)], {})
    code, err = run_cli(
        [
            "convert",
            str(tiny_cls_dir),
            "-o",
            str(tmp_path / "o"),
            "--importance",
            str(tmp_path / "wrong.safetensors"),
        ],
        capsys,
    )
    assert code == 2 and "the teacher's FFN has 84 neurons" in err
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    code, err = run_cli(
        [
            "convert",
            str(tiny_cls_dir),
            "-o",
            str(tmp_path / "o"),
            "--importance",
            str(tmp_path / "garbage.safetensors"),
        ],
        capsys,
    )
    assert code == 2 and "not a readable importance file" in err
    not_bert = tmp_path / "gpt"
    not_bert.mkdir()
    (not_bert / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, err = run_cli(["convert", str(not_bert), "-o", str(tmp_path / "o"), "--split", "random"], capsys)
    assert code == 2 and "not a BERT checkpoint" in err
    code, err = run_cli(["convert", str(tmp_path / "missing"), "-o", str(tmp_path / "o"), "--split", "random"], capsys)
    assert code == 2 and "missing" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(tiny_cls_dir), "-o", str(tmp_path / "o"), "--route", "magic"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_cli_converts_and_refuses_to_overwrite(tiny_cls_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = [
        "convert",
        str(tiny_cls_dir),
        "-o",
        str(out),
        "--split",
        "random",
        "--num-experts",
        "1",
        "--expert-dim",
        "40",
    ]
    assert run_cli(args, capsys)[0] == 0
    assert load_model(out).config.expert_dim == 40  # importance pruning to width 40: the dense baseline
    code, err = run_cli(args, capsys)
    assert code == 2 and "--overwrite" in err
    assert run_cli([*args, "--overwrite"], capsys)[0] == 0


def test_importance_file_round_trip(tmp_path):
    scores = [torch.rand(84) for _ in range(3)]
    save_importance(tmp_path / "i.safetensors", scores, {"teacher": "x"})
    loaded = load_importance(tmp_path / "i.safetensors", 3, 84)
    assert all(torch.equal(a, b) for a, b in zip(scores, loaded, strict=True))
    raw = load_file(tmp_path / "i.safetensors")
    assert torch.equal(raw["order.2"], torch.argsort(scores[2], descending=True))
    with pytest.raises(ValueError, match="more layers"):
        load_importance(tmp_path / "i.safetensors", 2, 84)


def test_cli_balance_data_is_plain_text_and_task_files_are_pointed_elsewhere(tiny_cls_dir, tmp_path, capsys):
    """`moebert convert --balance-data` (the model package, which knows no task) reads one text per line; a
    task file, whose columns only the task knows (CoLA has no header; a custom column may be "review"), is
    refused with what to use instead, not parsed by guessing its text columns."""
    common = ["convert", str(tiny_cls_dir), "--split", "random", "--route", "hash-balance", "--expert-dim", "21",
              "--shared-dim", "7"]  # fmt: skip
    (tmp_path / "train.tsv").write_text("gj04\t1\t\tOur friends won't buy this analysis.\n")
    (tmp_path / "reviews.csv").write_text("review,label\nloved it,pos\n")
    for task_file in ("train.tsv", "reviews.csv"):
        code, err = run_cli([*common, "-o", str(tmp_path / "o"), "--balance-data", str(tmp_path / task_file)], capsys)
        assert code == 2 and "plain text file, one text per line" in err and "moebert pipeline" in err
        assert not (tmp_path / "o").exists()
    (tmp_path / "texts.txt").write_text("Our friends won't buy this analysis.\n\nThey drank the pub.\n")
    code, _ = run_cli([*common, "-o", str(tmp_path / "o"), "--balance-data", str(tmp_path / "texts.txt")], capsys)
    assert code == 0
    tables = [t for k, t in load_file(tmp_path / "o" / "model.safetensors").items() if k.endswith("router.table")]
    assert len(tables) == 3 and all(torch.equal(t, tables[0]) for t in tables)
