"""The MoEBERT model against independent references: HF transformers' BertModel for the dense path
and N=1 conversions, a float64 recomputation from the teacher's neurons for N=4."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

import moebert  # noqa: F401  (registers the Auto classes)
from moebert.convert import ConvertConfig, convert
from moebert.loading import load_model
from moebert.modeling import switch_balance_loss
from moebert.splitting import save_importance


def hf_outputs(path, task, batch):
    cls = AutoModelForQuestionAnswering if task == "qa" else AutoModelForSequenceClassification
    model = cls.from_pretrained(str(path)).eval()
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    logits = torch.stack([out.start_logits, out.end_logits], -1) if task == "qa" else out.logits
    return logits, out.hidden_states


def our_logits(model, batch, **kw):
    with torch.no_grad():
        out = model(**batch, **kw)
    logits = torch.stack([out.start_logits, out.end_logits], -1) if hasattr(out, "start_logits") else out.logits
    return logits, out


def write_random_importance(teacher_dir, num_layers=3, d_h=84, seed=0):
    g = torch.Generator().manual_seed(seed)
    path = teacher_dir / "importance.safetensors"
    save_importance(path, [torch.rand(d_h, generator=g) for _ in range(num_layers)], {"teacher": str(teacher_dir)})
    return path


@pytest.mark.parametrize("task", ["cls", "qa"])
def test_dense_bert_checkpoint_loads_and_matches_hf(task, tiny_cls_dir, tiny_qa_dir, padded_batch):
    path = tiny_qa_dir if task == "qa" else tiny_cls_dir
    ref_logits, ref_hidden = hf_outputs(path, task, padded_batch)
    model = load_model(path)
    assert not model.config.is_moe
    logits, out = our_logits(model, padded_batch, output_hidden_states=True)
    valid = padded_batch["attention_mask"].bool()
    if task == "qa":  # the FFNs skip padding, so only real tokens' outputs are defined
        logits, ref_logits = logits[valid], ref_logits[valid]
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    assert len(out.hidden_states) == len(ref_hidden) == 4  # embeddings + 3 layers
    for ours, theirs in zip(out.hidden_states, ref_hidden, strict=True):
        torch.testing.assert_close(ours[valid], theirs[valid], rtol=0, atol=1e-5)


@pytest.mark.parametrize("task", ["cls", "qa"])
@pytest.mark.parametrize(("split", "shared"), [("importance", 0), ("importance", 50), ("random", 84), ("inverse", 7)])
def test_one_expert_of_full_width_reproduces_the_teacher(
    task, split, shared, tiny_cls_dir, tiny_qa_dir, padded_batch, tmp_path
):
    teacher = tiny_qa_dir if task == "qa" else tiny_cls_dir
    importance = write_random_importance(tmp_path)
    out = convert(ConvertConfig(
        teacher=str(teacher), output_dir=str(tmp_path / "moe"), num_experts=1, expert_dim=84, shared_dim=shared,
        split=split, importance=str(importance),
    ))  # fmt: skip
    model = load_model(out)
    assert model.config.moe_layers == [0, 1, 2] and model.config.num_experts == 1
    ref_logits, _ = hf_outputs(teacher, task, padded_batch)
    valid = padded_batch["attention_mask"].bool()
    for backend in ("torch", "reference"):
        model.set_moe_backend(backend)
        logits, _ = our_logits(model, padded_batch)
        if task == "qa":  # padding positions are not computed by the FFNs
            logits, ref = logits[valid], ref_logits[valid]
        else:
            ref = ref_logits
        torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)


def test_four_experts_compute_the_teachers_neurons(tiny_cls_dir, padded_batch, tmp_path):
    """Every token's MoE FFN output = its expert's FFN rebuilt in float64 from the teacher's recorded neurons."""
    importance = write_random_importance(tmp_path, seed=3)
    out = convert(ConvertConfig(
        teacher=str(tiny_cls_dir), output_dir=str(tmp_path / "moe"), num_experts=4, expert_dim=28, shared_dim=10,
        importance=str(importance),
    ))  # fmt: skip
    student = load_model(out).double()
    teacher = load_model(tiny_cls_dir).double()
    ids = padded_batch["input_ids"].reshape(-1)
    x = torch.randn(ids.numel(), 36, dtype=torch.float64)
    for i in range(3):
        t_layer, moe = teacher.bert.encoder.layer[i], student.bert.encoder.layer[i].moe
        W1, b1 = t_layer.intermediate.dense.weight, t_layer.intermediate.dense.bias  # [d_h, d]
        W2, b2 = t_layer.output.dense.weight, t_layer.output.dense.bias  # [d, d_h]
        ln = t_layer.output.LayerNorm
        expected = torch.empty_like(x)
        for t in range(ids.numel()):
            e = int(moe.router.table[ids[t]])
            K = moe.kept_neurons[e]
            assert K.numel() == 28 and len(set(K.tolist())) == 28
            h = F.gelu(W1[K] @ x[t] + b1[K])
            expected[t] = F.layer_norm(x[t] + W2[:, K] @ h + b2, (36,), ln.weight, ln.bias, 1e-12)
        from moebert.modeling import TokenLayout

        layout = TokenLayout(None, ids, torch.zeros_like(ids), padded_batch["attention_mask"].bool(), 1)
        for backend in ("torch", "reference"):
            moe.backend = backend
            with torch.no_grad():
                got, routing = moe(x, layout)
            torch.testing.assert_close(routing.expert_ids, moe.router.table[ids])
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_moe_model_with_padding_matches_unpadded_rows(tiny_cls_dir, tokenizer, tmp_path):
    out = convert(
        ConvertConfig(
            teacher=str(tiny_cls_dir),
            output_dir=str(tmp_path / "moe"),
            split="random",
            expert_dim=21,
            shared_dim=7,
        )
    )
    model = load_model(out)
    texts = ["short one", "a much longer sentence with many more tokens than the first"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    logits, _ = our_logits(model, dict(batch))
    for i, text in enumerate(texts):
        alone, _ = our_logits(model, dict(tokenizer([text], return_tensors="pt")))
        torch.testing.assert_close(logits[i], alone[0], rtol=0, atol=1e-5)


def test_gate_token_trains_with_balance_loss(tiny_cls_dir, padded_batch, tmp_path):
    out = convert(ConvertConfig(
        teacher=str(tiny_cls_dir), output_dir=str(tmp_path / "moe"), split="random", route="gate-token",
        expert_dim=21, shared_dim=7, load_balance_weight=0.5,
    ))  # fmt: skip
    model = load_model(out).train()
    labels = torch.tensor([0, 1, 2, 0, 1])
    res = model(**padded_batch, labels=labels)
    assert res.router_aux_loss is not None and res.router_aux_loss > 0
    task_loss = F.cross_entropy(res.logits, labels)
    torch.testing.assert_close(res.loss, task_loss + 0.5 * res.router_aux_loss)
    res.loss.backward()
    gate = model.bert.encoder.layer[0].moe.router.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0


def test_switch_balance_loss_definition():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.5, 0.25, 0.25]])
    ids = probs.argmax(-1)  # experts 0, 1, 0, 0 → f = (3/4, 1/4, 0)
    P = probs.mean(0)
    expected = 3 * (P[0] * 0.75 + P[1] * 0.25)
    torch.testing.assert_close(switch_balance_loss(probs, ids), expected)
    uniform = torch.full((8, 4), 0.25)
    torch.testing.assert_close(switch_balance_loss(uniform, torch.arange(8) % 4), torch.tensor(1.0))


def test_backend_env_var_selects_reference(tiny_cls_dir, padded_batch, tmp_path, monkeypatch):
    out = convert(
        ConvertConfig(
            teacher=str(tiny_cls_dir),
            output_dir=str(tmp_path / "moe"),
            split="random",
            expert_dim=21,
            shared_dim=7,
        )
    )
    model = load_model(out)
    torch_logits, _ = our_logits(model, padded_batch)
    calls = []
    import kernels.reference

    original = kernels.reference.moe_ffn_reference
    monkeypatch.setattr(kernels, "moe_ffn_reference", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setenv("MOEBERT_MOE_BACKEND", "reference")
    ref_logits, _ = our_logits(model, padded_batch)
    assert len(calls) == 3  # one per MoE layer
    torch.testing.assert_close(ref_logits, torch_logits, rtol=0, atol=1e-5)


def test_saved_weights_are_readable_by_other_users(tmp_path):
    """transformers writes model.safetensors through a private (0600) temporary file; a checkpoint trained
    as one user must load in a service running as another (the Docker image's user)."""
    from tests.tiny_moebert import tiny_model

    tiny_model("hash-random").save_pretrained(tmp_path)
    for name in ("model.safetensors", "config.json", "modeling_moebert.py"):
        assert (tmp_path / name).stat().st_mode & 0o044 == 0o044, name
