"""The ``salsa`` command.

- ``salsa fit|validate --config configs/<stage>.yaml``: LightningCLI in subclass mode, the YAML
  names the LightningModule and LightningDataModule classes.
- ``salsa convert --gguf FILE --output DIR``: a GGUF checkpoint to a Hugging Face directory.
- ``salsa soup ...``: weight-average checkpoints into a model soup.
- ``salsa evaluate ...``: answers, scores, KL and win rates of several models.
- ``salsa landscape ...``: reward along the alpha line / barycentric grid of SFT models.
- ``salsa pipeline --config PIPELINE.yaml``: stages in order, skipping finished ones.
- ``salsa quickstart [--output DIR]``: the whole SALSA-vs-PPO experiment on the embedded task.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import lightning as L
from lightning.pytorch.cli import LightningCLI

from salsa_lightning.errors import SalsaError


class SalsaCLI(LightningCLI):
    """LightningCLI with the project's defaults: errors in inputs end the run with a message."""

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


def _subcommands() -> dict[str, Callable[[list[str]], int]]:
    from salsa_lightning.convert import convert_main
    from salsa_lightning.evaluate import evaluate_main
    from salsa_lightning.landscape import landscape_main
    from salsa_lightning.pipeline import pipeline_main, quickstart_main
    from salsa_lightning.soup import soup_main

    return {
        "convert": convert_main,
        "soup": soup_main,
        "evaluate": evaluate_main,
        "landscape": landscape_main,
        "pipeline": pipeline_main,
        "quickstart": quickstart_main,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``salsa`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        commands = _subcommands()
        if args and args[0] in commands:
            return commands[args[0]](args[1:]) or 0
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
