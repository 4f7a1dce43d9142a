"""``freeze-parity audit TARGET``: list the freezing hazards of a model.

TARGET is a saved Keras model (``model.keras``) or a factory
``package.module:function`` that returns an ``nn.Module`` or a ``keras.Model``,
or ``(model, optimizer)``, prepared as your training loop would use it. Exit
status: 0 no hazards, 1 hazards found, 2 the target could not be loaded.
"""

from __future__ import annotations

import argparse
import json

from shared import frameworks
from shared.commands.output import print_report
from shared.commands.targets import load_target


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="a saved Keras model (.keras) or a factory "
                        "package.module:function returning a model or (model, optimizer)")
    parser.add_argument("--framework", choices=frameworks.FRAMEWORKS, default=None,
                        help="the framework the target must be (default: detected)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    model, optimizer, framework = load_target(args.target, args.framework)
    report = frameworks.load(framework, "audit").audit(model, optimizer)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report.render(), report.notes, report.hazard_lines(), min_width=120)
    return 1 if report.hazards else 0
