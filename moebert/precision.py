"""What a device computes natively, where a precision's speed or exactness depends on it.

- bfloat16: a speed-up on CUDA with bf16 support and on a CPU with AVX512-BF16 or AMX matmuls (through
  oneDNN), elsewhere an emulation slower than fp32. Training's autocast (`training.loop.autocast_dtype`) and
  the server's bf16 torch backend (`server.backends`) both ask here.
- int8 on ONNX Runtime: dynamic quantization multiplies uint8 activations by int8 weights. Without VNNI
  (or AMX), ORT's x86 kernels sum each pair of neighbouring products with `vpmaddubsw`, in saturating int16:
  255 × 127 × 2 = 64,770 is clamped to 32,767. Its session entry `session.x64quantprecision` switches those
  CPUs to its u8 × u8 kernels, which do not saturate; VNNI and AMX sum in int32 and need nothing.
"""

from __future__ import annotations

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls natively (so bf16 is a speed-up, not an emulation)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.cpu._is_avx512_bf16_supported())
    return False


# ONNX Runtime's session entry for exact int8 matmuls on x86 (kOrtSessionOptionsAvx2PrecisionMode): it
# rewrites the int8 weights to uint8 at load and runs the u8 × u8 kernels.
ORT_EXACT_INT8 = {"session.x64quantprecision": "1"}


def int8_products_saturate() -> bool:
    """Whether ONNX Runtime's u8 × s8 int8 matmuls saturate on this CPU: x86 without AVX512-VNNI, AVX-VNNI
    or AMX-INT8 (an AVX2 or plain AVX-512 CPU). Other architectures have their own exact kernels."""
    caps = torch.cpu.get_capabilities()
    if caps.get("architecture") not in ("x86_64", "x86"):
        return False
    return not any(caps.get(flag) for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def exact_int8_session_entries(int8_matmul: str) -> dict[str, str]:
    """ONNX Runtime session config entries for `int8_matmul` "exact" (no saturation, slower where the CPU
    would saturate) or "fast" (the u8 × s8 kernels, whatever this CPU does with them)."""
    if int8_matmul not in ("exact", "fast"):
        raise ValueError(f"int8_matmul: expected 'exact' or 'fast', got {int8_matmul!r}")
    return dict(ORT_EXACT_INT8) if int8_matmul == "exact" and int8_products_saturate() else {}
