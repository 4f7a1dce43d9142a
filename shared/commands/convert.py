"""``freeze-parity convert SRC DST``: torchvision ResNet-18 state_dict <-> canonical checkpoint,
torch training file <-> canonical training checkpoint.

SRC ``.pth``/``.pt`` (read with ``torch.load(weights_only=True)``) or a
``.safetensors`` state_dict -> DST canonical ``.safetensors``. SRC canonical
``.safetensors`` (it has freeze-parity's ``format_version`` metadata) -> DST
``.pth`` that ``torchvision.models.resnet18()`` loads with ``strict=True``;
``num_batches_tracked`` is not in the canonical form and is written as 0.

Training (tinyconv, resnet18): SRC torch training file ``.pt``/``.pth``
(``torch_impl.weights.save_training_file``: model and optimizer state_dicts) ->
DST canonical training checkpoint ``.safetensors`` (what
``tf_impl.weights.load_training_file`` reads); SRC canonical training checkpoint
-> DST torch training file. Model tensors, optimizer slots (torch's names), step
and parameters are copied exactly; Keras's SGD velocity is -lr x torch's buffer.
"""

from __future__ import annotations

import argparse

from shared.convert import convert

__all__ = ["add_parser", "run"]


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("src", metavar="SRC",
                        help="torchvision state_dict (.pth, .pt, .safetensors), canonical checkpoint, "
                             "torch training file (.pt) or canonical training checkpoint")
    parser.add_argument("dst", metavar="DST",
                        help="output: .safetensors for a canonical (training) checkpoint, .pth/.pt "
                             "for a state_dict or a torch training file")


def run(args: argparse.Namespace) -> int:
    print(convert(args.src, args.dst))
    return 0
