"""ONNX quality: a checkpoint's dev metrics under torch, ONNX Runtime fp32 and ONNX Runtime int8
(dynamic quantization), scored exactly as `moebert evaluate` scores them (same data loading, windows
and metric code), and how far the outputs move. The bar: int8 within 0.5 points of fp32 on the task's
main metric (accuracy; SQuAD F1). Exit status 1 when it is missed.

    python benchmarks/onnx_quality.py --model runs/quality/sst2/seed0/moebert/student
    python benchmarks/onnx_quality.py --model runs/quality/squad/seed0/moebert/student --task squad \\
        --max-length 256 --runtimes torch onnx-int8

Exports onnx/ when it is missing (or with --export). Writes benchmarks/results/onnx_quality.{md,json},
one section per task (with --limit, a smoke run, nothing is written).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
MAX_DROP_POINTS = 0.5
# torch-bf16 and onnx-int8-fast (`--int8-matmul fast`: u8 × s8 products, which saturate on x86 CPUs without
# VNNI) only when asked for by name.
RUNTIMES = ("torch", "torch-bf16", "onnx-fp32", "onnx-int8", "onnx-int8-fast")


class OrtModule(torch.nn.Module):
    """An ONNX Runtime session behind the torch call that training.evaluate.predict makes."""

    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def forward(self, input_ids, attention_mask, token_type_ids=None):  # [B, T] each
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        out = self.backend.run(input_ids.numpy(), attention_mask.numpy(), token_type_ids.numpy())
        return SimpleNamespace(**{k: torch.from_numpy(v) for k, v in out.items() if k != "expert_counts"})


def main(argv=None) -> int:
    from training.datasets import label_names_of, load_data, tokenizer_for
    from training.tasks import DEFAULT_DATA_DIR, DataConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a classification or QA checkpoint (dense or MoEBERT)")
    p.add_argument("--task", default="sst2", help="task whose dev split scores it (default sst2)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="folder with glue/ and squad/")
    p.add_argument(
        "--runtimes", nargs="+", choices=RUNTIMES, default=["torch", "onnx-fp32", "onnx-int8"], help="what to compare"
    )
    p.add_argument("--export", action="store_true", help="(re-)export onnx/ first")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example/window (default 128; SQuAD 384)")
    p.add_argument("--doc-stride", type=int, default=128, help="SQuAD window overlap (default 128)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for every runtime")
    p.add_argument("--limit", type=int, help="only the first N dev examples (smoke run; writes nothing)")
    args = p.parse_args(argv)

    from moebert.loading import load_model
    from moebert.onnx_export import export_onnx
    from moebert.precision import int8_products_saturate
    from server.backends import OnnxBackend, TorchBackend, onnx_file
    from training.evaluate import predict, score

    model_dir = Path(args.model)
    precisions = {r.split("-")[1] for r in args.runtimes if r.startswith("onnx-")}
    if args.export or any(not onnx_file(model_dir, p).is_file() for p in precisions):
        export_onnx(model_dir, quantize=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    max_length = args.max_length or (384 if args.task.startswith("squad") else 128)
    data = DataConfig(task=args.task, data_dir=args.data_dir, max_length=max_length, doc_stride=args.doc_stride)
    spec = data.spec()
    torch_model = load_model(model_dir)
    dev = load_data(
        data,
        spec.dev_splits[0], tokenizer_for(str(model_dir)), training=False,
        label_names=label_names_of(torch_model.config), limit=args.limit,
    )  # fmt: skip
    runners = {
        "torch": lambda: torch_model,
        "torch-bf16": lambda: OrtModule(TorchBackend(model_dir, threads=args.threads, dtype="bfloat16")),
        "onnx-fp32": lambda: OrtModule(OnnxBackend(model_dir, "fp32", threads=args.threads)),
        "onnx-int8": lambda: OrtModule(OnnxBackend(model_dir, "int8", threads=args.threads)),
        "onnx-int8-fast": lambda: OrtModule(OnnxBackend(model_dir, "int8", threads=args.threads, int8_matmul="fast")),
    }
    rows, outputs = {}, {}
    for name in args.runtimes:
        start = time.perf_counter()
        outputs[name] = predict(runners[name](), dev, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        rows[name] = {**score(dev, outputs[name]), "seconds": round(seconds, 2)}
        print(name, rows[name], flush=True)
    if "torch" in outputs:
        for name in [r for r in outputs if r != "torch"]:
            rows[name]["agreement_vs_torch"] = round(_agreement(outputs[name], outputs["torch"]), 2)
    main_metric = "f1" if spec.kind == "qa" else spec.main_metric
    reference = next((r for r in ("onnx-fp32", "torch") if r in rows), None)
    compared = reference is not None and "onnx-int8" in rows
    drop = rows[reference][main_metric] - rows["onnx-int8"][main_metric] if compared else 0.0
    ok = drop <= MAX_DROP_POINTS
    command = f"python benchmarks/onnx_quality.py {' '.join(sys.argv[1:] if argv is None else argv)}"
    section = {
        "model": str(model_dir), "examples": len(dev.examples), "max_length": max_length, "main_metric": main_metric,
        "rows": rows, "int8_drop": round(drop, 2), "vs": reference, "command": command,
        "cpu": "x86 without VNNI (fast int8 products saturate)" if int8_products_saturate() else "VNNI/AMX or not x86",
    }  # fmt: skip
    if not args.limit:
        _write(spec.name, section)
    if compared:
        print(f"int8 drop vs {reference}: {drop:.2f} {main_metric} points ({'within' if ok else 'OUTSIDE'} the bar)")
    return 0 if ok else 1


def _agreement(ours: dict, theirs: dict) -> float:
    """% of examples with the same prediction: the same class, or the same answer text."""
    if "predictions" in ours:
        same = [ours["predictions"][k] == v for k, v in theirs["predictions"].items()]
    else:
        same = (ours["logits"].argmax(-1) == theirs["logits"].argmax(-1)).tolist()
    return 100 * sum(same) / max(1, len(same))


def _write(task: str, section: dict) -> None:
    path = RESULTS / "onnx_quality.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    if "rows" in results:  # the older single-task layout (SST-2 only)
        results = {}
    results[task] = section
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    lines = ["# ONNX quality: torch vs ONNX Runtime fp32 vs int8 (full dev sets)", ""]
    for name, s in results.items():
        metric_keys = [k for k in next(iter(s["rows"].values())) if k not in ("seconds", "agreement_vs_torch")]
        lines += [
            f"## {name}: `{s['model']}`, {s['examples']} examples, max length {s['max_length']}",
            "",
            f"`{s['command']}`" + (f" (CPU: {s['cpu']})" if "cpu" in s else ""),
            "",
            "| runtime | " + " | ".join(metric_keys) + " | same prediction as torch % | seconds |",
            "|---|" + "---:|" * (len(metric_keys) + 2),
        ]
        for runtime, r in s["rows"].items():
            cells = " | ".join(f"{r[k]:.2f}" for k in metric_keys)
            lines.append(f"| {runtime} | {cells} | {r.get('agreement_vs_torch', '')} | {r['seconds']} |")
        if s["vs"] and "onnx-int8" in s["rows"]:
            lines += ["", f"int8 drop vs {s['vs']}: {s['int8_drop']:.2f} {s['main_metric']} points "
                      f"(bar: {MAX_DROP_POINTS}).", ""]  # fmt: skip
        else:
            lines.append("")
    (RESULTS / "onnx_quality.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
