"""MoEBertConfig: a BertConfig plus the MoE fields. With `moe_layers=[]` it describes a plain dense BERT,
so a stock BERT checkpoint loads into the MoEBERT classes as the dense teacher."""

from __future__ import annotations

from transformers import BertConfig

ROUTE_METHODS = ("hash-random", "hash-balance", "gate-token", "gate-sentence")
SPLIT_METHODS = ("importance", "random", "inverse")


class MoEBertConfig(BertConfig):
    """BERT + top-1 Mixture-of-Experts FFNs (Zuo et al., NAACL 2022).

    num_experts:          N experts per MoE layer.
    expert_dim:           d_e, width of each expert's FFN (defaults to intermediate_size // num_experts).
    shared_dim:           s, number of top-importance neurons every expert keeps.
    route_method:         one of ROUTE_METHODS.
    load_balance_weight:  weight of the Switch balance loss (gated routing only).
    expert_dropout:       dropout on each expert's output before the residual (replaces hidden dropout there).
    split_method:         how the teacher's neurons were ordered before the split (a record; see SPLIT_METHODS).
    moe_layers:           indices of the layers whose FFN is an MoE; [] means a dense BERT.
    hash_seed:            seed of the hash-random tables (the tables themselves are checkpoint buffers).
    moe_backend:          None (auto: env MOEBERT_MOE_BACKEND, else triton on CUDA, else torch),
                          or "reference" / "torch" / "triton".
    """

    model_type = "moebert"

    num_experts: int = 4
    expert_dim: int | None = None
    shared_dim: int = 0
    route_method: str = "hash-random"
    load_balance_weight: float = 0.0
    expert_dropout: float = 0.1
    split_method: str = "importance"
    moe_layers: list[int] | None = None
    hash_seed: int = 0
    moe_backend: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.moe_layers is None:
            self.moe_layers = []
        self.moe_layers = sorted(int(i) for i in self.moe_layers)
        if self.expert_dim is None:
            self.expert_dim = self.intermediate_size // max(self.num_experts, 1)
        self.check_moe()

    def check_moe(self) -> None:
        """Raise ValueError with a readable message if the MoE fields do not fit together."""
        if self.route_method not in ROUTE_METHODS:
            raise ValueError(f"route_method {self.route_method!r}: expected one of {', '.join(ROUTE_METHODS)}")
        if self.split_method not in SPLIT_METHODS:
            raise ValueError(f"split_method {self.split_method!r}: expected one of {', '.join(SPLIT_METHODS)}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be ≥ 1, got {self.num_experts}")
        if not 1 <= self.expert_dim <= self.intermediate_size:
            raise ValueError(
                f"expert_dim must be in [1, intermediate_size={self.intermediate_size}], got {self.expert_dim}"
            )
        if not 0 <= self.shared_dim <= self.expert_dim:
            raise ValueError(f"shared_dim must be in [0, expert_dim={self.expert_dim}], got {self.shared_dim}")
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"moe_layers {bad} out of range for {self.num_hidden_layers} layers")

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)
