"""``freeze-parity convert SRC DST``: torchvision ResNet-18 state_dict <-> canonical checkpoint.

SRC ``.pth``/``.pt`` (read with ``torch.load(weights_only=True)``) or a
``.safetensors`` state_dict -> DST canonical ``.safetensors``. SRC canonical
``.safetensors`` (it has freeze-parity's ``format_version`` metadata) -> DST
``.pth`` that ``torchvision.models.resnet18()`` loads with ``strict=True``;
``num_batches_tracked`` is not in the canonical form and is written as 0.
"""

from __future__ import annotations

import argparse

from shared.convert import convert

__all__ = ["add_parser", "run"]


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("src", metavar="SRC",
                        help="torchvision state_dict (.pth, .pt, .safetensors) or canonical checkpoint")
    parser.add_argument("dst", metavar="DST",
                        help="output: .safetensors for a canonical checkpoint, .pth/.pt for a state_dict")


def run(args: argparse.Namespace) -> int:
    print(convert(args.src, args.dst))
    return 0
