"""The `wren` command: one entry point, subcommands looked up in a registry.

User errors (config, data, checkpoint, arguments) print one line naming the problem and exit
non-zero without a traceback; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from trainer.errors import UserError

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace, list[str]], int]]] = {}


def command(name: str, help_text: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register `fn(args, extra_args) -> exit code` as subcommand `name`."""

    def wrap(fn):
        COMMANDS[name] = (help_text, add_arguments, fn)
        return fn

    return wrap


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML recipe (default: built-in defaults = configs/tiny.toml)")


@command("train", "train a model from a TOML recipe; --section.key=value overrides follow", _train_args)
def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from trainer.config import ENGINES, JobConfig
    from trainer.distributed import init_distributed, shutdown_distributed, world_size_from_env

    cfg = JobConfig.load(args.config, overrides, world_size=world_size_from_env())
    module_name, class_name = ENGINES[cfg.parallel.engine].split(":")
    trainer_cls = getattr(importlib.import_module(module_name), class_name)
    env = init_distributed(cfg.parallel)
    try:
        if env.is_main:
            print(f"wren: resolved config (saved to {cfg.run.run_dir / 'config.toml'}):\n{cfg.to_toml()}", flush=True)
        trainer_cls(cfg, env).fit()
    finally:
        shutdown_distributed()
    return 0


def _prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML recipe whose [data] section to prepare")


@command("prepare-data", "train the tokenizer and write packed token shards (cached)", _prepare_args)
def _prepare(args: argparse.Namespace, overrides: list[str]) -> int:
    from trainer.config import JobConfig
    from trainer.train import prepare_data_or_fail

    cfg = JobConfig.load(args.config, overrides)
    prepared = prepare_data_or_fail(cfg.data, log=print)
    print(f"wren: data ready in {prepared.directory} (vocab {prepared.vocab_size})")
    return 0


def _plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory (holds metrics.jsonl)")


@command("plot", "draw a run's loss curves to <run_dir>/loss.png", _plot_args)
def _plot(args: argparse.Namespace, extra: list[str]) -> int:
    from pathlib import Path

    from trainer.plot import plot_losses

    if not (Path(args.run_dir) / "metrics.jsonl").is_file():
        raise UserError(f"plot: '{args.run_dir}' has no metrics.jsonl")
    print(f"wren: loss curve: {plot_losses(Path(args.run_dir))}")
    return 0


def module_command(name: str, help_text: str, module: str) -> None:
    """Register subcommand `name` implemented by `module`'s `add_arguments(parser)` and `run(args, extra)`.

    The module is imported only when the command runs, so `wren hparams` does not pay for torch.
    """

    def add_arguments(p: argparse.ArgumentParser) -> None:
        importlib.import_module(module).add_arguments(p)

    def run(args: argparse.Namespace, extra: list[str]) -> int:
        return importlib.import_module(module).run(args, extra)

    COMMANDS[name] = (help_text, add_arguments, run)


module_command("export-hf", "write a checkpoint as Hugging Face safetensors + config.json (or --adapter: the adapter alone)", "trainer.export_hf")
module_command("hparams", "predict the optimal lr and batch size (Step Law and other laws) from N and D or a recipe", "optim.hparams")
module_command("memory", "estimate per-rank memory (weights, grads, optimizer state, activations) of a recipe", "trainer.memory")
module_command("mup-check", "muP coordinate check: activation scales over widths, written to a PNG", "optim.mup_check")
module_command("sweep", "run a grid of training runs and fit scaling laws to their results", "launch.sweep")
module_command("generate", "sample text from a trained run", "trainer.generate")
module_command("linearize", "turn a trained softmax Llama into a Lizard linear-attention model", "models.lizard.linearize")
module_command("compose", "add sparse fine-tuning deltas (LT-SFT, SpIEL) to a base model and write the result", "models.peft.compose")


def build_parser(command_name: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with one sub-parser per registered command.

    Only `command_name`'s arguments are declared (all of them when None), so that running one
    command imports nothing that another command needs.
    """
    parser = argparse.ArgumentParser(prog="wren", description="wren: memory-efficient LLM training")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        if command_name is None or name == command_name:
            add_arguments(sub_parser)
    return parser


def _is_override(arg: str) -> bool:
    """Whether `arg` is a config override `--section.key=value`."""
    return arg.startswith("--") and "=" in arg and "." in arg.split("=", 1)[0]


def main(argv: list[str] | None = None) -> int:
    """Run `wren COMMAND ...`; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = argv[0] if argv and argv[0] in COMMANDS else ""
    parser = build_parser(chosen)
    # `--section.key=value` overrides go around argparse, which takes an option containing a space
    # (`--data.text_field="a b"`) for a positional argument.
    overrides = [arg for arg in argv[1:] if _is_override(arg)]
    args, extra = parser.parse_known_args([arg for arg in argv if not _is_override(arg)])
    extra += overrides
    _, _, fn = COMMANDS[args.command]
    try:
        return fn(args, extra)
    except UserError as err:
        print(f"wren: error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except KeyboardInterrupt:
        print("wren: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
