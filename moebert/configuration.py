"""MoEBertConfig: a BertConfig plus the MoE fields. With `moe_layers=[]` it describes a plain dense BERT,
so a stock BERT checkpoint loads into the MoEBERT classes as the dense teacher.

`check_moe_settings` is the one check of the MoE settings (route, split, N, d_e, s): the config, `moebert
convert`'s ConvertConfig, the neuron split and the training pipeline's config all call it, each with
what it knows at that point (the FFN width is known once the teacher is loaded).
"""

from __future__ import annotations

from transformers import BertConfig

ROUTE_METHODS = ("hash-random", "hash-balance", "gate-token", "gate-sentence")
SPLIT_METHODS = ("importance", "random", "inverse")
ATTENTION_CORES = ("auto", "plain", "fused")  # how ONNX export writes the attention core (moebert.onnx_export)


def check_moe_settings(
    *,
    route: str | None = None,
    split: str | None = None,
    num_experts: int | None = None,
    expert_dim: int | None = None,
    shared_dim: int | None = None,
    ffn_width: int | None = None,
) -> None:
    """Raise ValueError naming the first bad setting; None means "not known here" and is not checked.

    expert_dim must fit the FFN (1 ≤ d_e ≤ ffn_width, the teacher's d_h); shared_dim must be in
    [0, d_e], and below d_e when there are several experts (else every expert would be the same).
    """
    if route is not None and route not in ROUTE_METHODS:
        raise ValueError(f"unknown route {route!r}: expected one of {', '.join(ROUTE_METHODS)}")
    if split is not None and split not in SPLIT_METHODS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLIT_METHODS)}")
    if num_experts is not None and num_experts < 1:
        raise ValueError(f"num_experts (--num-experts) must be ≥ 1, got {num_experts}")
    if expert_dim is not None:
        if expert_dim < 1:
            raise ValueError(f"expert_dim (--expert-dim) must be ≥ 1, got {expert_dim}")
        if ffn_width is not None and expert_dim > ffn_width:
            raise ValueError(f"--expert-dim {expert_dim} exceeds the teacher's FFN width {ffn_width}")
    if shared_dim is not None:
        if shared_dim < 0:
            raise ValueError(f"shared_dim (--shared-dim) must be ≥ 0, got {shared_dim}")
        if expert_dim is not None and shared_dim > expert_dim:
            raise ValueError(f"--shared-dim {shared_dim} must be at most --expert-dim {expert_dim}")
        if expert_dim is not None and (num_experts or 1) > 1 and shared_dim == expert_dim:
            raise ValueError(
                f"--shared-dim {shared_dim} must be below --expert-dim {expert_dim} (else all experts are equal)"
            )


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
        check_moe_settings(
            route=self.route_method, split=self.split_method, num_experts=self.num_experts,
            expert_dim=self.expert_dim, shared_dim=self.shared_dim, ffn_width=self.intermediate_size,
        )  # fmt: skip
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"moe_layers {bad} out of range for {self.num_hidden_layers} layers")

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)
