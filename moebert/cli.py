"""The model package's own commands, `moebert convert` and `moebert export-onnx`: flags → typed config →
one function. The command table, and the translation of errors into one line and exit status 2, belong
to the application (moebert_cli): this module knows no application."""

from __future__ import annotations

import argparse

from moebert.configuration import ATTENTION_CORES, ROUTE_METHODS, SPLIT_METHODS


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from err


def convert_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Convert a dense fine-tuned BERT into MoEBERT: each FFN is cut into N experts that share the top-s "
        "neurons and split the rest round-robin by importance (METHOD.md §2). --num-experts 1 --expert-dim k "
        "prunes the FFN to width k instead (the dense baseline)."
    )
    p.add_argument("teacher", help="dense fine-tuned BERT: local folder or hub id")
    p.add_argument("--output-dir", "-o", required=True, help="folder to write the MoEBERT checkpoint to")
    p.add_argument("--num-experts", type=int, default=4, help="experts per layer, N (default 4)")
    p.add_argument("--expert-dim", type=int, help="width of each expert, d_e (default: FFN width / N)")
    p.add_argument("--shared-dim", type=int, help="top neurons shared by all experts, s (default 2/3 of d_e)")
    p.add_argument("--route", choices=ROUTE_METHODS, default="hash-random", help="routing method (default hash-random)")
    p.add_argument(
        "--split",
        choices=SPLIT_METHODS,
        default="importance",
        help="neuron order for the split (default importance)",
    )
    p.add_argument(
        "--importance",
        help="importance file from `moebert importance` (default <teacher>/importance.safetensors)",
    )
    p.add_argument(
        "--balance-data",
        help="hash-balance: plain text file, one text per line, to count tokens on (task files: moebert pipeline)",
    )
    p.add_argument("--balance-table", help="hash-balance: safetensors file with `token_counts` or `table` [vocab]")
    p.add_argument("--layers", type=_int_list, help="comma-separated layers to convert (default: all)")
    p.add_argument(
        "--load-balance-weight",
        type=float,
        default=0.01,
        help="balance-loss weight for gate routing (default 0.01)",
    )
    p.add_argument(
        "--expert-dropout",
        type=float,
        default=0.1,
        help="dropout on expert outputs in training (default 0.1)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for hash tables, random split and gate init (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> None:
    from moebert.convert import ConvertConfig, convert

    cfg = ConvertConfig(
        teacher=args.teacher, output_dir=args.output_dir, num_experts=args.num_experts, expert_dim=args.expert_dim,
        shared_dim=args.shared_dim, route=args.route, split=args.split, importance=args.importance,
        balance_data=args.balance_data, balance_table=args.balance_table, layers=args.layers,
        load_balance_weight=args.load_balance_weight, expert_dropout=args.expert_dropout, seed=args.seed,
        overwrite=args.overwrite,
    )  # fmt: skip
    out = convert(cfg)
    print(out)


def export_onnx_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Export a dense or MoEBERT checkpoint to ONNX (routing inside the graph, padding removed from every "
        "token-wise matmul), optimize it with ONNX Runtime's BERT optimizer and optionally quantize it to int8 "
        "(per-channel weights, dynamic activations). Writes <MODEL>/onnx/model.onnx "
        "(and model.int8.onnx), where `moebert serve --backend onnx` looks."
    )
    p.add_argument("model", help="checkpoint folder")
    p.add_argument("--output-dir", "-o", help="where to write (default <MODEL>/onnx)")
    p.add_argument("--quantize", action="store_true", help="also write a dynamic int8 model (model.int8.onnx)")
    p.add_argument("--no-optimize", action="store_true", help="skip the ORT transformer optimizer")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--attention", choices=ATTENTION_CORES, default="auto",
                   help="attention core: plain ops, or ORT's fused MultiHeadAttention (faster on long rows, slower "
                   "on short ones); auto (default): fused for QA models, plain for classifiers")  # fmt: skip
    p.set_defaults(run=run_export_onnx)


def run_export_onnx(args: argparse.Namespace) -> None:
    from moebert.onnx_export import export_onnx

    result = export_onnx(
        args.model, args.output_dir, quantize=args.quantize, optimize=not args.no_optimize, opset=args.opset,
        attention=args.attention,
    )  # fmt: skip
    for path in result.files:
        print(path)
