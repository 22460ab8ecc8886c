"""Export a dense BERT or a MoEBERT checkpoint to ONNX for ONNX Runtime, with routing inside the graph.

What the exported graph contains, and why:
- The layers are the model's own, which remove padding from every token-wise matmul: the encoder
  gathers the N non-padding rows of the [B*T, d] embeddings once, the layers pass [N, d] from one to the
  next, and one row scatter writes the last layer's rows back. Q, K, V, the attention output projection
  and the FFN run on the N rows; only the attention core (QKᵀ, softmax, ·V) sees the padded
  [B, heads, T, T] layout, filled by one row Gather per projection (scatters into zeros per projection
  and a gather/scatter pair per layer were 4% of the dense int8 graph at 16 × 24 on AVX2, 8% on VNNI). Served batches of
  mixed-length texts are about half padding, and ORT's fused `Attention` op (which projects Q, K, V on
  every padded position) cost more there than the unfused core does: 1.22× (dense) and 1.35× (MoE) faster
  on int8 at 8 × 48 with SST-2-like lengths, and level on unpadded batches (benchmarks/bench_backends.py,
  benchmarks/onnx_profile.py). The MoE FFN is the `export` kernel backend (`kernels.export`): it routes
  the N tokens (hash: a table lookup from the input ids; gates: Linear → Softmax → ArgMax), each expert
  gathers its rows, and one row ScatterND writes all experts' outputs back. The experts keep the exact
  (erf) GELU: ONNX Runtime fuses it into its `Gelu` op, so nothing is approximated (com.microsoft.MoE,
  whose GELU is the tanh approximation, is not used).
- The attention core (`MoEBertSelfAttention.core`, torch's SDPA in the model) is softmax(QKᵀ/√d_head +
  (1 − mask)·(−10000))·V, the same function as SDPA with a boolean mask: a masked key's weight underflows
  to exactly 0 in fp32 (with denormals flushed, as the server runs ORT). `attention="plain"` traces it as
  plain ops (MatMul, Add, Softmax, MatMul); `fused` as ORT's com.microsoft.MultiHeadAttention (same
  function, one op per layer); `auto` (the default) fuses it for QA models only. Measured on int8 graphs
  (MiniLM-L6 dense and MoE, 1 thread, AVX2, interleaved; graph_ab_attention_core_qa_avx2.md): fused is
  2–19% faster on batches of 4–8 QA windows (up to 256 tokens, mixed lengths), level at 1–2 windows, and
  2–9% slower at short classification batches (16 × 24), where the plain ops stay.
- The example batch is padded, so the padding-removing path is the one traced; it is also correct (and as
  fast) for unpadded batches.
- Outputs: logits [B, C] or start_logits, end_logits [B, T]; for MoE models also expert_counts
  [num MoE layers, E], the tokens routed to each expert (padding excluded), which the server exports.
- The router balance loss (a training signal, no graph output) needs torch.bincount, which has no ONNX
  export, and the sentence gate pools with index_add, which the exporter gets wrong for repeated indices
  (it overwrites instead of adding): during export both are swapped for an equivalent scatter-add
  (ScatterElements with reduction="add").

Files (in <checkpoint>/onnx by default): model.onnx (optimized fp32), model.int8.onnx (dynamic int8
quantization of the MatMuls, with --quantize), export.json (what was exported and the measured
ORT-vs-torch deviations).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import types
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from moebert.configuration import ATTENTION_CORES
from moebert.loading import load_model, task_of
from moebert.modeling import MoEBertSelfAttention, MoEFFN

log = logging.getLogger("moebert.onnx")

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
FP32_TOLERANCE = 1e-4  # max |Δ logit| ORT fp32 vs torch; measured ~1e-7 on MiniLM-sized models


@dataclass
class ExportResult:
    files: list[Path]
    task: str
    outputs: list[str]
    fused_operators: dict[str, int] = field(default_factory=dict)
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # "fp32" / "int8": max |Δ| vs torch


def _attention_core(self: MoEBertSelfAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    attn_mask: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """MoEBertSelfAttention.core as plain MatMul → Add → Softmax → MatMul (see the module doc):
    q, k, v [B, heads, T, d/heads] → the same shape."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, heads, T, T]
    if attn_mask is not None:
        scores = scores + (1.0 - attn_mask.to(scores.dtype)) * -10000.0
    return torch.matmul(scores.softmax(-1), v)


@torch.library.custom_op("moebert::multi_head_attention", mutates_args=())
def _multi_head_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """q, k, v [B, T, d], key_mask [B, T] int32 (1 = attend) → [B, T, d]: the attention core as one op, which
    exports as ORT's com.microsoft.MultiHeadAttention (see _fused_attention_core)."""
    B, T, d = q.shape
    heads = lambda t: t.view(B, T, num_heads, -1).transpose(1, 2)  # noqa: E731  [B, heads, T, d/heads]
    out = _attention_core(None, heads(q), heads(k), heads(v), key_mask.bool()[:, None, None, :])
    return out.transpose(1, 2).reshape(B, T, d)


def _multi_head_attention_onnx(g, q, k, v, key_mask, num_heads):
    from torch.onnx.symbolic_helper import _get_const

    no_bias = g.op("prim::Constant").setType(torch._C.OptionalType.ofTensor())  # an omitted optional input
    heads = _get_const(num_heads, "i", "num_heads")
    out = g.op("com.microsoft::MultiHeadAttention", q, k, v, no_bias, key_mask, num_heads_i=heads)
    out.setType(q.type())  # [B, T, d], as q
    return out


torch.onnx.register_custom_op_symbolic("moebert::multi_head_attention", _multi_head_attention_onnx, 1)


def _fused_attention_core(self: MoEBertSelfAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          attn_mask: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """MoEBertSelfAttention.core as ORT's MultiHeadAttention (the same function; a masked key weighs 0):
    q, k, v [B, heads, T, d/heads] → the same shape. The transposes around it cancel in ORT's optimizer."""
    B, heads, T, d_head = q.shape
    merged = lambda t: t.transpose(1, 2).reshape(B, T, heads * d_head)  # noqa: E731  [B, T, d]
    key_mask = (attn_mask.reshape(B, T) if attn_mask is not None else q.new_ones(B, T)).to(torch.int32)
    out = torch.ops.moebert.multi_head_attention(merged(q), merged(k), merged(v), key_mask, heads)
    return out.view(B, T, heads, d_head).transpose(1, 2)


def _bincount(x: torch.Tensor, weights=None, minlength: int = 0) -> torch.Tensor:
    """torch.bincount for the model's uses (ids known to be < minlength), as an exportable scatter-add."""
    if weights is not None:
        raise NotImplementedError("weighted bincount")
    return torch.zeros(minlength, dtype=torch.long, device=x.device).scatter_add(0, x, torch.ones_like(x))


def _index_add(self: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor, *, alpha=1) -> torch.Tensor:
    """Tensor.index_add along dim 0 (the model's use: pooling tokens [N, d] into sequences [B, d])."""
    if dim != 0 or alpha != 1:
        raise NotImplementedError("index_add export: dim 0, alpha 1 only")
    expanded = index.view(-1, *([1] * (source.dim() - 1))).expand_as(source)
    return self.scatter_add(0, expanded, source)


@contextlib.contextmanager
def export_mode(model, attention: str = "plain"):
    """The model as it is exported: export MoE backend, the attention core as plain ops or one fused op
    (`attention`: plain / fused), exportable bincount; restored after."""
    backend = model.config.moe_backend
    attentions = [m for m in model.modules() if isinstance(m, MoEBertSelfAttention)]
    original_bincount, original_index_add = torch.bincount, torch.Tensor.index_add
    core = {"plain": _attention_core, "fused": _fused_attention_core}[attention]
    model.set_moe_backend("export")
    for m in attentions:
        m.core = types.MethodType(core, m)
    torch.bincount, torch.Tensor.index_add = _bincount, _index_add
    try:
        yield model
    finally:
        torch.bincount, torch.Tensor.index_add = original_bincount, original_index_add
        for m in attentions:
            del m.core  # back to the class's method
        model.set_moe_backend(backend)


class _Exported(torch.nn.Module):
    """Positional inputs → a flat tuple of outputs (logits..., expert_counts)."""

    def __init__(self, model, output_names: list[str]):
        super().__init__()
        self.model = model
        self.output_names = output_names
        self.moe = [m for m in model.modules() if isinstance(m, MoEFFN)]

    def forward(self, input_ids, attention_mask, token_type_ids):
        routed: list[torch.Tensor] = []  # each MoE layer's expert ids [N], caught on the way
        hooks = [m.router.register_forward_hook(lambda _m, _i, out: routed.append(out.expert_ids)) for m in self.moe]
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        finally:
            for h in hooks:
                h.remove()
        heads = [getattr(out, name) for name in self.output_names if name != "expert_counts"]
        if not self.moe:
            return tuple(heads)
        E = self.moe[0].fc1_weight.shape[0]
        counts = torch.stack([F.one_hot(ids, E).sum(0) for ids in routed])  # [num MoE layers, E]
        return (*heads, counts)


def example_batch(vocab_size: int, batch: int = 2, length: int = 16, seed: int = 0, max_len: int = 512):
    """Random ids with padding in every row but the first (so that the padded path is what is traced)."""
    g = torch.Generator().manual_seed(seed)
    length = min(length, max_len)
    ids = torch.randint(1000 if vocab_size > 2000 else 1, vocab_size, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, batch):
        mask[i, int(torch.randint(2, length, (1,), generator=g)) :] = 0
    types_ = torch.zeros_like(ids)
    types_[:, length // 2 :] = 1
    return ids * mask, mask, types_ * mask


def max_deviation(model, session, batches) -> float:
    """max |ORT − torch| over the head outputs of the given batches, at non-padding positions."""
    worst = 0.0
    names = [o.name for o in session.get_outputs() if o.name != "expert_counts"]
    for ids, mask, types_ in batches:
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, token_type_ids=types_)
        got = session.run(
            names, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": types_.numpy()}
        )
        for name, value in zip(names, got, strict=True):
            ref = getattr(out, name).float().numpy()
            if ref.ndim == 2 and name != "logits":  # per-token outputs: padding positions are undefined
                keep = mask.numpy().astype(bool)
                ref, value = ref[keep], value[keep]
            worst = max(worst, float(np.abs(ref - value).max()))
    return worst


def _session(path: Path):
    import onnxruntime as ort

    from moebert.precision import exact_int8_session_entries

    options = ort.SessionOptions()
    options.log_severity_level = 3
    for key, value in exact_int8_session_entries("exact").items():  # int8 checked as the server runs it
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def quantize_int8(fp32: Path, int8: Path) -> None:
    """ONNX Runtime dynamic int8 quantization of every MatMul with constant weights (activations are
    quantized per call, per tensor; weights once, per output column)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        # DefaultTensorType: shape inference cannot type the outputs of ORT's fused ops; they are float.
        # per_channel: one scale per output column. Per-tensor scales cost 0.9 accuracy points on a
        # trained SST-2 MoEBERT (84.40 vs 85.32 fp32); per-channel 0.1 (85.21), as fast.
        quantize_dynamic(
            str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )  # fmt: skip


@contextlib.contextmanager
def _quiet():
    """ORT's optimizer and quantizer log every tensor of data-dependent shape (the NonZero outputs)."""
    level = logging.root.level
    logging.root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.root.setLevel(level)


def _optimize(raw: Path, out: Path, config) -> dict[str, int]:
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet():
        optimized = optimize_model(
            str(raw), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size
        )
    optimized.save_model_to_file(str(out))
    return {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}


def export_onnx(
    model_path: str | Path,
    output_dir: str | Path | None = None,
    *,
    quantize: bool = False,
    optimize: bool = True,
    opset: int = 17,
    check: bool = True,
    attention: str = "auto",
) -> ExportResult:
    """Export `model_path` (a classification or QA checkpoint, dense or MoE) to ONNX; see the module doc.
    attention: the attention core as `plain` ops, `fused` (ORT's MultiHeadAttention) or `auto` (fused for QA)."""
    if attention not in ATTENTION_CORES:
        raise ValueError(f"unknown attention core {attention!r}: expected one of {', '.join(ATTENTION_CORES)}")
    model_path = Path(model_path)
    out_dir = Path(output_dir) if output_dir else model_path / "onnx"
    model = load_model(model_path)
    task = task_of(model.config)
    if task not in ("classification", "qa"):
        raise ValueError(f"{model_path}: only classification and QA models are exported (task {task!r})")
    if attention == "auto":
        attention = "fused" if task == "qa" else "plain"
    heads = ["logits"] if task == "classification" else ["start_logits", "end_logits"]
    output_names = heads + (["expert_counts"] if model.config.moe_layers else [])
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "model.raw.onnx"
    fp32 = out_dir / "model.onnx"
    dynamic = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
    dynamic.update({name: {0: "batch"} if name == "logits" else {0: "batch", 1: "sequence"} for name in heads})
    example = example_batch(model.config.vocab_size, max_len=model.config.max_position_embeddings)
    with export_mode(model, attention), warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shapes used as Python ints, which stay dynamic
        # eval(): export restores the wrapper's own mode afterwards, and a fresh Module is in training mode.
        torch.onnx.export(
            _Exported(model, output_names).eval(), example, str(raw), dynamo=False, opset_version=opset,
            input_names=list(INPUTS), output_names=output_names, dynamic_axes=dynamic,
        )  # fmt: skip
    result = ExportResult(files=[fp32], task=task, outputs=output_names)
    if optimize:
        result.fused_operators = _optimize(raw, fp32, model.config)
        raw.unlink()
    else:
        raw.replace(fp32)
    checks = [example_batch(model.config.vocab_size, b, t, seed=s, max_len=model.config.max_position_embeddings)
              for s, (b, t) in enumerate([(1, 8), (4, 24), (8, 40)], start=1)]  # fmt: skip
    if check:
        result.max_abs_diff["fp32"] = max_deviation(model, _session(fp32), checks)
        if result.max_abs_diff["fp32"] > FP32_TOLERANCE:
            diff = result.max_abs_diff["fp32"]
            raise ValueError(f"ONNX Runtime and torch disagree by {diff:.2e} (> {FP32_TOLERANCE}) on {model_path}")
    if quantize:
        int8 = out_dir / "model.int8.onnx"
        quantize_int8(fp32, int8)
        result.files.append(int8)
        if check:
            result.max_abs_diff["int8"] = max_deviation(model, _session(int8), checks)
    meta = out_dir / "export.json"
    info = asdict(result) | {"source": str(model_path), "opset": opset, "moe_layers": list(model.config.moe_layers)}
    info["files"] = [p.name for p in result.files]
    info["gelu"] = "exact (erf), fused into ORT Gelu"
    info["attention"] = {"plain": "plain ops", "fused": "com.microsoft.MultiHeadAttention"}[attention]
    meta.write_text(json.dumps(info, indent=2) + "\n")
    result.files.append(meta)
    log.info("exported %s → %s (max |Δ| vs torch: %s)", model_path, out_dir, result.max_abs_diff)
    return result
