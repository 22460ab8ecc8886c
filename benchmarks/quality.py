"""Quality benchmark: teacher vs MoEBERT vs the dense-pruned baseline and ablations, on real dev sets.

Every row is a `moebert pipeline` run sharing one fine-tuned teacher per task and seed, so the
whole table is resumable: rerunning skips every finished stage. Results go to
benchmarks/results/quality.{md,json} (task → row → metrics, mean ± std over seeds).

    python benchmarks/quality.py --tasks mrpc --rows teacher moebert dense_pruned --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from training.checkpoint import fingerprint, finished
from training.common import DEFAULT_DATA_DIR, DataConfig
from training.evaluate import EvaluateConfig, evaluate
from training.finetune import FinetuneConfig, finetune
from training.loop import OptimConfig
from training.pipeline import PipelineConfig, run_pipeline, task_defaults

RESULTS = Path(__file__).parent / "results"
ROWS = {
    # row: (PipelineConfig overrides, description)
    "moebert": ({}, "importance split, N=4, d_e=384, s=256, hash-random, distillation"),
    "dense_pruned": (
        {"num_experts": 1, "expert_dim": 384, "shared_dim": 0},
        "FFN pruned to 384 by importance + same distillation",
    ),
    "no_distill": ({"distill": False}, "MoEBERT trained on the task loss only"),
    "random_split": ({"split": "random"}, "MoEBERT with a random neuron split"),
    "gate_token": ({"route": "gate-token"}, "MoEBERT with gate-token routing"),
    "shared_0": ({"shared_dim": 0}, "MoEBERT with s = 0 shared neurons"),
    "shared_128": ({"shared_dim": 128}, "MoEBERT with s = 128 shared neurons"),
}
MAIN = {"sst2": ("accuracy",), "mrpc": ("accuracy", "f1"), "rte": ("accuracy",), "squad": ("exact_match", "f1")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["mrpc"], help="tasks (sst2, mrpc, rte, squad)")
    p.add_argument(
        "--rows", nargs="+", default=["teacher", "moebert", "dense_pruned"], help=f"teacher and/or {', '.join(ROWS)}"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (MRPC/RTE: use 3)")
    p.add_argument("--runs-dir", default="runs/quality", help="where the pipelines write (resumable)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="folder with glue/ and squad/")
    p.add_argument(
        "--train-limit",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="cap training examples (applies to the tasks in order; e.g. SST-2 on a CPU budget)",
    )
    p.add_argument("--finetune-epochs", type=float, help="override teacher epochs")
    p.add_argument("--distill-epochs", type=float, help="override student epochs")
    p.add_argument("--samples", type=int, default=2048, help="importance sample size")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    all_results = _load(RESULTS / "quality.json")
    for t_idx, task in enumerate(args.tasks):
        limit = args.train_limit[t_idx] if t_idx < len(args.train_limit) else None
        data = DataConfig(
            task=task, data_dir=args.data_dir, train_limit=limit, max_length=384 if task.startswith("squad") else 128
        )
        ft, ds, lam = task_defaults(task)
        if args.finetune_epochs:
            ft = replace(ft, epochs=args.finetune_epochs)
        if args.distill_epochs:
            ds = replace(ds, epochs=args.distill_epochs)
        per_row: dict[str, list[dict]] = {}
        budget: dict[str, float] = {}
        for seed in args.seeds:
            base = Path(args.runs_dir) / task / f"seed{seed}"
            teacher_dir = base / "teacher"
            start = time.time()
            ft_cfg = FinetuneConfig(data=data, output_dir=str(teacher_dir), optim=replace(ft, seed=seed))
            if not finished(teacher_dir, fingerprint(asdict(ft_cfg), [ft_cfg.model])):
                finetune(ft_cfg)
            teacher_eval = evaluate(
                EvaluateConfig(model=str(teacher_dir), data=data, output=str(base / "eval_teacher.json"))
            )
            per_row.setdefault("teacher", []).append(_first_split(teacher_eval))
            budget["teacher"] = budget.get("teacher", 0.0) + time.time() - start
            for row in [r for r in args.rows if r != "teacher"]:
                overrides, _ = ROWS[row]
                start = time.time()
                cfg = PipelineConfig(
                    data=data,
                    output_dir=str(base / row),
                    finetuned_teacher=str(teacher_dir),
                    evaluate_teacher=False,
                    importance_file=str(base / "importance.safetensors"),
                    importance_samples=args.samples,
                    distill_optim=ds,
                    seed=seed,
                    **overrides,
                )
                results = run_pipeline(cfg)
                budget[row] = budget.get(row, 0.0) + time.time() - start
                per_row.setdefault(row, []).append(_first_split(results["moebert"]))
        all_results[task] = {row: _aggregate(runs) for row, runs in per_row.items()}
        all_results[task]["_meta"] = {
            "seeds": args.seeds,
            "train_limit": limit,
            "finetune": vars_of(ft),
            "distill": vars_of(ds),
            "distill_weight": lam,
            "wall_seconds": budget,
            "importance_samples": args.samples,
            "command": " ".join(["python", "benchmarks/quality.py", *sys.argv[1:]]),
        }
        _write(all_results)


def vars_of(opt: OptimConfig) -> dict:
    return {"epochs": opt.epochs, "lr": opt.lr, "batch_size": opt.batch_size, "weight_decay": opt.weight_decay}


def _first_split(results: dict) -> dict:
    return next(iter(results.values()))


def _aggregate(runs: list[dict]) -> dict:
    keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float)) and k not in ("examples", "seconds")]
    out = {}
    for k in keys:
        values = [r[k] for r in runs]
        out[k] = statistics.mean(values)
        if len(values) > 1:
            out[f"{k}_std"] = statistics.stdev(values)
    out["n_seeds"] = len(runs)
    return out


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["# Quality: teacher vs MoEBERT (all-MiniLM-L6-v2 teacher, N=4, d_e=384, s=256, hash-random)", ""]
    for task, rows in results.items():
        meta = rows.get("_meta", {})
        metrics = MAIN.get(task, ("accuracy",))
        limit = meta.get("train_limit") or "full"
        lines += [
            f"## {task} (dev)",
            "",
            f"Seeds {meta.get('seeds')}; training examples: {limit}; teacher fine-tuning {meta.get('finetune')}; "
            f"student {meta.get('distill')}, λ = {meta.get('distill_weight', '?')}; importance on "
            f"{meta.get('importance_samples')} training examples. Command: `{meta.get('command', '?')}`",
            "",
            "| row | " + " | ".join(metrics) + " | wall min | what |",
            "|---|" + "---:|" * (len(metrics) + 1) + "---|",
        ]
        wall = meta.get("wall_seconds", {})
        for row, m in rows.items():
            if row.startswith("_"):
                continue
            cells = [f"{m[k]:.2f}" + (f" ± {m[k + '_std']:.2f}" if f"{k}_std" in m else "") for k in metrics if k in m]
            what = "dense MiniLM-L6 fine-tuned on the task" if row == "teacher" else ROWS[row][1]
            minutes = f"{wall[row] / 60:.0f}" if row in wall else "?"
            lines.append(f"| {row} | " + " | ".join(cells) + f" | {minutes} | {what} |")
        lines.append("")
    (RESULTS / "quality.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
