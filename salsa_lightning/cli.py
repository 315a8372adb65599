"""The ``salsa`` command.

- ``salsa fit|validate --config <stage>.yaml``, ``salsa soup|evaluate|landscape|convert ...``:
  one stage (``commands.py``).
- ``salsa pipeline --config PIPELINE.yaml``: stages in order, skipping finished ones.
- ``salsa quickstart [--output DIR]``: the whole SALSA-vs-PPO experiment on the embedded task.
- ``salsa configs list`` / ``salsa configs copy NAME [DEST]``: the packaged YAMLs.

A ``--config NAME.yaml`` that is not a file here names a packaged YAML (``config_files.py``);
the command says which file it used. Each command loads what it needs when it runs: ``salsa
--help`` and ``salsa configs`` answer without Lightning, torch or transformers.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable

from salsa_lightning.commands import (
    LIGHTNING_COMMANDS,
    STAGE_COMMANDS,
    drop_switch_values,
    exit_status,
    run_command,
)
from salsa_lightning.config_files import resolve_config, resolve_config_args

__all__ = ["main", "run_command"]  # the stage commands' home: commands.py

QUICKSTART = "configs/quickstart.yaml"  # a local copy when there is one, else the packaged one


def log_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)  # stderr: `--print_config > x.yaml` stays clean


# ----------------------------------------------------------------------------- pipelines


def pipeline_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="salsa pipeline", description="Run the stages of a pipeline YAML in order."
    )
    parser.add_argument(
        "--config", required=True, help="pipeline YAML (a file, or a packaged name)"
    )
    parser.add_argument("--output", default=".", help="directory the stages run in (default: here)")
    parser.add_argument(
        "--stages",
        nargs="+",
        metavar="NAME",
        help="run only these stages (names or shell patterns such as 'ppo-*'); what they read "
        "from other stages must exist already. Side by side: one process per seed.",
    )
    add_fit_args(parser)
    return parser


def add_fit_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fit-args",
        default="",
        metavar="'ARGS'",
        help="arguments added to every fit stage, after its own, in one quoted string: e.g. "
        "'--config fsdp.yaml --trainer.devices 8' (--config files are found from here, other "
        "paths from --output)",
    )


def parse_with_fit_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, where ``--fit-args`` also takes one option of its own
    (``--fit-args --trainer.devices=8``, which argparse alone reads as a missing value followed
    by an unknown option): a value that is none of the parser's own options is glued on
    (``--fit-args=--trainer.devices=8``)."""
    own = {s for action in parser._actions for s in action.option_strings}
    glued, rest = [], iter(argv)
    for arg in rest:
        value = next(rest, None) if arg == "--fit-args" else None
        if value is None:
            glued.append(arg)
        else:
            glued += [arg, value] if value in own else [f"{arg}={value}"]
    return parser.parse_args(glued)


def fit_args(args: argparse.Namespace) -> list[str]:
    """``--fit-args`` split as a shell splits it, saying which packaged YAML a ``--config`` in it
    stands for (:func:`resolve_config_args`)."""
    return resolve_config_args(shlex.split(args.fit_args), log_line)


def pipeline_main(argv: list[str]) -> int:
    """``salsa pipeline --config PIPELINE.yaml [--output DIR] [--stages NAME ...]
    [--fit-args 'ARGS']``."""
    from salsa_lightning.pipeline import run_pipeline

    args = parse_with_fit_args(pipeline_parser(), argv)
    run_pipeline(args.config, args.output, only=args.stages, fit_args=fit_args(args))
    return 0


def quickstart_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="salsa quickstart", description="The whole SALSA experiment on the embedded task."
    )
    parser.add_argument("--output", default=".", help="directory for artifacts/ (default: here)")
    parser.add_argument(
        "--config", default=QUICKSTART, help=f"pipeline YAML (default {QUICKSTART}, else packaged)"
    )
    add_fit_args(parser)
    return parser


def quickstart_main(argv: list[str]) -> int:
    """``salsa quickstart [--output DIR] [--config PIPELINE.yaml] [--fit-args 'ARGS']``: a
    pipeline, then its report."""
    from salsa_lightning.pipeline import run_with_report

    args = parse_with_fit_args(quickstart_parser(), argv)
    config = resolve_config(args.config, log_line)
    run_with_report(config, args.output, fit_args=fit_args(args))
    return 0


# ----------------------------------------------------------------------------- configs


def configs_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="salsa configs", description="List the packaged YAML configs, or copy one to edit."
    )
    sub = parser.add_subparsers(dest="action")
    sub.add_parser("list", help="every packaged YAML with its first comment line (the default)")
    copy = sub.add_parser("copy", help="copy a packaged YAML or folder to edit")
    copy.add_argument(
        "name", help="a YAML (sft.yaml, smollm2/sft.yaml) or folder (smollm2, paper; configs: all)"
    )
    copy.add_argument("dest", nargs="?", default=".", help="folder to copy into (default: here)")
    copy.add_argument("--overwrite", action="store_true", help="replace files that exist")
    return parser


def configs_main(argv: list[str]) -> int:
    """``salsa configs [list]`` / ``salsa configs copy NAME [DEST] [--overwrite]``."""
    from salsa_lightning.config_files import (
        copy_config,
        first_comment,
        packaged_dir,
        packaged_names,
    )

    args = configs_parser().parse_args(drop_switch_values(argv, ("--overwrite",)))
    if args.action in (None, "list"):
        root, names = packaged_dir(), packaged_names()
        print(f"{len(names)} packaged configs in {root} (salsa configs copy NAME to edit one):")
        width = max(len(n) for n in names)
        for name in names:
            print(f"  {name:<{width}}  {first_comment(root / name)}")
        return 0
    target, files = copy_config(args.name, args.dest, overwrite=args.overwrite)
    what = f"{len(files)} files" if len(files) > 1 else "1 file"
    if target.is_file() and len(files) > 1:  # a pipeline and its stages' YAMLs
        what += ": the pipeline and the stage YAMLs it names"
    print(f"copied {args.name} to {target} ({what})")
    return 0


# ----------------------------------------------------------------------------- the console script

COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "pipeline": pipeline_main,
    "quickstart": quickstart_main,
    "configs": configs_main,
}

USAGE = f"""usage: salsa COMMAND [--config NAME.yaml] [options]   (salsa COMMAND --help for each)

  {", ".join(LIGHTNING_COMMANDS)}   one stage from a LightningCLI YAML (salsa fit --config sft.yaml)
  soup, evaluate, landscape      the model soup, the evaluation, the reward landscape
  pairs                          preference pairs of a model's own sampled answers
  prompts                        more training prompts of the embedded task (for pairs)
  convert                        a GGUF checkpoint to a Hugging Face directory
  pipeline                       the stages of a pipeline YAML in order
  quickstart                     the whole SALSA-vs-PPO experiment on the embedded task
  configs                        list the packaged YAMLs, or copy one to edit
  --version                      this package's version and those of the libraries it runs on
"""
# The libraries whose versions `salsa --version` prints (read from their metadata, not imported).
RUNS_ON = ("torch", "lightning", "transformers", "peft", "torchmetrics", "datasets")


def versions() -> str:
    """``salsa-lightning X (torch Y, lightning Z, ...)``, for bug reports."""
    from importlib.metadata import PackageNotFoundError, version

    from salsa_lightning import __version__

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"salsa-lightning {__version__} ({', '.join(f'{n} {installed(n)}' for n in RUNS_ON)})"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``salsa`` console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    if args == ["--version"]:
        print(versions())
        return 0
    command = args[0]
    known = (*COMMANDS, *STAGE_COMMANDS, *LIGHTNING_COMMANDS)
    if command not in known and not command.startswith("-"):
        print(f"{USAGE}error: unknown command {command!r}", file=sys.stderr)
        return 2

    def run() -> int:
        if command == "configs":
            return configs_main(args[1:])
        resolved = resolve_config_args(args, log_line)
        if argv is None:  # processes Lightning starts for more devices rerun sys.argv: resolved
            sys.argv[1:] = resolved
        if command in COMMANDS:
            return COMMANDS[command](resolved[1:])
        return run_command(resolved)

    status = exit_status(run)
    if "torch.distributed" in sys.modules:  # a command that never loaded it started no group
        from salsa_lightning.sharding import end_process_group

        end_process_group()  # every rank, the stop included
    return status


if __name__ == "__main__":
    sys.exit(main())
