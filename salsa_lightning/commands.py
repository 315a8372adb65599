"""The commands a pipeline stage is, each run from its argument list by :func:`run_command`.

- ``fit|validate|test|predict --config <stage>.yaml``: LightningCLI in subclass mode
  (``lightning_cli.SalsaCLI``), the YAML names the LightningModule and LightningDataModule
  classes.
- ``soup ...``: weight-average checkpoints into a model soup.
- ``evaluate ...``: answers, scores, KL and win rates of several models.
- ``landscape ...``: reward along the alpha line / barycentric grid of SFT models.
- ``pairs ...``: preference pairs of a model's own sampled answers, ordered by a judge.
- ``prompts ...``: more training prompts of the embedded task, none of the held-out ones.
- ``convert --gguf FILE --output DIR``: a GGUF checkpoint to a Hugging Face directory.

The ``salsa`` console script (``cli.py``) and ``salsa pipeline`` (``pipeline.py``) both run these
through :func:`run_command`; the commands above them (``pipeline``, ``quickstart``, ``configs``)
live in ``cli.py``. Each command imports what it runs when it runs, so that ``salsa --help`` and
``salsa configs`` answer without loading Lightning, torch or transformers.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from salsa_lightning.config_files import check_not_a_pipeline, read_mapping
from salsa_lightning.errors import SalsaError

# ----------------------------------------------------------------------------- functions as commands


def join_list_flags(fn: Callable[..., Any], argv: list[str] | None) -> list[str] | None:
    """Let list arguments be written shell-style, ``--checkpoints a b``, as well as ``'[a, b]'``."""
    if argv is None:
        return None
    lists = {
        name
        for name, p in inspect.signature(fn).parameters.items()
        if str(p.annotation).startswith("list[")
    }
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        out.append(token)
        i += 1
        if token.startswith("--") and token[2:] in lists:
            values = []
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            out.append(
                values[0] if len(values) == 1 and values[0].startswith("[") else json.dumps(values)
            )
    return out


def add_switch_values(fn: Callable[..., Any], argv: list[str]) -> list[str]:
    """Let a boolean argument be written alone, ``--overwrite``, as well as ``--overwrite true``
    (as ``salsa soup``, ``convert`` and ``configs copy`` take it)."""
    switches = {
        f"--{name}"
        for name, p in inspect.signature(fn).parameters.items()
        if str(p.annotation) == "bool"
    }
    out = []
    for i, token in enumerate(argv):
        out.append(token)
        following = argv[i + 1] if i + 1 < len(argv) else "--"
        if token in switches and following.startswith("--"):
            out.append("true")
    return out


def drop_switch_values(argv: list[str] | None, switches: tuple[str, ...]) -> list[str] | None:
    """Let a switch of ``salsa soup``, ``convert`` or ``configs copy`` (``--overwrite``) be
    written with a value too, as the other commands take it: ``--overwrite true`` becomes
    ``--overwrite``, ``--overwrite false`` nothing."""
    if argv is None:
        return None
    out, i = [], 0
    while i < len(argv):
        value = argv[i + 1].lower() if i + 1 < len(argv) else ""
        if argv[i] in switches and value in ("true", "false"):
            out += [argv[i]] if value == "true" else []
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def check_mapping_flags(argv: list[str]) -> None:
    """Refuse a mapping flag written without a space after its colons: YAML reads
    ``{sft:artifacts/sft-1}`` as one key with no value, which jsonargparse reports only as
    "Expected a <class 'dict'>"."""
    for flag, value in itertools.pairwise(argv):
        if not (flag.startswith("--") and value.startswith("{") and ":" in value):
            continue
        try:
            mapping = yaml.safe_load(value)
        except yaml.YAMLError:
            continue  # jsonargparse says what is wrong with it
        if isinstance(mapping, dict) and any(
            v is None and ":" in str(k) for k, v in mapping.items()
        ):
            spaced = re.sub(r":(?=\S)", ": ", value)
            raise SalsaError(
                f"{flag} {value}: YAML needs a space after each colon of a mapping: {spaced}"
            )


def function_parser(fn: Callable[..., Any], prog: str):
    """The parser of ``fn``'s command line: its arguments as flags, or from a YAML with
    ``--config``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, description=fn.__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(fn)
    return parser


def function_main(fn: Callable[..., Any], argv: list[str] | None, prog: str) -> int:
    """Run ``fn`` from its command line (:func:`function_parser`)."""
    if argv is not None:
        argv = add_switch_values(fn, argv)
        check_mapping_flags(argv)
    parser = function_parser(fn, prog)
    cfg = parser.instantiate(parser.parse_args(join_list_flags(fn, argv)))
    fn(**{k: v for k, v in vars(cfg).items() if k != "config"})
    return 0


def evaluate_main(argv: list[str] | None = None) -> int:
    """``salsa evaluate`` (flags or ``--config``: the arguments of ``evaluate.evaluate``)."""
    from salsa_lightning.evaluate import evaluate

    return function_main(evaluate, argv, "salsa evaluate")


def landscape_main(argv: list[str] | None = None) -> int:
    """``salsa landscape`` (flags or ``--config``: the arguments of ``landscape.landscape``)."""
    from salsa_lightning.landscape import landscape

    return function_main(landscape, argv, "salsa landscape")


def pairs_main(argv: list[str] | None = None) -> int:
    """``salsa pairs`` (flags or ``--config``: the arguments of ``reward.sampled_pairs``)."""
    from salsa_lightning.reward import sampled_pairs

    return function_main(sampled_pairs, argv, "salsa pairs")


def prompts_main(argv: list[str] | None = None) -> int:
    """``salsa prompts`` (flags or ``--config``: the arguments of ``task.more_prompts``)."""
    from salsa_lightning.task import more_prompts

    return function_main(more_prompts, argv, "salsa prompts")


# ----------------------------------------------------------------------------- soup


def soup_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(
        prog="salsa soup",
        description="Average SFT checkpoints (or LoRA adapters) into a model soup.",
        exit_on_error=False,
    )
    p.add_argument("--config", action=ActionConfigFile, help="YAML file with these options")
    p.add_argument("--checkpoints", type=str, nargs="+", required=True, help="input dirs")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="default: uniform")
    p.add_argument("--output", type=str, required=True, help="output directory")
    p.add_argument("--normalize", action="store_true", help="rescale weights to sum to 1")
    p.add_argument("--lora_output", choices=["merged", "adapter"], default="merged")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


def soup_main(argv: list[str] | None = None) -> int:
    """Entry point of ``salsa soup``.

    Args:
        argv: Arguments after ``soup`` (default ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on a bad input (the message is printed as ``error: ...``).
    """
    from salsa_lightning.soup import write_soup

    try:
        args = soup_parser().parse_args(drop_switch_values(argv, ("--normalize", "--overwrite")))
        write_soup(
            args.checkpoints,
            args.weights,
            args.output,
            normalize=args.normalize,
            lora_output=args.lora_output,
            overwrite=args.overwrite,
            log=lambda s: print(s, flush=True),
        )
    except (SalsaError, argparse.ArgumentError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------- convert


def convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="salsa convert",
        description="Convert a GGUF checkpoint into a Hugging Face model directory.",
    )
    parser.add_argument("--gguf", required=True, help="the .gguf checkpoint file")
    parser.add_argument("--output", required=True, help="Hugging Face directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
        help="weights dtype of the output (default float32)",
    )  # fmt: skip
    return parser


def convert_main(argv: list[str] | None = None) -> int:
    """``salsa convert --gguf FILE --output DIR [--overwrite] [--dtype float32]``."""
    from salsa_lightning.convert import convert_gguf

    args = convert_parser().parse_args(drop_switch_values(argv, ("--overwrite",)))
    convert_gguf(args.gguf, args.output, args.overwrite, args.dtype, log=print)
    return 0


# ----------------------------------------------------------------------------- one command

STAGE_COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "convert": convert_main,
    "soup": soup_main,
    "evaluate": evaluate_main,
    "landscape": landscape_main,
    "pairs": pairs_main,
    "prompts": prompts_main,
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def run_command(argv: list[str]) -> int:
    """Run one stage command, e.g. ``["fit", "--config", "configs/sft.yaml"]``; returns its exit
    status: 0, or 2 after printing ``error: ...`` for bad input."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def run() -> int:
        check_not_a_pipeline(argv[0] if argv else "fit", argv)
        if argv and argv[0] in STAGE_COMMANDS:
            return STAGE_COMMANDS[argv[0]](argv[1:]) or 0
        from salsa_lightning.lightning_cli import SalsaCLI

        try:  # None when argv is the process's own command line: LightningCLI warns when given it
            SalsaCLI(args=None if argv == sys.argv[1:] else argv)
        except SystemExit:
            if {"-h", "--help"} & set(argv):  # the model's and data's choices after the help
                print("\n".join(configured_choices(argv)))
            raise
        return 0

    return exit_status(run)


def exit_status(run: Callable[[], int]) -> int:
    """``run()``'s exit status: 2 after printing a SalsaError behind any error as one ``error:``
    line (after its details, for example the traceback of the user's own code that failed);
    143 when SIGTERM stopped the run (one ``stopped by SIGTERM: ...`` line says what was kept)."""
    from salsa_lightning.sigterm import (
        SIGTERM_STATUS,
        is_stop,
        reports_for_all_ranks,
        sigterm_raises,
        sigterm_received,
        stop_message,
    )

    try:
        with sigterm_raises():  # a fit's own stop takes over while it trains
            return run()
    except SystemExit as stop:
        if not is_stop(stop):
            raise
        if reports_for_all_ranks():  # every rank stopped; one says so
            print(stop_message(stop), file=sys.stderr, flush=True)
        return SIGTERM_STATUS
    except Exception as err:
        if sigterm_received():  # C code replaced the Terminated raised inside it: still the stop
            if reports_for_all_ranks():
                print(stop_message(err), file=sys.stderr, flush=True)
            return SIGTERM_STATUS
        cause = salsa_cause(err) if isinstance(err, ValueError) else None
        if cause is None:
            raise
        print(f"{cause.details}error: {cause}", file=sys.stderr)
        return 2


def configured_choices(args: list[str]) -> list[str]:
    """For ``salsa fit|validate --config ... --help``: every choice setting (a ``Literal``) of
    the model and data classes the configs name, with its choices (LightningCLI's help lists
    only the trainer's options in subclass mode)."""
    from jsonargparse.typing import import_object

    named: dict[str, str] = {}
    for flag, value in zip(args, args[1:], strict=False):
        if flag in ("-c", "--config") and Path(value).is_file():
            config = read_mapping(Path(value))
            for key in ("model", "data"):
                if isinstance(config.get(key), dict) and "class_path" in config[key]:
                    named[key] = config[key]["class_path"]
    lines = []
    for key, class_path in named.items():
        lines += [
            f"\nChoices of {class_path} (all its options: salsa {args[0]} --{key}.help "
            f"{class_path}):",
            *choice_lines(import_object(class_path).__init__, f"{key}.init_args"),
        ]
    return lines


def choice_lines(function: Callable[..., Any], prefix: str) -> list[str]:
    """``  --prefix.name {a, b}`` for each ``Literal`` argument of ``function``, and of the
    dataclasses it takes (their fields, one level further down)."""
    import dataclasses
    import typing

    from salsa_lightning.errors import literal_choices

    lines = []
    for name, hint in typing.get_type_hints(function).items():
        if choices := literal_choices(hint):
            lines.append(f"  --{prefix}.{name} {{{', '.join(str(c) for c in choices)}}}")
        for arg in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(arg):
                lines += choice_lines(arg.__init__, f"{prefix}.{name}")
    return lines


def salsa_cause(err: BaseException | None) -> SalsaError | None:
    """The SalsaError behind ``err`` (jsonargparse wraps errors raised while instantiating)."""
    while err is not None:
        if isinstance(err, SalsaError):
            return err
        err = err.__cause__ or err.__context__
    return None
