"""The ``ghostpl`` command: LightningCLI over GhostRecoveryModule and TextDataModule."""

from __future__ import annotations

import logging
import os

# Variables that name a process's global rank, in the order Lightning 2.6 reads them
# (lightning.fabric.utilities.rank_zero._get_rank). Lightning's own launcher sets LOCAL_RANK on the
# processes it starts, torchrun sets RANK and SLURM sets SLURM_PROCID.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def environment_rank() -> int:
    """Return the global rank that the launcher's environment names, or 0 when it names none."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name)
        if value is not None:
            return int(value)
    return 0


# Ranks above zero repeat rank zero's work on other windows. tqdm and transformers read these
# variables when they are imported, so they are set before the imports below. They hide the
# progress bars that libraries draw (transformers' GGUF conversion, for one) and transformers'
# info and warning messages on those ranks.
# NOTE: with Lightning's launcher on several nodes, the first process of each node has no rank
# variable until Lightning sets one, so it still shows those bars and messages.
if environment_rank() != 0:
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from lightning.pytorch.cli import LightningCLI, LRSchedulerTypeTuple  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402

from ghostpl.data import TextDataModule  # noqa: E402
from ghostpl.module import GhostRecoveryModule  # noqa: E402


class RankZeroFilter(logging.Filter):
    """Pass every record on global rank zero, and only errors on the other ranks.

    The rank is read when a record is emitted, because Lightning sets ``rank_zero_only.rank`` only
    once it has started the processes. Every rank selects, calibrates and solves alike, so their
    messages would otherwise repeat once per rank.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(rank_zero_only, "rank", 0) == 0 or record.levelno >= logging.ERROR


def configure_logging() -> None:
    """Send ghostpl's INFO messages to stderr, from rank zero only.

    When the root logger has handlers already (an application's or pytest's), they are left as
    they are, and every rank's messages reach them.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.addFilter(RankZeroFilter())
        root.addHandler(handler)
    logging.getLogger("ghostpl").setLevel(logging.INFO)


class GhostCLI(LightningCLI):
    """LightningCLI whose data module reads the model's tokenizer."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model", "data.tokenizer")
        # The model's parameters exist only after setup() loads it, so --optimizer and
        # --lr_scheduler are handed to the module, which builds them over its trainable parameters.
        parser.add_optimizer_args((torch.optim.Optimizer,), nested_key="optimizer", link_to="model.optimizer")
        parser.add_lr_scheduler_args(LRSchedulerTypeTuple, nested_key="lr_scheduler", link_to="model.lr_scheduler")

    def _check_request(self) -> None:
        # Bad layer requests fail here, before the data module tokenizes any text.
        self.model.check_request()

    before_fit = before_validate = before_test = _check_request


def build_cli(args: list[str] | None = None, run: bool = True) -> GhostCLI:
    """Parse ``args`` (or ``sys.argv``) and, with ``run``, execute the subcommand."""
    configure_logging()
    return GhostCLI(
        GhostRecoveryModule,
        TextDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"description": "Prune decoder layers of a causal LM and repair them with ghost operators."},
    )


def main() -> None:
    build_cli()


if __name__ == "__main__":
    main()
