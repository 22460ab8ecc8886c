"""Whether a device computes bfloat16 natively: there bf16 is a speed-up (CUDA with bf16 support; a CPU with
AVX512-BF16 or AMX matmuls, through oneDNN), elsewhere an emulation slower than fp32. Training's autocast
(`training.loop.autocast_dtype`) and the server's bf16 torch backend (`server.backends`) both ask here."""

from __future__ import annotations

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls natively (so bf16 is a speed-up, not an emulation)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.cpu._is_avx512_bf16_supported())
    return False
