"""Model runners behind one small interface: numpy batch in, numpy outputs out, called from the
inference thread (never on the event loop).

Inputs: input_ids, attention_mask, token_type_ids [B, T] int64. Outputs: `logits` [B, C]
(classification) or `start_logits`, `end_logits` [B, T] (QA), and `expert_counts` [num MoE layers, E]
(tokens routed per expert, padding excluded) for MoE models.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

log = logging.getLogger("moebert.server")

ONNX_DIR = "onnx"
ONNX_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
# Per checkpoint: the CPU runtimes timed on it at the shapes it serves, and the fastest (written by
# `python benchmarks/backend_speed.py --record`); what `--backend auto` runs.
SPEED_FILE = "backend_speed.json"
RUNTIMES = {  # a runtime name in backend_speed.json → (backend, precision)
    "torch": ("torch", "fp32"),
    "torch-bf16": ("torch", "bf16"),  # the torch backend with its weights in bfloat16 (--dtype bfloat16)
    "onnx-fp32": ("onnx", "fp32"),
    "onnx-int8": ("onnx", "int8"),
}


class Backend(Protocol):
    name: str
    # int8 ONNX Runtime: "exact" or "saturating" products (moebert.precision); None for other runtimes.
    int8_matmul: str | None

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> dict: ...


def torch_dtype(name: str, device: str):
    """The torch dtype for a `dtype` setting: auto is bfloat16 on a GPU that has it (float16 on older ones)
    and float32 on the CPU."""
    import torch

    if name == "auto":
        if device != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


def native_cpu_bf16() -> bool:
    """Whether this CPU has bfloat16 matmul instructions (AVX512-BF16, AMX): there bf16 torch can be the
    fastest runtime; elsewhere bf16 is emulated and slower than fp32."""
    import torch

    from moebert.precision import native_bf16

    return native_bf16(torch.device("cpu"))


class TorchBackend:
    """The model as trained: grouped experts on CPU, the Triton kernel on CUDA when installed.

    Weights are converted to `dtype` once, at load. On CUDA the model runs its padded token layout (no host
    synchronisation) and, with `graph_buckets`, every batch is a CUDA-graph replay of the bucket that holds
    it (server.cuda_graphs; captured here, at start-up); a batch no bucket holds runs eagerly."""

    name = "torch"
    int8_matmul = None

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        threads: int | None = None,
        dtype: str = "auto",
        graph_buckets: list[tuple[int, int]] | None = None,
    ):
        import torch

        from moebert.loading import load_model

        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for, but torch sees no CUDA device")
        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype, device)
        self.model = load_model(path, dtype=self.dtype).to(self.device).eval()
        if self.dtype == torch.bfloat16 and self.device.type == "cpu":
            self.name = "torch-bf16"
            if not native_cpu_bf16():  # the user's explicit choice: served, but not silently slow
                log.warning(
                    "%s: bfloat16 on a CPU without bf16 matmuls (AVX512-BF16 / AMX) is emulated: MiniLM-L6 ran "
                    "5-12x slower than float32 on an AVX2 CPU (benchmarks/results/bench_backends_bf16_avx2.md); "
                    "float32 or the ONNX int8 export serve faster here", path,
                )  # fmt: skip
        self.is_moe = bool(self.model.config.moe_layers)
        self.graphs = None
        if graph_buckets and self.device.type == "cuda":
            from server.cuda_graphs import BucketedRunner

            pad_id = self.model.config.pad_token_id or 0
            self.graphs = BucketedRunner(self.forward, graph_buckets, pad_id, self.device, graphs=True)
            self.graphs.capture()

    def forward(self, input_ids, attention_mask, token_type_ids) -> dict:
        """Device tensors [B, T] → {name: device tensor}: logits (or start/end logits), expert_counts."""
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            output_expert_counts=self.is_moe,
        )  # fmt: skip
        names = ("logits",) if getattr(out, "logits", None) is not None else ("start_logits", "end_logits")
        result = {name: getattr(out, name) for name in names}
        if out.expert_counts is not None:
            result["expert_counts"] = out.expert_counts
        return result

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> dict:
        torch = self._torch
        if self.graphs is not None:
            replayed = self.graphs.run(input_ids, attention_mask, token_type_ids)
            if replayed is not None:
                return replayed
        with torch.inference_mode():
            out = self.forward(
                *(torch.from_numpy(a).to(self.device) for a in (input_ids, attention_mask, token_type_ids))
            )
        return {
            name: value.float().cpu().numpy() if value.is_floating_point() else value.cpu().numpy()
            for name, value in out.items()
        }


def onnx_file(path: str | Path, precision: str = "fp32") -> Path:
    """Where `moebert export-onnx` puts a checkpoint's ONNX model (or `path` itself if it is a file)."""
    path = Path(path)
    return path if path.is_file() else path / ONNX_DIR / ONNX_FILES[precision]


class OnnxBackend:
    """ONNX Runtime: CPU, or the CUDA provider with onnxruntime-gpu. Routing runs inside the graph."""

    name = "onnx"

    def __init__(
        self, path: str | Path, precision: str = "fp32", device: str = "cpu", threads: int | None = None,
        int8_matmul: str = "exact",
    ):  # fmt: skip
        import onnxruntime as ort

        from moebert.precision import int8_products_saturate

        file = onnx_file(path, precision)
        if not file.is_file():
            raise FileNotFoundError(_missing_export(path, precision))
        options = ort_session_options(threads or default_threads(), int8_matmul)
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ValueError("device 'cuda' asked for, but onnxruntime has no CUDA provider (onnxruntime-gpu)")
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(file), options, providers=providers)
        self.name = "onnx" if precision == "fp32" else f"onnx-{precision}"
        saturating = int8_matmul == "fast" and int8_products_saturate()
        self.int8_matmul = None if precision != "int8" else "saturating" if saturating else "exact"
        self.file = file
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.is_moe = "expert_counts" in self.output_names

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> dict:
        flush_denormals_on_this_thread()
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        outputs = self.session.run(None, {k: v for k, v in feeds.items() if k in self.input_names})
        return dict(zip(self.output_names, outputs, strict=True))


def ort_session_options(threads: int, int8_matmul: str = "exact"):
    """The CPU session settings every ONNX Runtime model is served (and benchmarked) with. int8_matmul:
    "exact" or "fast" int8 products on CPUs where ORT's fast ones saturate (moebert.precision)."""
    import onnxruntime as ort

    from moebert.precision import exact_int8_session_entries

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No spin-waiting between runs: the cores are shared with the event loop (and, on a small box, with
    # other processes); measured on 2 busy cores, spinning made every batch ~2× slower.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Denormals as zero on ORT's pool threads (see flush_denormals_on_this_thread for the calling thread).
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    # Exact int8 by default where the CPU has no VNNI: on an AVX2 CPU saturated products cost the bundled QA
    # model 0.5 F1 and doubled the SST-2 model's mean |Δ logit| vs fp32; the u8 × u8 kernels cost that CPU
    # 15-22% of the dense teacher's int8 model time and 0-18% of MoEBERT's (bench_backends_int8_exact_avx2).
    for key, value in exact_int8_session_entries(int8_matmul).items():
        options.add_session_config_entry(key, value)
    return options


_flushing = threading.local()


def flush_denormals_on_this_thread() -> None:
    """Set FTZ/DAZ (denormal floats read and written as zero) on the calling thread, once per thread.

    Why: ONNX Runtime's softmax clamps exp's input at about −104, so every masked attention score (mask
    −10000) comes out as a denormal (~1e-45) rather than 0, and arithmetic on denormals is ~100× slower on
    x86. On padded batches this made `Softmax` the costliest op of the int8 graph: 7 QA windows of 67–205
    tokens, dense MiniLM-L6, 1 thread: 159 ms with denormals, 118 ms without (Softmax 51.5 → 12.5 ms),
    outputs unchanged (the masked weights are then exact zeros). ORT's own `session.set_denormal_as_zero`
    covers its pool threads, but the calling thread (the only one at 1 intra-op thread) only for the
    first session a process creates; MXCSR is per thread, so it is set here, on the thread that runs."""
    if getattr(_flushing, "set", False):
        return
    import torch

    torch.set_flush_denormal(True)
    _flushing.set = True


def _missing_export(path: str | Path, precision: str) -> str:
    return f"{onnx_file(path, precision)} not found: export it first with `moebert export-onnx {path}" + (
        " --quantize`" if precision == "int8" else "`"
    )


def measured_fastest(path: str | Path) -> str | None:
    """The fastest CPU runtime recorded in <checkpoint>/backend_speed.json (a RUNTIMES name), or None when
    the checkpoint has no such measurement (or an unreadable one)."""
    file = Path(path) / SPEED_FILE
    if not file.is_file():
        return None
    try:
        fastest = json.loads(file.read_text())["fastest"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("%s: unreadable (%s); ignoring it", file, err)
        return None
    if fastest not in RUNTIMES:
        log.warning("%s: unknown runtime %r; ignoring it", file, fastest)
        return None
    return fastest


def resolve_backend(path: str | Path, backend: str, precision: str, device: str) -> tuple[str, str]:
    """("torch" | "onnx", "fp32" | "int8" | "bf16") for one model, after checking that the files this runtime
    needs are there (FileNotFoundError, saying what to do, if not). `auto` on CPU runs the runtime that
    the checkpoint's backend_speed.json measured fastest at the shapes it serves (when its files are
    there; torch-bf16 only on a CPU with native bf16); without a measurement, its int8 ONNX export, then
    its fp32 one, then torch. On CUDA, auto is torch (Triton) where the folder has torch weights, else its
    ONNX export. Precision "bf16" (torch only) means: convert the weights to bfloat16."""
    exported = [p for p in ONNX_FILES if onnx_file(path, p).is_file()]
    weights = ("model.safetensors", "model.safetensors.index.json")
    has_weights = any((Path(path) / name).is_file() for name in weights)
    if backend == "auto" and device == "cpu":
        torch_runtimes = ["torch", "torch-bf16"] if native_cpu_bf16() else ["torch"]
        available = (torch_runtimes if has_weights else []) + [f"onnx-{p}" for p in exported]
        fastest = measured_fastest(path)
        if fastest in available:
            backend, measured = RUNTIMES[fastest]
            precision = measured if precision == "auto" else precision
        elif exported:
            backend = "onnx"
            log.info("%s: no %s measurement of its runtimes; auto takes its ONNX export", path, SPEED_FILE)
    if backend == "auto":  # on CUDA an export-only folder (a bundled model) still serves, through ONNX Runtime
        backend = "onnx" if exported and not has_weights else "torch"
    if precision == "auto":
        precision = "int8" if backend == "onnx" and "int8" in exported else "fp32"
    if backend == "onnx" and precision not in exported:
        raise FileNotFoundError(_missing_export(path, precision))
    if backend == "torch" and not has_weights:
        hint = "; it has an ONNX export: serve it with --backend onnx (or auto)" if exported else ""
        raise FileNotFoundError(f"{path} has no torch weights (model.safetensors){hint}")
    return backend, precision


def default_threads() -> int:
    """Intra-op threads when none are set: every core this process may use but one (at least 1). The spare
    core is for the event loop and tokenization: when they preempt an inference thread, its whole OpenMP
    team stalls at the next barrier. Measured on 2 cores under a storm of 429s (benchmarks/soak.py): with
    both cores, long-QA batches ran 2-3× slower than alone and classify rows waited 1.5-2.2 s behind them;
    with one, classify waited ≤ 0.3 s and long QA no longer timed out."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def make_backend(
    path: str, backend: str, precision: str, device: str, threads: int | None, dtype: str = "auto",
    graph_buckets: list[tuple[int, int]] | None = None, int8_matmul: str = "exact",
) -> Backend:  # fmt: skip
    """dtype and graph_buckets (CUDA graphs) apply to the torch backend, int8_matmul to ONNX Runtime int8."""
    backend, precision = resolve_backend(path, backend, precision, device)
    threads = threads or default_threads()
    if backend == "onnx":
        return OnnxBackend(path, precision, device, threads, int8_matmul)
    if precision == "bf16" and dtype == "auto":  # auto chose the measured torch-bf16 runtime
        dtype = "bfloat16"
    return TorchBackend(path, device, threads, dtype, graph_buckets)
