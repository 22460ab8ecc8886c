"""ONNX quality: SST-2 dev accuracy of a classifier under torch, ONNX Runtime fp32 and ONNX Runtime int8
(dynamic quantization), and how far the logits move. The issue's bar: int8 within 0.5 accuracy points
of fp32. Exit status 1 when it is missed.

    python benchmarks/onnx_quality.py --model runs/minilm-moe-sst2            # exports onnx/ if missing
    python benchmarks/onnx_quality.py --model runs/minilm-moe-sst2 --export   # re-export first

Writes benchmarks/results/onnx_quality.{md,json} (with --limit, a smoke run, nothing is written).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("MOEBERT_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"
MAX_DROP_POINTS = 0.5


def sst2_dev(limit: int | None) -> tuple[list[str], np.ndarray]:
    with open(DATA / "glue" / "SST-2" / "dev.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows[:limit] if limit else rows
    return [r["sentence"] for r in rows], np.array([int(r["label"]) for r in rows])


def batches(tokenizer, texts: list[str], size: int, max_len: int):
    """Length-sorted batches (as the server forms them): (indices, input_ids, attention_mask, token_type_ids)."""
    enc = tokenizer(texts, truncation=True, max_length=max_len)
    order = np.argsort([len(ids) for ids in enc["input_ids"]], kind="stable")
    for start in range(0, len(order), size):
        idx = order[start : start + size]
        T = max(len(enc["input_ids"][i]) for i in idx)
        arrays = []
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            arr = np.zeros((len(idx), T), dtype=np.int64)
            for row, i in enumerate(idx):
                arr[row, : len(enc[key][i])] = enc[key][i]
            arrays.append(arr)
        yield idx, *arrays


def predict(run, tokenizer, texts, size, max_len) -> tuple[np.ndarray, float]:
    """→ logits [n, C] in the input order, seconds"""
    out, t0 = {}, time.perf_counter()
    for idx, ids, mask, types in batches(tokenizer, texts, size, max_len):
        logits = run(ids, mask, types)
        for row, i in enumerate(idx):
            out[int(i)] = logits[row]
    return np.stack([out[i] for i in range(len(texts))]), time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an SST-2 classifier checkpoint (dense or MoEBERT)")
    p.add_argument("--export", action="store_true", help="(re-)export onnx/ first")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--limit", type=int, help="only the first N dev sentences (smoke run; writes nothing)")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from moebert.loading import load_model
    from moebert.onnx_export import export_onnx
    from server.backends import OnnxBackend, TorchBackend, onnx_file

    model_dir = Path(args.model)
    if args.export or not onnx_file(model_dir, "int8").is_file():
        export_onnx(model_dir, quantize=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    texts, labels = sst2_dev(args.limit)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    max_len = min(512, load_model(model_dir).config.max_position_embeddings)
    runners = {
        "torch": TorchBackend(model_dir, threads=args.threads),
        "onnx-fp32": OnnxBackend(model_dir, "fp32", threads=args.threads),
        "onnx-int8": OnnxBackend(model_dir, "int8", threads=args.threads),
    }
    rows, logits = {}, {}
    for name, backend in runners.items():
        out, seconds = predict(
            lambda i, m, t, b=backend: b.run(i, m, t)["logits"], tokenizer, texts, args.batch_size, max_len
        )
        logits[name] = out
        rows[name] = {
            "accuracy": round(100 * float((out.argmax(-1) == labels).mean()), 2),
            "seconds": round(seconds, 2),
        }
    for name in ("onnx-fp32", "onnx-int8"):
        rows[name]["max_abs_logit_diff_vs_torch"] = float(np.abs(logits[name] - logits["torch"]).max())
        rows[name]["prediction_agreement_vs_torch"] = round(
            100 * float((logits[name].argmax(-1) == logits["torch"].argmax(-1)).mean()), 2
        )
    drop = rows["onnx-fp32"]["accuracy"] - rows["onnx-int8"]["accuracy"]
    ok = abs(drop) <= MAX_DROP_POINTS
    lines = [
        "# ONNX quality on SST-2 dev",
        "",
        f"`python benchmarks/onnx_quality.py {' '.join(sys.argv[1:])}` — {len(texts)} sentences, model `{model_dir}`",
        "",
        "| runtime | accuracy % | max abs logit Δ vs torch | agreement with torch % | seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        diff = r.get("max_abs_logit_diff_vs_torch", "")
        agree = r.get("prediction_agreement_vs_torch", "")
        lines.append(
            f"| {name} | {r['accuracy']} | {diff if diff == '' else f'{diff:.2e}'} | {agree} | {r['seconds']} |"
        )
    lines += [
        "",
        f"int8 drop vs fp32: {drop:.2f} points ({'within' if ok else 'OUTSIDE'} the {MAX_DROP_POINTS}-point bar).",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if not args.limit:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "onnx_quality.md").write_text(report)
        (RESULTS / "onnx_quality.json").write_text(
            json.dumps({"model": str(model_dir), "rows": rows, "drop": drop}, indent=2)
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
