"""The training commands' flags → typed stage configs (`moebert finetune | importance | distill | evaluate |
predict | pipeline`; the command table is moebert_cli). Kept light at import time: the stage modules
load only when a command runs.

Under torchrun every rank runs the command: the training stages (finetune, distill, pipeline) on every
rank, the single-process ones (importance, evaluate, predict) on rank 0 while the others wait; only
rank 0 prints the result.
"""

from __future__ import annotations

import argparse
import os


def add_data_args(p: argparse.ArgumentParser, stage_default_max_length: int = 128) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--task", required=True, help="sst2, cola, mrpc, qqp, stsb, mnli, qnli, rte, wnli, squad, squad_v2 or custom"
    )
    g.add_argument(
        "--data-dir", help="folder with glue/ and squad/ (default ../shared/data); for custom: the training CSV/JSONL"
    )
    g.add_argument("--dev-file", help="custom task: the evaluation CSV/JSONL")
    g.add_argument("--text-column", default="text", help="custom task: text column (default text)")
    g.add_argument("--text-pair-column", help="custom task: second text column, for sentence pairs")
    g.add_argument("--label-column", default="label", help="custom task: label column (default label)")
    g.add_argument("--regression", action="store_true", help="custom task: numeric labels, MSE loss")
    g.add_argument(
        "--max-length", type=int, help=f"max tokens per input (default {stage_default_max_length}; 384 for SQuAD)"
    )
    g.add_argument("--doc-stride", type=int, default=128, help="SQuAD: overlap between context windows (default 128)")
    g.add_argument("--train-limit", type=int, help="use only the first N training examples (CPU budgets)")
    g.add_argument("--eval-limit", type=int, help="evaluate on only the first N examples")


def data_config(args):
    from training.tasks import DEFAULT_DATA_DIR, DataConfig

    max_length = args.max_length or (384 if args.task.startswith("squad") else 128)
    return DataConfig(
        task=args.task,
        data_dir=args.data_dir or str(DEFAULT_DATA_DIR),
        dev_file=args.dev_file,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        regression=args.regression,
        max_length=max_length,
        doc_stride=args.doc_stride,
        train_limit=args.train_limit,
        eval_limit=args.eval_limit,
    )


def add_optim_args(p: argparse.ArgumentParser, lr: float | None, epochs: float | None) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--epochs",
        type=float,
        default=epochs,
        help=f"training epochs, fractions allowed (default {epochs or 'per task'})",
    )
    g.add_argument("--lr", type=float, default=lr, help=f"AdamW learning rate (default {lr or 'per task'})")
    g.add_argument(
        "--batch-size", type=int, default=32, help="training batch size (per process under torchrun; default 32)"
    )
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0, or per task)")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps of linear warm-up (default 0)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (default 1.0)")
    g.add_argument("--max-steps", type=int, help="stop after this many steps")
    g.add_argument(
        "--attention-dropout",
        type=float,
        help="attention-probability dropout while training (default: the model's own; 0 is about 2x faster on CPU)",
    )
    g.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="autocast: auto = bf16 where the device computes it natively (CUDA, AVX512-BF16/AMX CPUs), else fp32",
    )
    g.add_argument(
        "--no-group-by-length",
        dest="group_by_length",
        action="store_false",
        help="plain shuffled batches instead of length-grouped ones (more padding, slower)",
    )
    g.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=10.0,
        help="save the run state this often; a rerun of an interrupted stage resumes from it (0: epoch ends only)",
    )
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def optim_config(args, default=None):
    from training.loop import OptimConfig

    base = default or OptimConfig()
    return OptimConfig(
        epochs=args.epochs if args.epochs is not None else base.epochs,
        lr=args.lr if args.lr is not None else base.lr,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay if args.weight_decay is not None else base.weight_decay,
        warmup_ratio=args.warmup_ratio,
        grad_clip=args.grad_clip,
        seed=args.seed,
        max_steps=args.max_steps,
        attention_dropout=args.attention_dropout,
        precision=args.precision,
        group_by_length=args.group_by_length,
        checkpoint_minutes=args.checkpoint_minutes,
    )


def say(text) -> None:
    """Print a command's result once: on torchrun's rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(text)


def on_main_rank(run):
    """A single-process stage: rank 0 runs it while any other torchrun ranks wait. → its result (rank 0)."""
    from training.loop import Distributed

    return Distributed.setup().on_main(run)


def run_finetune(args) -> None:
    from training.finetune import FinetuneConfig, default_teacher, finetune

    cfg = FinetuneConfig(
        data=data_config(args),
        output_dir=args.output_dir,
        model=args.model or default_teacher(),
        optim=optim_config(args),
    )
    say(finetune(cfg))


def run_importance(args) -> None:
    from training.importance import ImportanceConfig, score_importance

    cfg = ImportanceConfig(
        model=args.model,
        data=data_config(args),
        samples=args.samples,
        batch_size=args.batch_size,
        method=args.method,
        output=args.output,
        seed=args.seed,
    )
    say(on_main_rank(lambda: score_importance(cfg)))


def run_distill(args) -> None:
    from training.distill import DistillConfig, distill

    cfg = DistillConfig(
        student=args.student,
        teacher=args.teacher,
        data=data_config(args),
        output_dir=args.output_dir,
        distill_weight=args.distill_weight,
        distill=not args.no_distill,
        optim=optim_config(args),
    )
    say(distill(cfg))


def run_evaluate(args) -> None:
    from training.evaluate import EvaluateConfig, evaluate

    cfg = EvaluateConfig(
        model=args.model,
        data=data_config(args),
        splits=tuple(args.split) if args.split else None,
        batch_size=args.batch_size,
        output=args.output,
    )
    on_main_rank(lambda: evaluate(cfg))  # it prints its own results


def run_predict(args) -> None:
    from training.predict import PredictConfig, predict

    cfg = PredictConfig(
        model=args.model, data=data_config(args), output_dir=args.output_dir,
        splits=tuple(args.split) if args.split else None, batch_size=args.batch_size,
        null_threshold=args.null_threshold,
    )  # fmt: skip
    for path in on_main_rank(lambda: predict(cfg)) or []:
        print(path)


def run_pipeline(args) -> None:
    from training.finetune import default_teacher
    from training.pipeline import PipelineConfig, run_pipeline, task_defaults

    ft, ds, _ = task_defaults(args.task)
    # --epochs/--lr/--weight-decay set the distillation; the teacher has its own --finetune-* flags.
    ft_args = argparse.Namespace(
        **{**vars(args), "epochs": args.finetune_epochs, "lr": args.finetune_lr, "weight_decay": None}
    )
    cfg = PipelineConfig(
        data=data_config(args),
        output_dir=args.output_dir,
        teacher=args.teacher or default_teacher(),
        finetuned_teacher=args.finetuned_teacher,
        num_experts=args.num_experts,
        expert_dim=args.expert_dim,
        shared_dim=args.shared_dim,
        route=args.route,
        split=args.split,
        importance_samples=args.samples,
        finetune_optim=optim_config(ft_args, ft),
        distill_optim=optim_config(args, ds),
        distill_weight=args.distill_weight,
        distill=not args.no_distill,
        seed=args.seed,
    )
    say(json_dump(run_pipeline(cfg)))


def json_dump(x) -> str:
    import json

    return json.dumps(x, indent=1)


def finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Fine-tune a dense BERT on a task: AdamW, linear decay, clipping, eval each epoch, keep the best."
    p.add_argument("--model", help="pretrained BERT folder or hub id (default: the offline all-MiniLM-L6-v2)")
    p.add_argument("--output-dir", "-o", required=True, help="folder for the fine-tuned teacher")
    add_data_args(p)
    add_optim_args(p, lr=5e-5, epochs=3.0)
    p.set_defaults(run=run_finetune)


def importance_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Per-example importance of each FFN neuron on a sample of the training split."
    p.add_argument("model", help="the fine-tuned dense teacher folder")
    p.add_argument("--samples", type=int, default=2048, help="training examples to score (default 2048)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per backward pass (default 16)")
    p.add_argument(
        "--method",
        choices=("closed-form", "batch-of-one"),
        default="closed-form",
        help="closed-form per-example terms from one batched backward (default), or one example per backward",
    )
    p.add_argument("--output", help="importance file (default <model>/importance.safetensors)")
    p.add_argument("--seed", type=int, default=0, help="seed of the example sample (default 0)")
    add_data_args(p)
    p.set_defaults(run=run_importance)


def distill_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Layer-wise distillation (METHOD.md §4) from the frozen dense teacher into a converted student."
    p.add_argument("student", help="the converted MoEBERT folder (from `moebert convert`)")
    p.add_argument("--teacher", help="the fine-tuned dense teacher folder (not needed with --no-distill)")
    p.add_argument("--output-dir", "-o", required=True, help="folder for the trained student")
    p.add_argument(
        "--distill-weight", type=float, default=1.0, help="λ: weight of hidden MSE + prediction KL (default 1)"
    )
    p.add_argument("--no-distill", action="store_true", help="train on the task loss only (ablation)")
    add_data_args(p)
    add_optim_args(p, lr=3e-5, epochs=5.0)
    p.set_defaults(run=run_distill)


def evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Evaluate a checkpoint on a task's dev split(s) (or --split); print and write metrics JSON."
    p.add_argument("model", help="checkpoint folder or hub id")
    p.add_argument(
        "--split", action="append", help="split name, e.g. dev or dev_matched (repeatable; default the dev splits)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default 64)")
    p.add_argument("--output", help="metrics JSON (default <model>/eval_<task>.json)")
    add_data_args(p)
    p.set_defaults(run=run_evaluate)


def predict_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "GLUE: <TASK>.tsv (SST-2.tsv, MNLI-m.tsv, ...) with index<TAB>prediction for the test split(s), "
        "ready to zip for gluebenchmark.com. SQuAD: predictions.json (+ na_probs.json for squad_v2) for the official "
        "evaluate scripts."
    )
    p.add_argument("model", help="checkpoint folder")
    p.add_argument("--output-dir", "-o", required=True, help="folder for the prediction files")
    p.add_argument(
        "--split", action="append", help="split to predict (repeatable; default: GLUE test split(s), SQuAD dev)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    p.add_argument(
        "--null-threshold", type=float, default=0.0,
        help="squad_v2: answer '' when the null score beats the best span by more than this (logits; default 0)",
    )  # fmt: skip
    add_data_args(p)
    p.set_defaults(run=run_predict)


def pipeline_arguments(p: argparse.ArgumentParser) -> None:
    from moebert.configuration import ROUTE_METHODS, SPLIT_METHODS

    p.description = "All stages with per-task defaults; a stage whose output matches its inputs is skipped."
    p.add_argument("--output-dir", "-o", required=True, help="folder for all stage outputs")
    p.add_argument("--teacher", help="pretrained BERT to fine-tune (default: the offline all-MiniLM-L6-v2)")
    p.add_argument("--finetuned-teacher", help="skip fine-tuning: use this dense fine-tuned model")
    p.add_argument("--num-experts", type=int, default=4, help="experts per layer (default 4)")
    p.add_argument("--expert-dim", type=int, help="expert width (default FFN width / N)")
    p.add_argument("--shared-dim", type=int, help="shared neurons (default 2/3 of the expert width)")
    p.add_argument("--route", choices=ROUTE_METHODS, default="hash-random", help="routing method (default hash-random)")
    p.add_argument("--split", choices=SPLIT_METHODS, default="importance", help="neuron order for the split")
    p.add_argument("--samples", type=int, default=2048, help="importance: training examples scored (default 2048)")
    p.add_argument("--distill-weight", type=float, help="λ (default per task, METHOD.md Table 7)")
    p.add_argument("--no-distill", action="store_true", help="train the student on the task loss only")
    p.add_argument("--finetune-epochs", type=float, help="teacher fine-tuning epochs (default per task)")
    p.add_argument("--finetune-lr", type=float, help="teacher fine-tuning learning rate (default 5e-5)")
    add_data_args(p)
    add_optim_args(p, lr=None, epochs=None)
    p.set_defaults(run=run_pipeline)
