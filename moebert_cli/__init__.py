"""The `moebert` command: one table from each command to the application that implements it.

The model package (moebert/), the training package (training/) and the service (server/) each define
their own commands' flags and run functions, and know nothing of each other's; this table, above all
three, is the one place that lists them (as litgpt's command table does). A command whose package is
not installed (the Docker image ships no training/) stays listed and says so when run. Errors are
translated here, once: one line on stderr and exit status 2, no traceback for bad input.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NamedTuple


class Command(NamedTuple):
    module: str  # the application's command module: light at import time (heavy imports inside run)
    arguments: str  # its function(parser) that adds the flags and sets `run`
    help: str


COMMANDS: dict[str, Command] = {
    "convert": Command("moebert.cli", "convert_arguments", "split a dense fine-tuned BERT's FFNs into experts"),
    "export-onnx": Command("moebert.cli", "export_onnx_arguments", "export a model to ONNX for ONNX Runtime"),
    "finetune": Command("training.cli", "finetune_arguments", "fine-tune a dense BERT teacher on a task"),
    "importance": Command("training.cli", "importance_arguments", "score every FFN neuron's importance (METHOD.md §1)"),
    "distill": Command("training.cli", "distill_arguments", "train a MoEBERT student with layer-wise distillation"),
    "evaluate": Command("training.cli", "evaluate_arguments", "evaluate a dense or MoEBERT checkpoint on a task split"),
    "predict": Command(
        "training.cli", "predict_arguments", "write leaderboard prediction files (GLUE test TSVs, SQuAD predictions)"
    ),
    "pipeline": Command(
        "training.cli", "pipeline_arguments", "finetune → importance → convert → distill → evaluate, resumable"
    ),
    "serve": Command("server.cli", "serve_arguments", "run the inference service"),
}


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _missing(package: str):
    def run(_: argparse.Namespace) -> None:
        raise CliError(f"needs the `{package}` package, which this installation does not include")

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moebert", description="MoEBERT: BERT → Mixture-of-Experts, trained and served."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        package = command.module.split(".")[0]
        try:
            module = importlib.import_module(command.module)
        except ModuleNotFoundError as err:
            if err.name not in (command.module, package):
                raise  # the application is there but broken: show it
            p = sub.add_parser(name, help=f"{command.help} (needs `{package}`: not installed)")
            p.set_defaults(run=_missing(package), flags_unknown=True)  # its flags are its package's
            continue
        p = sub.add_parser(name, help=command.help)
        getattr(module, command.arguments)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "flags_unknown", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
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
    except (CliError, CheckpointError, ValueError, FileNotFoundError, FileExistsError, PermissionError) as err:
        print(f"moebert {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
