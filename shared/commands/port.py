"""``freeze-parity port KERAS_TARGET TORCH_TARGET``: check your port layer by layer.

Each target is a saved Keras model (``model.keras``, Keras side only) or a
factory ``package.module:function`` returning the model (or ``(model,
optimizer)``), prepared as your training loop uses it (frozen parts frozen).
The check (:func:`shared.port.check_port`) pairs the two models' weighted layers
by dataflow (``--map`` for what the graph cannot decide), lints every pair,
compares per-layer outputs in inference and training mode and runs ``--steps``
optimizer steps on both. Prints the per-layer table and the
findings; ``--json`` and ``--out`` write the report (``--out``: port.json and
port.png, all or none). Exit status: 0 equivalent, 1 findings (named), 2 bad
input (one line naming the target and the layer).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from shared.commands.output import print_report
from shared.commands.targets import load_target
from shared.errors import UsageError

__all__ = ["add_parser", "parse_input_shape", "parse_name_map", "run"]

DEFAULT_STEPS = 3


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("keras_target", help="a .keras file or package.module:function "
                        "returning the keras.Model (or (model, optimizer))")
    parser.add_argument("torch_target", help="package.module:function returning the "
                        "nn.Module (or (model, optimizer))")
    parser.add_argument("--input-shape", default=None, metavar="H,W,C",
                        help="input size (default: the Keras model's declared input)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"optimizer steps on both sides (default {DEFAULT_STEPS}; 0: none)")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                        help="when the factories return no optimizer (Adam: epsilon 1e-12 "
                        "on both sides)")
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate (default 0.01)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--transfer", choices=("none", "torch", "keras"), default="none",
                        help="copy that side's weights to the other through the pairing first "
                        "(default none: compare the weights as given)")
    parser.add_argument("--torch-weights", type=Path, default=None, metavar="FILE",
                        help="a state_dict (.pth/.pt read with weights_only, or .safetensors) "
                        "loaded strictly into the torch model")
    parser.add_argument("--map", action="append", default=[], metavar="KERAS=TORCH",
                        help="pair these two layers explicitly, where the dataflow graph "
                        "cannot decide (repeatable)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="write the report as JSON")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="write port.json and port.png into DIR")


def parse_input_shape(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UsageError(f"--input-shape {text!r}: expected H,W,C (three positive integers)")
    return shape


def parse_name_map(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        keras_name, sep, torch_name = item.partition("=")
        if not sep or not keras_name or not torch_name:
            raise UsageError(f"--map {item!r}: expected KERAS_LAYER=TORCH_MODULE")
        out[keras_name] = torch_name
    return out


def _load_torch_weights(model, path: Path, target: str) -> None:
    from shared import frameworks

    state = frameworks.load("torch", "resnet").load_state_dict_file(path)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UsageError(f"--torch-weights {path}: does not fit {target} ({first})") from None


def run(args: argparse.Namespace) -> int:
    from shared.port import check_port, write_port_report

    input_shape = parse_input_shape(args.input_shape)
    name_map = parse_name_map(args.map)
    torch_model, torch_optimizer, _ = load_target(args.torch_target, "torch")
    keras_model, keras_optimizer, _ = load_target(args.keras_target, "tf")
    if args.torch_weights is not None:
        _load_torch_weights(torch_model, args.torch_weights, args.torch_target)
    report = check_port(keras_model, torch_model, input_shape=input_shape, steps=args.steps,
                        optimizer=args.optimizer, learning_rate=args.lr,
                        batch_size=args.batch_size,
                        transfer_from=None if args.transfer == "none" else args.transfer,
                        name_map=name_map, keras_optimizer=keras_optimizer,
                        torch_optimizer=torch_optimizer,
                        names=(args.keras_target, args.torch_target))
    print_report(report.render(), report.notes, report.finding_lines(), min_width=140)
    if args.json is not None:
        from shared.io import atomic_write_json

        atomic_write_json(args.json, report.to_dict())
    if args.out is not None:
        for path in write_port_report(report, args.out).values():
            print(f"wrote {path}")
    return 0 if report.ok else 1
