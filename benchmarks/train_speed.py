"""Training throughput on SST-2 sentences: the project's loop vs a plain transformers loop.

The baseline is what a user would write: transformers' BertForSequenceClassification, shuffled batches
padded to the longest item, fp32, AdamW. The project rows run `training.loop.fit` (the loop that
`moebert finetune` and `distill` use) on the same sentences, one optimisation at a time, so the table
says what each one buys: length-grouped batches, bf16 autocast (where the CPU has AVX512-BF16/AMX),
and the distillation step (MoEBERT student + frozen teacher) at the default settings.

    python benchmarks/train_speed.py                      # 2048 SST-2 train sentences per row, batch 32
    python benchmarks/train_speed.py --examples 512       # a quick check

Writes benchmarks/results/train_speed.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch
from results_files import pyplot

RESULTS = Path(__file__).parent / "results"


def plain_transformers(model_dir: str, sentences: list[str], labels: list[int], batch_size: int, seed: int) -> float:
    """Seconds for one epoch of a plain fp32 transformers loop over `sentences` (random batches)."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(sentences), generator=g).tolist()
    start = time.perf_counter()
    for begin in range(0, len(order), batch_size):
        rows = order[begin : begin + batch_size]
        batch = tokenizer([sentences[i] for i in rows], padding="longest", truncation=True, max_length=128,
                          return_tensors="pt")  # fmt: skip
        out = model(**batch, labels=torch.tensor([labels[i] for i in rows]))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def project_loop(model_dir: str, data, opt, teacher_dir: str | None = None) -> float:
    """Seconds for `fit` over `data` (fine-tuning, or distillation from teacher_dir), without evaluation."""
    from moebert.loading import load_model
    from training.distill import make_distill_loss
    from training.finetune import task_loss
    from training.loop import fit

    model = load_model(model_dir, "classification", num_labels=2) if teacher_dir is None else load_model(model_dir)
    loss = task_loss
    if teacher_dir is not None:
        teacher = load_model(teacher_dir).requires_grad_(False).eval()
        loss = make_distill_loss(teacher, 1.0, True)
    with tempfile.TemporaryDirectory() as tmp:
        result = fit(model, data, opt, loss, None, "accuracy", lambda m, metrics: None, Path(tmp), desc="bench")
    return result["train_seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=2048, help="SST-2 training sentences per row (default 2048)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all rows; the best per row counts (default 2)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument("--data-dir", help="folder with glue/ (default ../shared/data)")
    p.add_argument("--out", default=str(RESULTS / "train_speed"), help="output prefix (.md, .json, .png)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    from dataclasses import replace

    from moebert.convert import ConvertConfig, convert
    from moebert.precision import native_bf16
    from training.datasets import load_data, tokenizer_for
    from training.finetune import default_teacher
    from training.loop import OptimConfig
    from training.tasks import DEFAULT_DATA_DIR, DataConfig

    teacher = default_teacher()
    data_cfg = DataConfig(task="sst2", data_dir=args.data_dir or str(DEFAULT_DATA_DIR), train_limit=args.examples)
    spec = data_cfg.spec()
    tokenizer = tokenizer_for(teacher)
    data = load_data(data_cfg, spec.train_split, tokenizer, training=True, limit=args.examples)
    sentences = [e.text for e in data.examples]
    labels = [e.label for e in data.examples]
    n = len(sentences)
    base = OptimConfig(epochs=1, batch_size=args.batch_size, checkpoint_minutes=0, log_every=10**9)
    bf16 = "bf16" if native_bf16(torch.device("cpu")) else "fp32"

    with tempfile.TemporaryDirectory() as tmp:
        # The distillation rows need a classifier teacher and its MoEBERT conversion (a random split: the
        # speed does not depend on which neurons each expert keeps).
        from moebert.loading import load_model

        cls_dir = Path(tmp) / "teacher"
        load_model(teacher, "classification", num_labels=2).save_pretrained(cls_dir)
        tokenizer.save_pretrained(cls_dir)
        moe_dir = convert(ConvertConfig(teacher=str(cls_dir), output_dir=str(Path(tmp) / "moe"), split="random"))
        rows = [
            ("transformers loop: shuffled, padded to longest, fp32", lambda: plain_transformers(
                teacher, sentences, labels, args.batch_size, 0)),
            ("project loop: shuffled, fp32", lambda: project_loop(
                teacher, data, replace(base, group_by_length=False, precision="fp32"))),
            ("project loop: length-grouped, fp32", lambda: project_loop(
                teacher, data, replace(base, precision="fp32"))),
            (f"project loop: length-grouped, {bf16} (default)", lambda: project_loop(teacher, data, base)),
            ("distill MoEBERT: shuffled, fp32", lambda: project_loop(
                str(moe_dir), data, replace(base, group_by_length=False, precision="fp32"), str(cls_dir))),
            (f"distill MoEBERT: length-grouped, {bf16} (default)", lambda: project_loop(
                str(moe_dir), data, base, str(cls_dir))),
        ]  # fmt: skip
        # Rounds of all rows, the best round per row: a noisy machine slows a row, never speeds it up.
        times: dict[str, list[float]] = {name: [] for name, _ in rows}
        for round_ in range(args.rounds):
            for name, run in rows:
                times[name].append(run())
                print(f"round {round_ + 1}, {name}: {n / times[name][-1]:.1f} examples/s", flush=True)
        results = [
            {"row": name, "seconds": min(t), "examples_per_s": n / min(t), "all_seconds": t}
            for name, t in times.items()
        ]

    ref = results[0]["examples_per_s"]
    for r in results:
        r["vs_transformers"] = r["examples_per_s"] / ref
    padded = {}
    for group in (False, True):
        from training.sampling import TrainBatches

        batches = TrainBatches(data.dataset.lengths(), args.batch_size, group_by_length=group)
        padded["grouped" if group else "shuffled"] = batches.padded_tokens()
    real = sum(data.dataset.lengths())
    env = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads"
    lines = [
        "# Training throughput: project loop vs a plain transformers loop (SST-2, MiniLM-L6)",
        "",
        f"{n} SST-2 training sentences, batch {args.batch_size}, one epoch per row, no evaluation, best of "
        f"{args.rounds} rounds; {env}; "
        f"CPU bf16 native: {native_bf16(torch.device('cpu'))}. Padded tokens per epoch: shuffled "
        f"{padded['shuffled']:,}, length-grouped {padded['grouped']:,} (real tokens {real:,}).",
        "",
        "| row | examples/s | seconds | × transformers loop |",
        "|---|---:|---:|---:|",
        *[f"| {r['row']} | {r['examples_per_s']:.1f} | {r['seconds']:.1f} | {r['vs_transformers']:.2f} |"
          for r in results],
        "",
        "Command: `python benchmarks/train_speed.py "
        + f"--examples {args.examples} --batch-size {args.batch_size} --rounds {args.rounds}`",
        "",
    ]  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines))
    meta = {"examples": n, "padded_tokens": padded, "real_tokens": real, "env": env}
    out.with_suffix(".json").write_text(json.dumps({"rows": results, **meta}, indent=1) + "\n")
    _plot(results, out.with_suffix(".png"))
    print("\n".join(lines))


def _plot(results: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh([r["row"] for r in results][::-1], [r["examples_per_s"] for r in results][::-1], color="#4c72b0")
    ax.set_xlabel("training examples / s (SST-2, MiniLM-L6)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
