"""What the server tests check on a response: the error envelope, Prometheus samples, and the
reference scores of a classifier run directly."""

from __future__ import annotations

import re

import httpx
import numpy as np
import torch
from transformers import AutoTokenizer

from moebert.loading import load_model


def assert_error(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["type"] and body["error"]["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text


def metric_values(text: str, name: str) -> dict[tuple[str, ...], float]:
    """{label values (in label-name order, as exposed): value} for one sample name."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m:
            labels = tuple(v for v in re.findall(r'="([^"]*)"', m.group(1) or ""))
            out[labels] = float(m.group(2))
    return out


def reference_scores(path, texts) -> np.ndarray:
    """The model run directly, one text at a time: softmax of the logits [len(texts), C]."""
    model, tok = load_model(path), AutoTokenizer.from_pretrained(str(path))
    rows = []
    for text in texts:
        pair = tuple(text) if isinstance(text, list) else (text,)
        enc = tok(*pair, truncation=True, max_length=64, return_tensors="pt")
        with torch.no_grad():
            rows.append(model(**enc).logits[0].softmax(-1).numpy())
    return np.stack(rows)
