"""The ``salsa`` command.

- ``salsa fit|validate --config configs/<stage>.yaml``: LightningCLI in subclass mode, the YAML
  names the LightningModule and LightningDataModule classes.
- ``salsa convert --gguf FILE --output DIR``: a GGUF checkpoint to a Hugging Face directory.
- ``salsa soup ...``: weight-average checkpoints into a model soup.
- ``salsa evaluate ...``: answers, scores, KL and win rates of several models.
- ``salsa landscape ...``: reward along the alpha line / barycentric grid of SFT models.
- ``salsa pairs ...``: preference pairs of a model's own sampled answers, ordered by a judge.
- ``salsa pipeline --config PIPELINE.yaml``: stages in order, skipping finished ones.
- ``salsa quickstart [--output DIR]``: the whole SALSA-vs-PPO experiment on the embedded task.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI

from salsa_lightning.errors import SalsaError


class SalsaCLI(LightningCLI):
    """LightningCLI with the project's defaults: errors in inputs end the run with a message,
    output directories are checked before anything is built, and ``--ckpt_path`` resumes as
    documented (``salsa_lightning.resume``)."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    def before_instantiate_classes(self) -> None:
        # `--trainer.enable_checkpointing false` turns the YAML's checkpoint callback off too
        # (Lightning would refuse the pair).
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer")
        if (
            trainer is not None
            and trainer.get("enable_checkpointing") is False
            and trainer.get("callbacks")
        ):
            trainer.callbacks = [
                c for c in trainer.callbacks
                if not str(getattr(c, "class_path", "")).endswith("ModelCheckpoint")
            ]  # fmt: skip

    def _parse_ckpt_path(self) -> None:
        """Keep this run's settings: LightningCLI would replace them with the checkpoint's
        without a word; ``before_fit`` refuses the ones that differ instead."""

    def before_fit(self) -> None:
        from lightning.pytorch.utilities import rank_zero_info

        from salsa_lightning.outputs import check_writable_dir
        from salsa_lightning.resume import (
            LAST,
            check_resume,
            checkpoint_dirs,
            keep_metrics,
            resolve_last,
        )

        trainer, config = self.trainer, self.config_init[self.subcommand]
        if config.get("ckpt_path") == LAST:
            found = resolve_last(trainer)
            if found is None:
                where = ", ".join(str(d) for d, _ in checkpoint_dirs(trainer)) or "nowhere yet"
                rank_zero_info(f"--ckpt_path last: no last.ckpt in {where}; starting a new run.")
            config["ckpt_path"] = None if found is None else str(found)
        if config.get("ckpt_path"):
            rank_zero_info(f"resuming from {config['ckpt_path']}")
            check_resume(Path(config["ckpt_path"]), self.model, self.datamodule)
            if trainer.logger is not None:
                keep_metrics(trainer.logger)
        logger, callback = trainer.logger, trainer.checkpoint_callback
        if logger is not None and getattr(logger, "save_dir", None):
            check_writable_dir(logger.save_dir, "trainer.logger save_dir")
        if callback is not None and callback.dirpath:
            check_writable_dir(callback.dirpath, "the checkpoint callback's dirpath")
        check_writable_dir(trainer.default_root_dir, "trainer.default_root_dir")


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


def function_main(fn: Callable[..., Any], argv: list[str] | None, prog: str) -> int:
    """A command line for ``fn``: its arguments as flags, or from a YAML with ``--config``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, description=fn.__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(fn)
    cfg = parser.instantiate_classes(parser.parse_args(join_list_flags(fn, argv)))
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


# ----------------------------------------------------------------------------- soup


def _soup_parser():
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
        args = _soup_parser().parse_args(argv)
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


def convert_main(argv: list[str] | None = None) -> int:
    """``salsa convert --gguf FILE --output DIR [--overwrite] [--dtype float32]``."""
    from salsa_lightning.convert import convert_gguf

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
    args = parser.parse_args(argv)
    convert_gguf(args.gguf, args.output, args.overwrite, args.dtype, log=print)
    return 0


# ----------------------------------------------------------------------------- pipelines


def pipeline_main(argv: list[str] | None = None) -> int:
    """``salsa pipeline --config PIPELINE.yaml [--output DIR]``."""
    from salsa_lightning.pipeline import run_pipeline

    parser = argparse.ArgumentParser(
        prog="salsa pipeline", description="Run the stages of a pipeline YAML in order."
    )
    parser.add_argument("--config", required=True, help="pipeline YAML")
    parser.add_argument("--output", default=".", help="directory the stages run in (default: here)")
    args = parser.parse_args(argv)
    run_pipeline(args.config, args.output)
    return 0


def quickstart_main(argv: list[str] | None = None) -> int:
    """``salsa quickstart [--output DIR]``: the whole experiment on the embedded default."""
    from salsa_lightning.pipeline import find_config, run_with_report

    parser = argparse.ArgumentParser(
        prog="salsa quickstart", description="The whole SALSA experiment on the embedded task."
    )
    parser.add_argument("--output", default=".", help="directory for artifacts/ (default: here)")
    parser.add_argument(
        "--config", default=None, help="pipeline YAML (default configs/quickstart.yaml)"
    )
    args = parser.parse_args(argv)
    run_with_report(
        Path(args.config) if args.config else find_config("quickstart.yaml"), args.output
    )
    return 0


SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {
    "convert": convert_main,
    "soup": soup_main,
    "evaluate": evaluate_main,
    "landscape": landscape_main,
    "pairs": pairs_main,
    "pipeline": pipeline_main,
    "quickstart": quickstart_main,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``salsa`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args and args[0] in SUBCOMMANDS:
            return SUBCOMMANDS[args[0]](args[1:]) or 0
        SalsaCLI(args=argv)  # None: LightningCLI reads sys.argv itself
    except (SalsaError, ValueError) as err:
        cause = salsa_cause(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 2
    return 0


def salsa_cause(err: BaseException | None) -> SalsaError | None:
    """The SalsaError behind ``err`` (jsonargparse wraps errors raised while instantiating)."""
    while err is not None:
        if isinstance(err, SalsaError):
            return err
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
