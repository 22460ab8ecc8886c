"""The `moebert` command. Each subcommand parses its flags into a typed config, calls one stage
function, and translates errors into one clear line and exit status 2 (no tracebacks for bad input)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

from moebert.configuration import ROUTE_METHODS, SPLIT_METHODS

# Packages that add their own subcommands: each has a light `cli` module (no heavy imports at module
# level) with `add_commands(subparsers)`. A package that is not installed simply adds nothing.
COMMAND_MODULES = ("training.cli", "server.cli")

# Subcommands whose implementation arrives with later work; the names are reserved now.
RESERVED = {
    "finetune": "fine-tune a dense BERT teacher on a task",
    "importance": "score every FFN neuron's importance on a task (METHOD.md §1)",
    "distill": "train a MoEBERT student with layer-wise distillation",
    "evaluate": "evaluate a dense or MoEBERT checkpoint on a task split",
    "pipeline": "finetune → importance → convert → distill → evaluate, resumable",
    "export-onnx": "export a model to ONNX for ONNX Runtime",
    "serve": "run the inference service",
}


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from err


def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="split a dense fine-tuned BERT's FFNs into experts (MoEBERT)",
        description="Convert a dense fine-tuned BERT into MoEBERT: each FFN is cut into N experts that share "
        "the top-s neurons and split the rest round-robin by importance (METHOD.md §2). "
        "--num-experts 1 --expert-dim k prunes the FFN to width k instead (the dense baseline).",
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


def _reserved(name: str) -> Callable[[argparse.Namespace], None]:
    def run(_: argparse.Namespace) -> None:
        raise CliError(f"`moebert {name}` is not available in this version yet")

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moebert", description="MoEBERT: BERT → Mixture-of-Experts, trained and served."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_convert(sub)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name not in (module_name, module_name.split(".")[0]):
                raise
            continue
        module.add_commands(sub)
    for name, help_text in RESERVED.items():
        if name not in sub.choices:
            sub.add_parser(name, help=help_text, description=help_text).set_defaults(run=_reserved(name))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from moebert.loading import CheckpointError

    try:
        args.run(args)
    except KeyboardInterrupt:
        print(f"moebert {args.command}: interrupted", file=sys.stderr)
        return 130
    except (
        CliError,
        CheckpointError,
        ValueError,
        FileNotFoundError,
        FileExistsError,
        PermissionError,
    ) as err:
        print(f"moebert {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
