"""native_bf16: true on a CPU only with bf16 matmul instructions behind oneDNN, never on a device without bf16;
int8_products_saturate: x86 without VNNI or AMX, where ONNX Runtime's fast int8 products saturate."""

from __future__ import annotations

import pytest
import torch

from moebert.precision import exact_int8_session_entries, int8_products_saturate, native_bf16


@pytest.mark.parametrize(
    "mkldnn, avx512_bf16, expected", [(True, True, True), (True, False, False), (False, True, False)]
)
def test_cpu_needs_both_onednn_and_bf16_instructions(monkeypatch, mkldnn, avx512_bf16, expected):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: mkldnn)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert native_bf16(torch.device("cpu")) is expected


def test_other_devices_are_not_native():
    assert native_bf16(torch.device("meta")) is False


@pytest.mark.parametrize(
    "caps, saturates",
    [
        ({"architecture": "x86_64", "avx2": True}, True),  # AVX2 only: vpmaddubsw sums pairs in int16
        ({"architecture": "x86_64", "avx512_f": True, "avx512_bw": True}, True),  # AVX-512 without VNNI
        ({"architecture": "x86_64", "avx512_vnni": True}, False),
        ({"architecture": "x86_64", "avx_vnni": True}, False),
        ({"architecture": "x86_64", "amx_int8": True}, False),
        ({"architecture": "aarch64"}, False),
    ],
)
def test_int8_products_saturate_on_x86_without_vnni(monkeypatch, caps, saturates):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert int8_products_saturate() is saturates
    assert exact_int8_session_entries("exact") == ({"session.x64quantprecision": "1"} if saturates else {})
    assert exact_int8_session_entries("fast") == {}


def test_int8_matmul_names_are_checked():
    with pytest.raises(ValueError, match="int8_matmul"):
        exact_int8_session_entries("precise")
