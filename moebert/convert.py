"""Dense fine-tuned BERT → MoEBERT (METHOD.md §2–3): a plain function from one folder to another.

`convert` writes the output folder atomically (moebert.atomic); `convert_into` fills a folder someone
else publishes (the training pipeline's convert stage, which adds its stage record).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moebert.atomic import atomic_folder
from moebert.configuration import MoEBertConfig, check_moe_settings
from moebert.loading import load_model, load_tokenizer
from moebert.modeling import MoEBertPreTrainedModel
from moebert.routing import balanced_hash_table, read_lines, routed_load, token_counts
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
    balance_data: str | None = None  # hash-balance: a plain text file (one text per line) to count tokens on
    balance_table: str | None = None  # hash-balance: safetensors with `token_counts` [vocab] or `table` [vocab]
    layers: list[int] | None = None  # default: every layer
    load_balance_weight: float = 0.01
    expert_dropout: float = 0.1
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        """The settings checkable without the teacher, before anything is loaded or written."""
        check_moe_settings(
            route=self.route, split=self.split, num_experts=self.num_experts, expert_dim=self.expert_dim,
            shared_dim=self.shared_dim,
        )  # fmt: skip


def convert(cfg: ConvertConfig) -> Path:
    """Write a MoEBERT checkpoint to cfg.output_dir and return its path. Writes nothing on error."""
    out = Path(cfg.output_dir)
    with atomic_folder(out, overwrite=cfg.overwrite) as tmp:
        convert_into(cfg, tmp)
    return out


def convert_into(cfg: ConvertConfig, folder: Path) -> None:
    """Write the MoEBERT checkpoint's files (weights, config, tokenizer, conversion.json) into `folder`."""
    teacher = load_model(cfg.teacher)
    tcfg = teacher.config
    if tcfg.is_moe:
        raise ValueError(f"{cfg.teacher} is already a MoEBERT model; convert a dense BERT")
    d_h, num_layers = tcfg.intermediate_size, tcfg.num_hidden_layers
    expert_dim = cfg.expert_dim or d_h // cfg.num_experts
    shared_dim = cfg.shared_dim if cfg.shared_dim is not None else (2 * expert_dim // 3 if cfg.num_experts > 1 else 0)
    check_moe_settings(num_experts=cfg.num_experts, expert_dim=expert_dim, shared_dim=shared_dim, ffn_width=d_h)
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
    student.save_pretrained(folder)
    try:
        load_tokenizer(cfg.teacher).save_pretrained(folder)
    except (OSError, ValueError) as err:
        log.warning("no tokenizer saved with the model: %s", err)
    (folder / "conversion.json").write_text(json.dumps(record, indent=1))
    log.info(
        "converted %s (%d MoE layers, N=%d, d_e=%d, s=%d, %s) → %s",
        cfg.teacher, len(layers), cfg.num_experts, expert_dim, shared_dim, cfg.route, cfg.output_dir,
    )  # fmt: skip


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
        counts = token_counts(read_lines(cfg.balance_data), load_tokenizer(cfg.teacher), vocab_size)
        if counts.sum() == 0:
            raise ValueError(f"{cfg.balance_data}: no tokens found to balance on")
    else:
        raise ValueError(
            "--route hash-balance needs --balance-data (a text file, one text per line) or --balance-table"
        )
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
