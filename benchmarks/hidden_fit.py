"""How closely students track their teacher, layer by layer: the distillation's own hidden-state MSE
(padding excluded, METHOD.md §4) on a task's dev split, for any number of checkpoints (converted or
distilled, MoE or dense-pruned). Diagnoses where a student loses what the teacher knew. Writes
benchmarks/results/hidden_fit_<task>.md.

    python benchmarks/hidden_fit.py --teacher runs/quality/mrpc/seed0/teacher --task mrpc \\
        runs/quality/mrpc/seed0/moebert/moe runs/quality/mrpc/seed0/dense_pruned/moe \\
        runs/quality/mrpc/seed0/moebert/student runs/quality/mrpc/seed0/dense_pruned/student
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def layer_mse(student, teacher, data, batch_size: int = 64) -> list[float]:
    """Mean over dev tokens of MSE(h_ℓ, h_ℓ^teacher) for ℓ = 0 (embeddings) … L."""
    from training.distill import hidden_mse
    from training.features import SEQUENCE_KEYS

    totals, tokens = None, 0
    for begin in range(0, len(data.dataset), batch_size):
        batch = data.collate([data.dataset[i] for i in range(begin, min(begin + batch_size, len(data.dataset)))])
        inputs = {k: v for k, v in batch.items() if k in SEQUENCE_KEYS}
        hs = student(**inputs, output_hidden_states=True).hidden_states  # L+1 × [B, T, d]
        ht = teacher(**inputs, output_hidden_states=True).hidden_states
        mask = inputs["attention_mask"]
        n = int(mask.sum())  # the batch's mean, weighted by its tokens, gives the mean over all dev tokens
        sums = torch.stack([hidden_mse([a], [b], mask) * n for a, b in zip(hs, ht, strict=True)])
        totals = sums if totals is None else totals + sums
        tokens += n
    return (totals / tokens).tolist()


def main() -> None:
    from moebert.loading import load_model
    from training.datasets import label_names_of, load_data, tokenizer_for
    from training.evaluate import evaluate_model
    from training.tasks import DEFAULT_DATA_DIR, DataConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("students", nargs="+", help="checkpoints to compare with the teacher")
    p.add_argument("--teacher", required=True, help="the fine-tuned dense teacher")
    p.add_argument("--task", required=True, help="task whose dev split is used")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--max-length", type=int, default=128)
    args = p.parse_args()

    teacher = load_model(args.teacher).eval()
    data = DataConfig(task=args.task, data_dir=args.data_dir, max_length=args.max_length)
    dev = load_data(
        data,
        data.spec().dev_splits[0], tokenizer_for(args.teacher), training=False,
        label_names=label_names_of(teacher.config),
    )  # fmt: skip
    layers = teacher.config.num_hidden_layers
    lines = [
        f"# Hidden-state fit to the teacher on {args.task} dev ({len(dev.examples)} examples)",
        "",
        f"Teacher `{args.teacher}`. Per-token MSE(h_ℓ, h_ℓ^teacher) over non-padding tokens; h0 = embeddings.",
        "",
        f"`python benchmarks/hidden_fit.py {' '.join(sys.argv[1:])}`",
        "",
        "| checkpoint | dev metrics | " + " | ".join(f"h{i}" for i in range(layers + 1)) + " | Σ |",
        "|---|---|" + "---:|" * (layers + 2),
    ]
    print("\n".join(lines), flush=True)
    for path in args.students:
        student = load_model(path).eval()
        mse = layer_mse(student, teacher, dev)
        metrics = ", ".join(f"{k} {v:.2f}" for k, v in evaluate_model(student, dev).items())
        lines.append(f"| {path} | {metrics} | " + " | ".join(f"{x:.3f}" for x in mse) + f" | {sum(mse):.3f} |")
        print(lines[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"hidden_fit_{args.task}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
