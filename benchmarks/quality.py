"""Quality benchmark: teacher vs MoEBERT vs the dense-pruned baseline and ablations, on real dev sets.

Every row is a `moebert pipeline` run sharing one fine-tuned teacher per task and seed, so the
whole table is resumable: rerunning skips every finished stage. Results go to
benchmarks/results/quality.{md,json} (task → row → metrics, mean ± std over seeds).

    python benchmarks/quality.py --tasks mrpc --rows teacher moebert dense_pruned --seeds 0 1 2

GPU preset (full training sets, the paper's Table 7 student budgets, 3 seeds, bf16 autocast on CUDA),
in two parts sized for about 9 minutes each on one H200, writing quality_paper.{md,json}:

    python benchmarks/quality.py --preset paper --part 1      # SST-2 + MRPC
    python benchmarks/quality.py --preset paper --part 2      # SQuAD v1.1
    python benchmarks/quality.py --preset paper --part 1 --smoke 64   # CPU check: 64 examples, a few steps
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from moebert.atomic import write_text
from training.distill import check_distill_weight
from training.evaluate import EvaluateConfig, evaluate
from training.finetune import FinetuneConfig, finetune, finetune_stage
from training.loop import OptimConfig
from training.pipeline import PipelineConfig, run_pipeline, task_defaults
from training.tasks import DEFAULT_DATA_DIR, DataConfig

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
# --preset paper: per task (seeds, teacher epochs, max length, batch size, part). Students take the task's
# Table 7 budget (training.pipeline.PAPER_DISTILL). Batch 32 as in the paper; bf16 autocast on CUDA.
PAPER_PRESET = {
    "sst2": {"seeds": [0, 1, 2], "finetune_epochs": 3.0, "max_length": 128, "part": 1},
    "mrpc": {"seeds": [0, 1, 2], "finetune_epochs": 4.0, "max_length": 128, "part": 1},
    "squad": {"seeds": [0, 1, 2], "finetune_epochs": 2.0, "max_length": 384, "part": 2},
}
MAIN = {"sst2": ("accuracy",), "mrpc": ("accuracy", "f1"), "rte": ("accuracy",), "squad": ("exact_match", "f1")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["mrpc"], help="tasks (sst2, mrpc, rte, squad)")
    p.add_argument(
        "--rows", nargs="+", default=["teacher", "moebert", "dense_pruned"], help=f"teacher and/or {', '.join(ROWS)}"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (MRPC/RTE: use 3)")
    p.add_argument(
        "--runs-dir", help="where the pipelines write (resumable; default runs/quality, a preset runs/<preset>)"
    )
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
    p.add_argument("--finetune-lr", type=float, help="override the teacher learning rate (default 5e-5)")
    p.add_argument("--distill-epochs", type=float, help="override student epochs")
    p.add_argument("--samples", type=int, default=2048, help="importance sample size")
    p.add_argument("--max-length", type=int, help="tokens per example/window (default 128; SQuAD 384)")
    p.add_argument("--doc-stride", type=int, default=128, help="SQuAD window overlap in tokens (default 128)")
    p.add_argument("--attention-dropout", type=float, help="attention dropout while training (default the model's 0.1)")
    p.add_argument(
        "--distill-weight", type=float, help="λ, the distillation weight (default the task's, METHOD.md Table 7)"
    )
    p.add_argument(
        "--tag",
        help="an experiment with other settings: rows train in <row>_<tag>/ beside the main rows (sharing their "
        "teacher and importance) and go to benchmarks/results/quality_<tag>.{md,json}, so the main table keeps "
        "one budget",
    )
    p.add_argument(
        "--preset",
        choices=("paper",),
        help="paper: full training sets, Table 7 budgets, 3 seeds, bf16 on CUDA (a GPU run; see --part, --smoke); "
        "writes quality_paper.{md,json} and trains under runs/paper",
    )
    p.add_argument("--part", type=int, choices=(1, 2), help="with --preset paper: 1 = SST-2 + MRPC, 2 = SQuAD")
    p.add_argument(
        "--smoke",
        type=int,
        metavar="N",
        help="with --preset: N training and N dev examples, 2 steps per stage (checks the preset end to end on CPU)",
    )
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="training autocast")
    p.add_argument(
        "--jobs", type=int, default=1, help="train this many seeds at once, each in its own process (GPU; default 1)"
    )
    # A child of --jobs running one seed of a preset: the preset's folders, tag and limits, as given.
    p.add_argument("--as-preset", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--smoke-limit", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.preset is None and (args.part or args.smoke):
        p.error("--part and --smoke go with --preset")
    if args.jobs < 1:
        p.error(f"--jobs must be ≥ 1, got {args.jobs}")
    if args.distill_weight is not None:
        try:  # here, before any teacher is fine-tuned
            check_distill_weight(args.distill_weight)
        except ValueError as err:
            p.error(f"--distill-weight: {err}")
    if args.tag is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.tag):
        p.error(f"--tag must be letters, digits, '.', '_' or '-' (it names folders and files), got {args.tag!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    for job in jobs(args):
        if args.jobs > 1 and len(job["seeds"]) > 1:
            train_seeds_in_parallel(args, job)
        run_job(p, args, **job)  # with --jobs: every stage is finished, so this only gathers the table


def train_seeds_in_parallel(args, job: dict) -> None:
    """Train each seed of a task in its own process, `--jobs` at a time (a GPU that one small model leaves
    mostly idle runs several at once). Each seed has its own folders, so the processes never share one."""
    import subprocess

    argv = sys.argv[1:]
    pending = list(job["seeds"])
    running: list[subprocess.Popen] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            kept = _without(argv, "--seeds", "--jobs", "--tasks", "--preset", "--part", "--smoke")
            cmd = [sys.executable, __file__, *kept, "--tasks", job["task"], "--seeds", str(seed), "--jobs", "1",
                   *_preset_as_flags(args, job)]  # fmt: skip
            logging.info("seed %d: %s", seed, " ".join(cmd))
            running.append(subprocess.Popen(cmd))
        done = running.pop(0)
        if done.wait() != 0:
            raise SystemExit(f"{job['task']}: a seed's run failed (exit {done.returncode}): {' '.join(done.args)}")


def _without(argv: list[str], *flags: str) -> list[str]:
    """argv without the given flags and their values."""
    out, skip = [], False
    for a in argv:
        if a.startswith("--"):
            skip = a.split("=")[0] in flags
        if not skip:
            out.append(a)
    return out


def _preset_as_flags(args, job: dict) -> list[str]:
    """A preset's job spelled as plain flags for a child process (same folders, same settings)."""
    if args.preset is None:
        return []
    flags = ["--runs-dir", job["runs_dir"], "--max-length", str(job["max_length"]), "--tag", job["tag"], "--as-preset"]
    if job["finetune_epochs"]:
        flags += ["--finetune-epochs", str(job["finetune_epochs"])]
    if job["smoke"]:
        flags += ["--smoke-limit", str(job["smoke"])]
    return flags


def jobs(args) -> list[dict]:
    """What to run, task by task: the command line's tasks, or a preset's."""
    smoke = args.smoke_limit if args.as_preset else None
    if args.preset is None:
        return [
            {
                "task": task,
                "seeds": args.seeds,
                "limit": smoke or (args.train_limit[i] if i < len(args.train_limit) else None),
                "max_length": args.max_length or (384 if task.startswith("squad") else 128),
                "finetune_epochs": args.finetune_epochs,
                "distill_epochs": args.distill_epochs,
                "tag": args.tag,
                "runs_dir": args.runs_dir or "runs/quality",
                "smoke": smoke,
            }
            for i, task in enumerate(args.tasks)
        ]
    out = []
    name = "paper_smoke" if args.smoke else "paper"  # a smoke check never overwrites the real table
    for task, preset in PAPER_PRESET.items():
        if args.part and preset["part"] != args.part:
            continue
        out.append(
            {
                "task": task,
                "seeds": preset["seeds"],
                "limit": args.smoke,
                "max_length": min(preset["max_length"], 128) if args.smoke else preset["max_length"],
                "finetune_epochs": preset["finetune_epochs"],
                "distill_epochs": None,  # the task's Table 7 budget
                "tag": name,
                "runs_dir": args.runs_dir or f"runs/{name}",
                "smoke": args.smoke,
            }
        )
    return out


def run_job(p, args, task, seeds, limit, max_length, finetune_epochs, distill_epochs, tag, runs_dir, smoke) -> None:
    """One task's rows over its seeds, merged into its results table."""
    preset = args.preset is not None or args.as_preset
    data = DataConfig(
        task=task, data_dir=args.data_dir, train_limit=limit, max_length=max_length, doc_stride=args.doc_stride,
        eval_limit=smoke,
    )  # fmt: skip
    ft, ds, lam = task_defaults(task)
    lam = args.distill_weight if args.distill_weight is not None else lam
    ft = replace(ft, attention_dropout=args.attention_dropout, precision=args.precision)
    ds = replace(ds, attention_dropout=args.attention_dropout, precision=args.precision)
    if finetune_epochs:
        ft = replace(ft, epochs=finetune_epochs)
    if args.finetune_lr:
        ft = replace(ft, lr=args.finetune_lr)
    if distill_epochs:
        ds = replace(ds, epochs=distill_epochs)
    if smoke:
        ft, ds = replace(ft, max_steps=2), replace(ds, max_steps=2)
    per_row: dict[str, list[dict]] = {}
    budget: dict[str, float] = {}
    for seed in seeds:
        base = Path(runs_dir) / task / f"seed{seed}"
        teacher_dir = base / "teacher"
        ft_cfg = FinetuneConfig(data=data, output_dir=str(teacher_dir), optim=replace(ft, seed=seed))
        if not finetune_stage(ft_cfg).done():
            if tag and not preset:  # an experiment must not retrain (and so replace) the main rows' teacher
                p.error(f"--tag {tag}: no finished teacher in {teacher_dir} with these fine-tuning settings")
            finetune(ft_cfg)
        if "teacher" in args.rows:
            teacher_eval = evaluate(
                EvaluateConfig(model=str(teacher_dir), data=data, output=str(base / "eval_teacher.json"), reuse=True)
            )
            per_row.setdefault("teacher", []).append(_first_split(teacher_eval))
            budget["teacher"] = budget.get("teacher", 0.0) + _train_seconds(teacher_dir)
        for row in [r for r in args.rows if r != "teacher"]:
            overrides, _ = ROWS[row]
            cfg = PipelineConfig(
                data=data,
                output_dir=str(base / (f"{row}_{tag}" if tag and not preset else row)),
                finetuned_teacher=str(teacher_dir),
                evaluate_teacher=False,
                importance_file=str(base / "importance.safetensors"),
                importance_samples=min(args.samples, smoke) if smoke else args.samples,
                distill_optim=ds,
                distill_weight=lam,
                seed=seed,
                **overrides,
            )
            results = run_pipeline(cfg)
            budget[row] = budget.get(row, 0.0) + _train_seconds(Path(cfg.output_dir) / "student")
            per_row.setdefault(row, []).append(_first_split(results["moebert"]))
    settings = {
        "train_limit": limit,
        "max_length": max_length,
        "doc_stride": args.doc_stride if task.startswith("squad") else None,
        "finetune": vars_of(ft),
        "distill": vars_of(ds),
        "distill_weight": lam,
        "importance_samples": min(args.samples, smoke) if smoke else args.samples,
        **({"preset": "paper", "smoke": smoke} if preset else {}),
    }
    command = " ".join(["python", "benchmarks/quality.py", *sys.argv[1:]])
    rows = {
        row: {
            **_aggregate(runs),
            "seeds": seeds,
            "train_minutes": round(budget[row] / 60 / len(seeds), 1),
            "command": command,
        }
        for row, runs in per_row.items()
    }
    _merge(tag, task, settings, rows)


def _merge(tag: str | None, task: str, settings: dict, rows: dict) -> None:
    """Add this run's rows to the task's table (read afresh: another run may have written meanwhile).
    Rows made with other training settings are dropped, so one table never mixes budgets."""
    results = _load(RESULTS / f"{_results_name(tag)}.json")
    table = results.get(task, {})
    if table.get("_settings") != settings:
        if any(not k.startswith("_") for k in table):
            logging.warning("%s: training settings changed; dropping the rows made with the old ones", task)
        table = {}
    results[task] = {**table, **rows, "_settings": settings}
    _write(tag, results)


def vars_of(opt: OptimConfig) -> dict:
    return {
        "epochs": opt.epochs,
        "lr": opt.lr,
        "batch_size": opt.batch_size,
        "weight_decay": opt.weight_decay,
        "attention_dropout": opt.attention_dropout,
        "group_by_length": opt.group_by_length,
        "precision": opt.precision,
    }


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


def _train_seconds(stage_dir: Path) -> float:
    """Training wall time of a finished finetune/distill stage (as it ran, not as this run reused it)."""
    return json.loads((stage_dir / "metrics.json").read_text()).get("train_seconds", 0.0)


def _cell(m: dict, key: str) -> str:
    return f"{m[key]:.2f}" + (f" ± {m[key + '_std']:.2f}" if f"{key}_std" in m else "") if key in m else "–"


def _results_name(tag: str | None) -> str:
    """quality, or quality_<tag> for an experiment."""
    return f"quality_{tag}" if tag else "quality"


def _write(tag: str | None, results: dict) -> None:
    name = _results_name(tag)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text(RESULTS / f"{name}.json", json.dumps(results, indent=1) + "\n")
    title = f"Quality experiment `{tag}` (the main table is quality.md)" if tag else "Quality"
    lines = [f"# {title}: teacher vs MoEBERT (all-MiniLM-L6-v2 teacher, N=4, d_e=384, s=256, hash-random)", ""]
    lines += _target_lines(results)
    if (RESULTS / "quality_analysis.md").is_file():
        lines += [
            "What the numbers say, what was tried, and why: [quality_analysis.md](quality_analysis.md).",
            "",
        ]
    for task, table in results.items():
        settings = table.get("_settings", {})
        metrics = MAIN.get(task, ("accuracy",))
        lines += [
            f"## {task} (full dev set)",
            "",
            f"Training examples: {settings.get('train_limit') or 'all'}; max length {settings.get('max_length')}"
            + (f", doc stride {settings['doc_stride']}" if settings.get("doc_stride") else "")
            + f"; teacher fine-tuning {settings.get('finetune')}; student {settings.get('distill')}, "
            f"λ = {settings.get('distill_weight')}; importance on {settings.get('importance_samples')} training "
            "examples. Mean ± std over the seeds listed.",
            "",
            "| row | " + " | ".join(metrics) + " | seeds | train min/seed | what |",
            "|---|" + "---:|" * len(metrics) + "---|---:|---|",
        ]
        order = ["teacher", *ROWS]
        for row in sorted((r for r in table if not r.startswith("_")), key=order.index):
            m = table[row]
            what = "dense MiniLM-L6 fine-tuned on the task" if row == "teacher" else ROWS[row][1]
            cells = " | ".join(_cell(m, k) for k in metrics)
            lines.append(f"| {row} | {cells} | {m.get('seeds')} | {m.get('train_minutes', '?')} | {what} |")
        commands = sorted({m["command"] for r, m in table.items() if not r.startswith("_") and "command" in m})
        lines += ["", "Commands:", "", *[f"    {c}" for c in commands], ""]
    write_text(RESULTS / f"{name}.md", "\n".join(lines))
    print("\n".join(lines))


TARGET = {"sst2": "accuracy", "mrpc": "accuracy", "squad": "f1"}  # the average: SST-2 acc, MRPC acc, SQuAD F1


def _target_lines(results: dict) -> list[str]:
    have = [t for t in TARGET if all(r in results.get(t, {}) for r in ("teacher", "moebert", "dense_pruned"))]
    if not have:
        return []
    avg = {r: statistics.mean(results[t][r][TARGET[t]] for t in have) for r in ("teacher", "moebert", "dense_pruned")}
    return [
        f"Average over {', '.join(f'{t} {TARGET[t]}' for t in have)}: teacher {avg['teacher']:.2f}, "
        f"MoEBERT {avg['moebert']:.2f} ({avg['moebert'] - avg['teacher']:+.2f} vs teacher; target ≥ −0.5), "
        f"dense-pruned {avg['dense_pruned']:.2f} (MoEBERT {avg['moebert'] - avg['dense_pruned']:+.2f}; "
        "target ≥ +1.0).",
        "",
    ]


if __name__ == "__main__":
    main()
