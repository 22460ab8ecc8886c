"""native_bf16: true on a CPU only with bf16 matmul instructions behind oneDNN, never on a device without bf16."""

from __future__ import annotations

import pytest
import torch

from moebert.precision import native_bf16


@pytest.mark.parametrize(
    "mkldnn, avx512_bf16, expected", [(True, True, True), (True, False, False), (False, True, False)]
)
def test_cpu_needs_both_onednn_and_bf16_instructions(monkeypatch, mkldnn, avx512_bf16, expected):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: mkldnn)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert native_bf16(torch.device("cpu")) is expected


def test_other_devices_are_not_native():
    assert native_bf16(torch.device("meta")) is False
