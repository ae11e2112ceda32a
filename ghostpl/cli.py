"""The ``ghostpl`` command: LightningCLI over GhostRecoveryModule and TextDataModule."""

from __future__ import annotations

import logging

from lightning.pytorch.cli import LightningCLI

from ghostpl.data import TextDataModule
from ghostpl.module import GhostRecoveryModule


class GhostCLI(LightningCLI):
    """LightningCLI whose data module reads the model's tokenizer."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model", "data.tokenizer")

    def _check_request(self) -> None:
        # Bad layer requests fail here, before the data module tokenizes any text.
        self.model.check_request()

    before_fit = before_validate = before_test = _check_request


def build_cli(args: list[str] | None = None, run: bool = True) -> GhostCLI:
    """Parse ``args`` (or ``sys.argv``) and, with ``run``, execute the subcommand."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ghostpl").setLevel(logging.INFO)
    return GhostCLI(
        GhostRecoveryModule,
        TextDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "Prune decoder layers of a causal LM and repair them with ghost operators."},
    )


def main() -> None:
    build_cli()


if __name__ == "__main__":
    main()
