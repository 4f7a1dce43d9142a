"""The ``freeze-parity`` command line.

Each subcommand lives in ``shared/commands/<name>.py`` with ``add_parser``
and ``run(args) -> int``. Framework code is loaded lazily through
:mod:`shared.frameworks` (torch before TensorFlow), so ``--help`` is fast
and no import order can segfault. Bad input ends with one line on stderr
and exit status 2, never a traceback (set FREEZE_PARITY_DEBUG=1 to see one, and
the frameworks' start-up log that :mod:`shared.quiet` keeps off stderr).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from shared import __version__
from shared.errors import UsageError
from shared.quiet import debug_requested

COMMANDS = {
    "pretrain": "pretrain tinyconv/resnet18 on the source domain and cache the checkpoint",
    "run": "fine-tune with one strategy in one framework and write its RunRecord",
    "compare": "run every strategy in both frameworks: table, figure and report (make demo)",
    "explain": "reproduce and decompose the fit-vs-evaluate loss gap of a frozen base",
    "convert": "convert a torchvision ResNet-18 state_dict to a canonical checkpoint and back",
    "audit": "list freezing hazards of a saved Keras model or a model factory",
    "bench": "time the training paths and strategies (make bench)",
    "port": "check your Keras model against your PyTorch port, layer by layer, in both modes "
            "and under your freezing",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own convention)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="freeze-parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"freeze-parity {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"shared.commands.{name}")
        module.add_parser(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"shared.commands.{args.command}")
    try:
        return int(module.run(args) or 0)
    except (UsageError, ValueError, OSError) as exc:
        if debug_requested():
            raise
        # printed as raised: the code that raises writes one line (tests check the raw stderr)
        print(f"freeze-parity {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"freeze-parity {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
