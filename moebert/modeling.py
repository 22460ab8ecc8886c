"""MoEBERT: BERT whose FFNs are top-1 Mixture-of-Experts layers (Zuo et al., NAACL 2022).

One model definition, read top to bottom: embeddings → layers (self-attention, then a dense FFN or an
MoE FFN) → heads. With `config.moe_layers == []` it is exactly BERT, and parameter names follow
transformers' BERT, so a stock BERT checkpoint loads as the dense teacher.

Shapes: B batch, T sequence length, d hidden size, d_h dense FFN width, E experts, d_e expert width,
N tokens the FFNs run on: the non-padding tokens of the batch (the packed layout, CPU default), or all
B·T of them (the padded layout, the CUDA inference default: no data-dependent shapes, so no host synchronisation and a
forward that a CUDA graph can capture; padding rows are computed and discarded).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from moebert.configuration import MoEBertConfig

# ----------------------------------------------------------------------------------------------------
# Outputs


@dataclass
class MoEBertModelOutput(ModelOutput):
    """last_hidden_state [B, T, d]; pooler_output [B, d] or None; hidden_states: L+1 tensors [B, T, d]
    (embeddings first) when asked for; router_aux_loss: summed balance loss of gated layers (scalar);
    expert_counts [num MoE layers, E]: tokens routed to each expert, when asked for."""

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    router_aux_loss: torch.Tensor | None = None
    expert_counts: torch.Tensor | None = None


@dataclass
class MoEBertSequenceClassifierOutput(ModelOutput):
    """logits [B, num_labels]; loss includes load_balance_weight · router_aux_loss."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    router_aux_loss: torch.Tensor | None = None
    expert_counts: torch.Tensor | None = None


@dataclass
class MoEBertQuestionAnsweringOutput(ModelOutput):
    """start_logits, end_logits [B, T]; loss = mean of start and end cross-entropy (+ balance loss)."""

    loss: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    router_aux_loss: torch.Tensor | None = None
    expert_counts: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------
# Embeddings and attention (BERT as published; names as in transformers)


class MoEBertEmbeddings(nn.Module):
    def __init__(self, config: MoEBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """input_ids [B, T] → [B, T, d]"""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class MoEBertSelfAttention(nn.Module):
    def __init__(self, config: MoEBertConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not a multiple of {config.num_attention_heads} heads"
            )
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout_p = config.attention_probs_dropout_prob

    def forward(self, tokens: torch.Tensor, layout: TokenLayout, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """tokens [N, d] (the layout's), attn_mask [B, 1, 1, T] bool (True = attend) or None → context [N, d].
        Q, K and V are projected on the N tokens; only the attention core sees the padded layout, filled by
        one row gather (layout.slot_index), and one row gather takes the N real rows back out of it."""
        d = tokens.shape[-1]
        B, T = layout.attention_mask.shape

        def padded(t: torch.Tensor) -> torch.Tensor:  # [N, d] → [B, heads, T, d/heads]
            if layout.slot_index is not None:
                t = t.index_select(0, layout.slot_index)  # [B*T, d]
            return t.view(B, T, self.num_heads, -1).transpose(1, 2)

        q, k, v = (padded(proj(tokens)) for proj in (self.query, self.key, self.value))
        ctx = self.core(q, k, v, attn_mask).transpose(1, 2).reshape(B * T, d)
        return ctx if layout.token_index is None else ctx.index_select(0, layout.token_index)

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(QKᵀ/√d_head, masked)·V: q, k, v [B, heads, T, d/heads] → the same shape"""
        dropout_p = self.attention_dropout_p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


class MoEBertSelfOutput(nn.Module):
    """LayerNorm(x + dropout(dense(h))): BERT's post-norm residual, after attention and after the FFN."""

    def __init__(self, in_dim: int, config: MoEBertConfig):
        super().__init__()
        self.dense = nn.Linear(in_dim, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(h)))


class MoEBertAttention(nn.Module):
    def __init__(self, config: MoEBertConfig):
        super().__init__()
        self.self = MoEBertSelfAttention(config)
        self.output = MoEBertSelfOutput(config.hidden_size, config)

    def forward(self, tokens: torch.Tensor, layout: TokenLayout, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """tokens [N, d] → [N, d] (see MoEBertSelfAttention.forward)"""
        return self.output(self.self(tokens, layout, attn_mask), tokens)


# ----------------------------------------------------------------------------------------------------
# FFNs. Both take the N non-padding tokens of the batch, flattened: x [N, d] → [N, d].


class MoEBertIntermediate(nn.Module):
    """Holds the dense FFN's first matmul; a module of its own only to keep BERT's parameter names."""

    def __init__(self, config: MoEBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)


TOKEN_LAYOUTS = ("auto", "packed", "padded")


@dataclass
class TokenLayout:
    """Where the non-padding tokens of a batch are, computed once per forward and shared by all layers.

    Packed (padded=False): valid [B*T] bool or None (None: no padding); input_ids [N]; seq_index [N] (batch
    row of each token); the FFNs see only the N non-padding tokens.
    Padded (padded=True): N = B*T, valid [B*T] bool always given (the weight of each token in pooling,
    balance loss and expert counts); every token-wise matmul sees every token, and padding positions keep
    the layer's input, as in the packed layout.
    attention_mask [B, T] bool. Packed with padding: token_index [N] (where each token sits in B*T: the
    encoder gathers the N rows once and scatters them back once) and slot_index [B*T] (which of the N rows
    fills each slot of the padded attention layout; a padding slot repeats a real token's row, which the
    mask hides as a key and whose output row is discarded); both None otherwise.
    """

    valid: torch.Tensor | None
    input_ids: torch.Tensor | None
    seq_index: torch.Tensor
    attention_mask: torch.Tensor
    batch_size: int
    token_index: torch.Tensor | None = None
    slot_index: torch.Tensor | None = None
    padded: bool = False

    def token_weight(self, dtype: torch.dtype) -> torch.Tensor | None:
        """[N] 1 for a real token, 0 for padding (padded layout); None when every one of the N is real."""
        return self.valid.to(dtype) if self.padded else None


@dataclass
class Routing:
    """expert_ids [N] long; scale [N] (gate probability) or None; aux_loss scalar or None."""

    expert_ids: torch.Tensor
    scale: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class HashRouter(nn.Module):
    """Routes by input id: expert = table[input_id]. No parameters, no scaling, no loss.

    The table [vocab] is a buffer saved with the checkpoint: hash-random draws one per layer from a seed;
    hash-balance sets the same frequency-balanced table in every layer (see moebert.routing).
    """

    def __init__(self, config: MoEBertConfig, layer_idx: int):
        super().__init__()
        generator = torch.Generator().manual_seed(config.hash_seed * 1000 + layer_idx)
        table = torch.randint(config.num_experts, (config.vocab_size,), generator=generator, device="cpu")
        self.register_buffer("table", table)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> Routing:
        if layout.input_ids is None:
            raise ValueError("hash routing needs input_ids (inputs_embeds alone cannot be routed)")
        return Routing(self.table[layout.input_ids])


def switch_balance_loss(
    probs: torch.Tensor, expert_ids: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer balance loss N · Σ_i P_i f_i; probs [n, E] fp32, expert_ids [n]; weight [n] 0/1
    (padded layout: only weighted rows count, computed without a host synchronisation)."""
    num_experts = probs.shape[-1]
    if weight is None:
        fraction = torch.bincount(expert_ids, minlength=num_experts).to(probs.dtype) / max(expert_ids.numel(), 1)
        return num_experts * (probs.mean(0) * fraction).sum()
    total = weight.sum().clamp(min=1)
    fraction = expert_histogram(expert_ids, num_experts, weight.to(probs.dtype)) / total
    return num_experts * ((probs * weight.unsqueeze(-1)).sum(0) / total * fraction).sum()


def expert_histogram(expert_ids: torch.Tensor, num_experts: int, weight: torch.Tensor) -> torch.Tensor:
    """[E] Σ weight per expert: a scatter-add, which (unlike CUDA bincount) never asks the host for the max."""
    return weight.new_zeros(num_experts).scatter_add_(0, expert_ids, weight)


class TokenGate(nn.Module):
    """gate-token: bias-free linear gate d → E, softmax, top-1 per token; output scaled by its probability."""

    def __init__(self, config: MoEBertConfig):
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> Routing:
        probs = self.gate(x).float().softmax(-1)  # [N, E]
        scale, expert_ids = probs.max(-1)
        return Routing(expert_ids, scale, switch_balance_loss(probs, expert_ids, layout.token_weight(probs.dtype)))


class SentenceGate(nn.Module):
    """gate-sentence: the gate reads the attention output mean-pooled over each sequence's non-padding
    tokens; one expert (scaled by its probability) serves the whole sequence in this layer. Pooling
    covers only the sequence's own tokens, so an example's output does not depend on its batch."""

    def __init__(self, config: MoEBertConfig):
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> Routing:
        B = layout.batch_size
        if layout.padded:  # padding weighs 0; no bincount (a host synchronisation on CUDA)
            weight = layout.token_weight(x.dtype)
            summed = (x.view(B, -1, x.shape[-1]) * weight.view(B, -1, 1)).sum(1)  # [B, d]
            counts = weight.view(B, -1).sum(1).clamp(min=1).unsqueeze(-1)
        else:
            summed = x.new_zeros(B, x.shape[-1]).index_add(0, layout.seq_index, x)  # [B, d]
            counts = torch.bincount(layout.seq_index, minlength=B).clamp(min=1).unsqueeze(-1)
        probs = self.gate(summed / counts).float().softmax(-1)  # [B, E]
        scale, seq_expert = probs.max(-1)
        return Routing(seq_expert[layout.seq_index], scale[layout.seq_index], switch_balance_loss(probs, seq_expert))


def make_router(config: MoEBertConfig, layer_idx: int) -> nn.Module:
    if config.route_method == "gate-token":
        return TokenGate(config)
    if config.route_method == "gate-sentence":
        return SentenceGate(config)
    return HashRouter(config, layer_idx)  # hash-random, hash-balance


class MoEFFN(nn.Module):
    """Top-1 MoE FFN. Expert e computes LayerNorm_e(x + scale · fc2_e(gelu(fc1_e x))).

    Weights are stacked per expert (the layout the Triton kernel reads):
    fc1_weight [E, d, d_e], fc1_bias [E, d_e], fc2_weight [E, d_e, d], fc2_bias [E, d],
    ln_weight / ln_bias [E, d]. kept_neurons [E, d_e] records which teacher FFN neurons each expert
    was cut from (-1 when not converted from a teacher).
    """

    def __init__(self, config: MoEBertConfig, layer_idx: int):
        super().__init__()
        E, d, d_e = config.num_experts, config.hidden_size, config.expert_dim
        self.fc1_weight = nn.Parameter(torch.empty(E, d, d_e))
        self.fc1_bias = nn.Parameter(torch.zeros(E, d_e))
        self.fc2_weight = nn.Parameter(torch.empty(E, d_e, d))
        self.fc2_bias = nn.Parameter(torch.zeros(E, d))
        self.ln_weight = nn.Parameter(torch.ones(E, d))
        self.ln_bias = nn.Parameter(torch.zeros(E, d))
        self.register_buffer("kept_neurons", torch.full((E, d_e), -1, dtype=torch.long))
        self.router = make_router(config, layer_idx)
        self.eps = config.layer_norm_eps
        self.expert_dropout_p = config.expert_dropout
        self.backend = config.moe_backend

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, Routing]:
        """x [N, d] → y [N, d] and the routing used"""
        from kernels import moe_ffn, resolve_backend  # lazy: kernels (and triton) load only when an MoE runs

        backend = resolve_backend(self.backend, x.device)
        if (
            backend == "triton"
            and isinstance(self.router, HashRouter)
            and layout.input_ids is not None
            and not (self.training and torch.is_grad_enabled())
        ):  # hash routing inside the kernel's routing step: no separate table lookup
            y, expert_ids = moe_ffn(
                x, None, self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias, self.ln_weight,
                self.ln_bias, eps=self.eps, backend=backend, hash_routing=(layout.input_ids, self.router.table),
            )  # fmt: skip
            return y, Routing(expert_ids)
        routing = self.router(x, layout)
        y = moe_ffn(
            x, routing.expert_ids, self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias,
            self.ln_weight, self.ln_bias, routing.scale, self.eps, self.expert_dropout_p, self.training, backend,
        )  # fmt: skip
        return y, routing


# ----------------------------------------------------------------------------------------------------
# Layers and encoder


class MoEBertLayer(nn.Module):
    """Self-attention, then the FFN: dense (BERT's `intermediate` + `output`) or an MoE (`moe`)."""

    def __init__(self, config: MoEBertConfig, layer_idx: int):
        super().__init__()
        self.attention = MoEBertAttention(config)
        self.moe = MoEFFN(config, layer_idx) if layer_idx in config.moe_layers else None
        if self.moe is None:
            self.intermediate = MoEBertIntermediate(config)
            self.output = MoEBertSelfOutput(config.intermediate_size, config)

    def forward(
        self, tokens: torch.Tensor, attn_mask: torch.Tensor | None, layout: TokenLayout
    ) -> tuple[torch.Tensor, Routing | None]:
        """tokens [N, d] → [N, d]: the layout's N tokens (packed: the real ones; padded: all B*T, where a
        select keeps padding's input). Every token-wise matmul (Q, K, V, the attention output, the FFN) runs
        on those N rows."""
        attn_out = self.attention(tokens, layout, attn_mask)
        routing = None
        if self.moe is None:
            y = self.output(F.gelu(self.intermediate.dense(attn_out)), attn_out)
        else:
            y, routing = self.moe(attn_out, layout)
        if layout.padded:
            y = torch.where(layout.valid.unsqueeze(-1), y, tokens)
        return y, routing


class MoEBertEncoder(nn.Module):
    def __init__(self, config: MoEBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(MoEBertLayer(config, i) for i in range(config.num_hidden_layers))

    def forward(self, x, attn_mask, layout, output_hidden_states: bool, output_expert_counts: bool):
        """x [B, T, d] → [B, T, d]. The layers pass the layout's N tokens [N, d] from one to the next: packed,
        the real tokens are gathered once here and scattered back once (padding positions keep x, which no
        output reads); row gathers and scatters, since masked_scatter would be element-wise in ONNX."""
        B, T, d = x.shape
        flat = x.reshape(B * T, d)
        index = layout.token_index  # [N] or None

        def unpacked(tokens: torch.Tensor) -> torch.Tensor:  # [N, d] → [B, T, d]
            return (tokens if index is None else flat.index_put((index,), tokens)).view(B, T, d)

        tokens = flat if index is None else flat.index_select(0, index)  # [N, d]
        hidden_states = [x] if output_hidden_states else None
        aux_losses, counts = [], []
        for layer in self.layer:
            tokens, routing = layer(tokens, attn_mask, layout)
            if hidden_states is not None:
                hidden_states.append(unpacked(tokens))
            if routing is not None:
                if routing.aux_loss is not None:
                    aux_losses.append(routing.aux_loss)
                if output_expert_counts:
                    num_experts = layer.moe.fc1_weight.shape[0]
                    if layout.padded:
                        counts.append(expert_histogram(routing.expert_ids, num_experts, layout.valid.long()))
                    else:
                        counts.append(torch.bincount(routing.expert_ids, minlength=num_experts))
        aux = torch.stack(aux_losses).sum() if aux_losses else None
        x = hidden_states[-1] if hidden_states is not None else unpacked(tokens)
        return x, hidden_states, aux, (torch.stack(counts) if counts else None)


class MoEBertPooler(nn.Module):
    def __init__(self, config: MoEBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


# ----------------------------------------------------------------------------------------------------
# Pretrained-model plumbing and the three public models


class MoEBertPreTrainedModel(PreTrainedModel):
    config_class = MoEBertConfig
    config: MoEBertConfig
    base_model_prefix = "bert"
    _no_split_modules = ["MoEBertLayer"]
    # Old BERT checkpoints carry these; they are derived, not learned.
    _keys_to_ignore_on_load_unexpected = [r"position_ids", r"token_type_ids", r"cls\.", r"pooler\."]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, MoEFFN):
            module.fc1_weight.normal_(0.0, std)
            module.fc2_weight.normal_(0.0, std)
            module.fc1_bias.zero_()
            module.fc2_bias.zero_()
            module.ln_weight.fill_(1.0)
            module.ln_bias.zero_()

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        """transformers' save, plus self-contained modeling code and `auto_map` in config.json, so the
        folder loads with `trust_remote_code=True` where this project is not installed."""
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            # transformers writes the weights through a private temporary file (mode 0600): a checkpoint
            # trained as one user would not load in a service running as another (the Docker image's).
            for weights in Path(save_directory).glob("model*.safetensors*"):
                weights.chmod(0o644)
            from moebert.remote_code import write_remote_code

            write_remote_code(save_directory)

    def set_token_layout(self, layout: str) -> None:
        """How the FFNs see a padded batch: `packed` (non-padding tokens only: least work, but boolean
        indexing and a host synchronisation), `padded` (every token: fixed shapes, no host synchronisation,
        capturable in a CUDA graph) or `auto` (padded for inference on CUDA, packed elsewhere and in training).
        Outputs agree either way."""
        if layout not in TOKEN_LAYOUTS:
            raise ValueError(f"unknown token layout {layout!r}: expected one of {', '.join(TOKEN_LAYOUTS)}")
        for module in self.modules():
            if isinstance(module, MoEBertModel):
                module.token_layout = layout

    def set_moe_backend(self, backend: str | None) -> None:
        """Switch every MoE layer to `reference`, `torch`, `triton` or None (auto)."""
        from kernels import check_backend

        if backend is not None:
            check_backend(backend)
        self.config.moe_backend = backend
        for module in self.modules():
            if isinstance(module, MoEFFN):
                module.backend = backend


class MoEBertModel(MoEBertPreTrainedModel):
    def __init__(self, config: MoEBertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = MoEBertEmbeddings(config)
        self.encoder = MoEBertEncoder(config)
        self.pooler = MoEBertPooler(config) if add_pooling_layer else None
        self.token_layout = "auto"  # see set_token_layout
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_expert_counts: bool = False,
        **_: object,
    ) -> MoEBertModelOutput:
        """input_ids, attention_mask, token_type_ids [B, T]"""
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        layout_mode = self.token_layout
        if layout_mode == "auto":  # training keeps packed: its grouped MoE backend synchronises anyway
            layout_mode = "padded" if input_ids.device.type == "cuda" and not self.training else "packed"
        if layout_mode == "padded":
            layout, attn_mask = self._padded_layout(input_ids, attention_mask)
        else:
            layout, attn_mask = self._packed_layout(input_ids, attention_mask)
        x = self.embeddings(input_ids, token_type_ids)
        x, hidden_states, aux, counts = self.encoder(x, attn_mask, layout, output_hidden_states, output_expert_counts)
        pooled = self.pooler(x) if self.pooler is not None else None
        return MoEBertModelOutput(
            last_hidden_state=x,
            pooler_output=pooled,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            router_aux_loss=aux,
            expert_counts=counts,
        )

    @staticmethod
    def _padded_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Every token goes through the FFNs; nothing here depends on the data, so nothing synchronises.
        A row with no token at all (a CUDA-graph bucket's filler row) attends everywhere instead of
        producing NaN; its outputs are discarded and its tokens weigh 0 in counts and pooling."""
        B, T = input_ids.shape
        layout = TokenLayout(
            valid=attention_mask.reshape(-1),
            input_ids=input_ids.reshape(-1),
            seq_index=torch.arange(B, device=input_ids.device)[:, None]
            .expand(B, T)
            .reshape(-1),  # no repeat_interleave
            attention_mask=attention_mask,
            batch_size=B,
            padded=True,
        )
        attend = attention_mask | ~attention_mask.any(-1, keepdim=True)  # [B, T]
        return layout, attend[:, None, None, :]

    @staticmethod
    def _packed_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Only non-padding tokens go through the FFNs (and no mask at all when there is no padding)."""
        B, T = input_ids.shape
        padded = not bool(attention_mask.all())
        valid = attention_mask.reshape(-1) if padded else None
        seq_index = torch.arange(B, device=input_ids.device).repeat_interleave(T)
        layout = TokenLayout(
            valid=valid,
            input_ids=input_ids.reshape(-1)[valid] if padded else input_ids.reshape(-1),
            seq_index=seq_index[valid] if padded else seq_index,
            attention_mask=attention_mask,
            batch_size=B,
            token_index=valid.nonzero().squeeze(-1) if padded else None,
            slot_index=(valid.long().cumsum(0) - 1).clamp(min=0) if padded else None,  # [B*T]: its row in N
        )
        attn_mask = attention_mask[:, None, None, :] if padded else None  # [B, 1, 1, T]
        return layout, attn_mask


def _with_balance_loss(loss: torch.Tensor | None, aux: torch.Tensor | None, weight: float) -> torch.Tensor | None:
    if loss is None or aux is None or weight == 0.0:
        return loss
    return loss + weight * aux


class MoEBertForSequenceClassification(MoEBertPreTrainedModel):
    """Classification (cross-entropy) or, with num_labels == 1, regression (MSE)."""

    def __init__(self, config: MoEBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = MoEBertModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_expert_counts: bool = False,
        **_: object,
    ) -> MoEBertSequenceClassifierOutput:
        """→ logits [B, num_labels]; labels [B] (long, or float for regression)"""
        out = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states, output_expert_counts)
        logits = self.classifier(self.dropout(out.pooler_output))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long())
        return MoEBertSequenceClassifierOutput(
            loss=_with_balance_loss(loss, out.router_aux_loss, self.config.load_balance_weight),
            logits=logits,
            hidden_states=out.hidden_states,
            router_aux_loss=out.router_aux_loss,
            expert_counts=out.expert_counts,
        )


class MoEBertForQuestionAnswering(MoEBertPreTrainedModel):
    """Extractive QA: start and end logits over the tokens."""

    def __init__(self, config: MoEBertConfig):
        super().__init__(config)
        self.bert = MoEBertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_expert_counts: bool = False,
        **_: object,
    ) -> MoEBertQuestionAnsweringOutput:
        """→ start_logits, end_logits [B, T]; start/end_positions [B] token indices"""
        out = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states, output_expert_counts)
        start_logits, end_logits = self.qa_outputs(out.last_hidden_state).unbind(-1)
        if attention_mask is not None:
            # Padding is never an answer, and must not change an example's softmax: whether it ran
            # alone or padded in a batch, its start/end distributions (and loss) are the same.
            pad = ~attention_mask.bool()
            start_logits, end_logits = start_logits.masked_fill(pad, -1e4), end_logits.masked_fill(pad, -1e4)
        loss = None
        if start_positions is not None and end_positions is not None:
            T = start_logits.shape[1]  # positions outside the window are ignored, as in transformers
            start = F.cross_entropy(start_logits.float(), start_positions.clamp(0, T), ignore_index=T)
            end = F.cross_entropy(end_logits.float(), end_positions.clamp(0, T), ignore_index=T)
            loss = (start + end) / 2
        return MoEBertQuestionAnsweringOutput(
            loss=_with_balance_loss(loss, out.router_aux_loss, self.config.load_balance_weight),
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=out.hidden_states,
            router_aux_loss=out.router_aux_loss,
            expert_counts=out.expert_counts,
        )
