"""Dense fine-tuned BERT → MoEBERT (METHOD.md §2–3): a plain function from one folder to another."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moebert.configuration import ROUTE_METHODS, SPLIT_METHODS, MoEBertConfig
from moebert.loading import load_model
from moebert.modeling import MoEBertPreTrainedModel
from moebert.routing import balanced_hash_table, read_texts, routed_load, token_counts
from moebert.splitting import expert_neurons, load_importance, neuron_order

log = logging.getLogger(__name__)
IMPORTANCE_FILE = "importance.safetensors"


@dataclass
class ConvertConfig:
    """Arguments of `moebert convert`. Defaults follow the paper's proportions (N=4, d_e = d_h/4, s = 2/3 d_e)."""

    teacher: str  # dense fine-tuned BERT: local folder or hub id
    output_dir: str
    num_experts: int = 4
    expert_dim: int | None = None  # default d_h // num_experts
    shared_dim: int | None = None  # default 2/3 of expert_dim (paper: 512 of 768), 0 when num_experts == 1
    route: str = "hash-random"
    split: str = "importance"
    importance: str | None = None  # default <teacher>/importance.safetensors
    balance_data: str | None = None  # hash-balance: a task file whose token frequencies balance the table
    balance_table: str | None = None  # hash-balance: safetensors with `token_counts` [vocab] or `table` [vocab]
    layers: list[int] | None = None  # default: every layer
    load_balance_weight: float = 0.01
    expert_dropout: float = 0.1
    seed: int = 0
    overwrite: bool = False


def convert(cfg: ConvertConfig) -> Path:
    """Write a MoEBERT checkpoint to cfg.output_dir and return its path. Writes nothing on error."""
    if cfg.route not in ROUTE_METHODS:
        raise ValueError(f"unknown route {cfg.route!r}: expected one of {', '.join(ROUTE_METHODS)}")
    if cfg.split not in SPLIT_METHODS:
        raise ValueError(f"unknown split {cfg.split!r}: expected one of {', '.join(SPLIT_METHODS)}")
    if cfg.num_experts < 1:
        raise ValueError(f"--num-experts must be ≥ 1, got {cfg.num_experts}")
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")

    teacher = load_model(cfg.teacher)
    tcfg = teacher.config
    if tcfg.is_moe:
        raise ValueError(f"{cfg.teacher} is already a MoEBERT model; convert a dense BERT")
    d_h, num_layers = tcfg.intermediate_size, tcfg.num_hidden_layers
    expert_dim = cfg.expert_dim or d_h // cfg.num_experts
    shared_dim = cfg.shared_dim if cfg.shared_dim is not None else (2 * expert_dim // 3 if cfg.num_experts > 1 else 0)
    if expert_dim > d_h:
        raise ValueError(f"--expert-dim {expert_dim} exceeds the teacher's FFN width {d_h}")
    if cfg.num_experts > 1 and shared_dim >= expert_dim:
        raise ValueError(
            f"--shared-dim {shared_dim} must be below --expert-dim {expert_dim} (else all experts are equal)"
        )
    layers = sorted(set(cfg.layers)) if cfg.layers is not None else list(range(num_layers))

    scores = _importance_scores(cfg, num_layers, d_h)
    table = _balance_table(cfg, tcfg.vocab_size) if cfg.route == "hash-balance" else None

    moe_config = MoEBertConfig(
        **{k: v for k, v in tcfg.to_dict().items() if k not in ("model_type", "transformers_version")}
        | dict(
            num_experts=cfg.num_experts, expert_dim=expert_dim, shared_dim=shared_dim, route_method=cfg.route,
            load_balance_weight=cfg.load_balance_weight if cfg.route.startswith("gate") else 0.0,
            expert_dropout=cfg.expert_dropout, split_method=cfg.split, moe_layers=layers, hash_seed=cfg.seed,
        )
    )  # fmt: skip
    torch.manual_seed(cfg.seed)  # gate weights start random
    student = type(teacher)(moe_config).eval()
    kept = _copy_weights(teacher, student, scores, cfg, expert_dim, shared_dim)
    if table is not None:
        for layer in _moe_layers(student):
            layer.moe.router.table.copy_(table)

    record = {
        "teacher": str(cfg.teacher),
        "importance": str(_importance_path(cfg)) if scores is not None else None,
        "config": asdict(cfg),
        "num_experts": cfg.num_experts,
        "expert_dim": expert_dim,
        "shared_dim": shared_dim,
        "layers": layers,
        "kept_neurons": {str(i): k.tolist() for i, k in kept.items()},
    }
    _save_atomically(student, cfg.teacher, out, record, cfg.overwrite)
    log.info(
        "wrote %s (%d MoE layers, N=%d, d_e=%d, s=%d, %s)",
        out,
        len(layers),
        cfg.num_experts,
        expert_dim,
        shared_dim,
        cfg.route,
    )
    return out


def _importance_path(cfg: ConvertConfig) -> Path:
    return Path(cfg.importance) if cfg.importance else Path(cfg.teacher) / IMPORTANCE_FILE


def _importance_scores(cfg: ConvertConfig, num_layers: int, d_h: int) -> list[torch.Tensor] | None:
    if cfg.split == "random":
        return None
    path = _importance_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(
            f"the {cfg.split!r} split needs an importance file and {path} does not exist: "
            "run `moebert importance` on the teacher, pass --importance FILE, or use --split random"
        )
    return load_importance(path, num_layers, d_h)


def _balance_table(cfg: ConvertConfig, vocab_size: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    if cfg.balance_table:
        from safetensors.torch import load_file

        tensors = load_file(cfg.balance_table)
        if "table" in tensors:
            table = tensors["table"].long()
            if table.shape != (vocab_size,) or int(table.min()) < 0 or int(table.max()) >= cfg.num_experts:
                raise ValueError(
                    f"{cfg.balance_table}: table must be [{vocab_size}] with values in [0, {cfg.num_experts})"
                )
            return table
        if "token_counts" not in tensors:
            raise ValueError(f"{cfg.balance_table}: expected a `table` or `token_counts` tensor")
        counts = tensors["token_counts"].long()
        if counts.shape != (vocab_size,):
            raise ValueError(
                f"{cfg.balance_table}: token_counts has shape {tuple(counts.shape)}, vocab is {vocab_size}"
            )
    elif cfg.balance_data:
        tokenizer = AutoTokenizer.from_pretrained(cfg.teacher)
        counts = token_counts(read_texts(cfg.balance_data), tokenizer, vocab_size)
        if counts.sum() == 0:
            raise ValueError(f"{cfg.balance_data}: no tokens found to balance on")
    else:
        raise ValueError("--route hash-balance needs --balance-data (a training file) or --balance-table")
    table = balanced_hash_table(counts, cfg.num_experts, cfg.seed)
    log.info("hash-balance tokens per expert: %s", routed_load(table, counts, cfg.num_experts).tolist())
    return table


def _moe_layers(model: MoEBertPreTrainedModel):
    return [layer for layer in model.base_model.encoder.layer if layer.moe is not None]


@torch.no_grad()
def _copy_weights(
    teacher, student, scores, cfg: ConvertConfig, expert_dim: int, shared_dim: int
) -> dict[int, torch.Tensor]:
    """Everything but the MoE layers' FFNs is copied as is; each expert gets its neurons' slices."""
    missing, _ = student.load_state_dict(teacher.state_dict(), strict=False)
    expected_missing = (".moe.",)
    stray = [k for k in missing if not any(tag in k for tag in expected_missing)]
    if stray:
        raise ValueError(f"teacher checkpoint lacks weights the student needs: {stray[:5]}")
    kept_by_layer = {}
    for i, (t_layer, s_layer) in enumerate(
        zip(teacher.base_model.encoder.layer, student.base_model.encoder.layer, strict=True)
    ):
        if s_layer.moe is None:
            continue
        w1, b1 = t_layer.intermediate.dense.weight, t_layer.intermediate.dense.bias  # [d_h, d], [d_h]
        w2 = t_layer.output.dense.weight  # [d, d_h]
        layer_scores = scores[i] if scores is not None else torch.zeros(w1.shape[0])
        order = neuron_order(layer_scores, cfg.split, seed=cfg.seed * 1000 + i)
        kept = expert_neurons(order, cfg.num_experts, expert_dim, shared_dim)  # [N, d_e]
        moe = s_layer.moe
        moe.fc1_weight.copy_(w1[kept].transpose(1, 2))  # [N, d, d_e]
        moe.fc1_bias.copy_(b1[kept])  # [N, d_e]
        moe.fc2_weight.copy_(w2.t()[kept])  # [N, d_e, d]
        moe.fc2_bias.copy_(t_layer.output.dense.bias.expand_as(moe.fc2_bias))
        moe.ln_weight.copy_(t_layer.output.LayerNorm.weight.expand_as(moe.ln_weight))
        moe.ln_bias.copy_(t_layer.output.LayerNorm.bias.expand_as(moe.ln_bias))
        moe.kept_neurons.copy_(kept)
        kept_by_layer[i] = kept
    return kept_by_layer


def _save_atomically(model, teacher: str, out: Path, record: dict, overwrite: bool) -> None:
    """Write into a sibling temp folder, then rename: an interrupted run leaves no half-written checkpoint."""
    from transformers import AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        try:
            AutoTokenizer.from_pretrained(teacher).save_pretrained(tmp)
        except (OSError, ValueError) as err:
            log.warning("no tokenizer saved with the model: %s", err)
        (tmp / "conversion.json").write_text(json.dumps(record, indent=1))
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out.exists():
            if not overwrite and any(out.iterdir()):
                raise FileExistsError(f"{out} appeared while converting")
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
