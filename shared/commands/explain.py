"""``freeze-parity explain``: why ``fit`` and ``evaluate`` report different losses on the same data.

The seed question: "fit says 3.1, evaluate on the same data says 2.5". This
reproduces it: a pretrained base plus a new head, one epoch of ``fit`` (Keras:
a real ``model.fit``; PyTorch: the equivalent loop) over the target training
split, then ``evaluate`` on the same data, and splits ``fit - evaluate`` into
(a) BN mode, (b) weight updates and (c) batch averaging, which sum to the gap
(:mod:`shared.explain`). Two setups by default:

* ``frozen``, the correct freeze (what Keras 3 gives for ``base.trainable =
  False``): fit reports *more* than evaluate, as in the seed; (a) is exactly 0
  and the gap is (b), the head improving during the epoch fit averages over;
* ``naive``, each framework's classic mistake, BatchNorm normalising with
  batch statistics in training: (a) is large; on this project's shifted
  target domain it is *negative* (batch statistics suit the target better
  than the source statistics inference uses).
"""

from __future__ import annotations

import json
import sys

from shared import data, frameworks
from shared.archs import PIPELINE_ARCHS, arch_config
from shared.commands.compare import parse_strategies, pretrained_checkpoint
from shared.errors import UsageError
from shared.record import RunConfig
from shared.strategies import get_strategy

__all__ = ["DEFAULT_STRATEGIES", "add_parser", "run"]

DEFAULT_STRATEGIES = ("frozen", "naive")
_FRAMEWORK_CHOICES = {"tf": ("tf",), "torch": ("torch",), "both": ("tf", "torch")}


def add_parser(parser) -> None:
    parser.add_argument("--framework", choices=list(_FRAMEWORK_CHOICES), default="both")
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                        help=f"comma-separated (default: {','.join(DEFAULT_STRATEGIES)})")
    parser.add_argument("--arch", choices=PIPELINE_ARCHS, default="tinyconv")
    parser.add_argument("--examples", type=int, default=None,
                        help="fit on the first N target training images (default: all of them)")
    parser.add_argument("--checkpoint", default=None,
                        help="canonical pretrained checkpoint; 'cache' = the cache's; default: "
                             "the shipped one (tinyconv) or the cache's (resnet18)")
    parser.add_argument("--json", action="store_true", help="print the decompositions as JSON")


def run(args) -> int:
    strategies = parse_strategies(args.strategies)
    n = len(data.load_domains(size=arch_config(args.arch).image_size).target_train)
    if args.examples is not None and not 1 <= args.examples <= n:
        raise UsageError(f"--examples must be in [1, {n}] (the target training split), "
                         f"got {args.examples}")
    checkpoint = pretrained_checkpoint(args.arch, "explain", args.checkpoint)
    configs = [RunConfig(arch=args.arch, strategy=name, checkpoint=checkpoint) for name in strategies]
    impls = {fw: frameworks.load(fw, "explain") for fw in ("torch", "tf")
             if fw in _FRAMEWORK_CHOICES[args.framework]}  # torch first
    results = [impls[fw].decompose(c, args.examples)
               for c in configs for fw in _FRAMEWORK_CHOICES[args.framework]]

    first, d = configs[0], results[0]
    last = d.examples - (d.batches - 1) * first.batch_size
    setting = (f"{first.arch}: one epoch of fit over {d.examples} target training images "
               f"(shuffled once, fit's shuffle off) in {d.batches} batches of {first.batch_size}"
               + (f" (the last of {last})" if last != first.batch_size else "")
               + f", then evaluate on the same images; {first.optimizer} lr {first.learning_rate},"
               f" momentum {first.momentum}")
    if args.json:
        json.dump({"setting": setting, "checkpoint": checkpoint,
                   "decompositions": [d.to_dict() for d in results]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0

    from rich.console import Console

    from shared.explain import PARTS, reading, render_table

    table = render_table(results, title="fit vs evaluate on the same data")
    console = Console()
    console.print(table, width=max(console.width, 100))
    print(setting)
    for _, label, what in PARTS:
        print(f"  {label}: {what}")
    print("  float rounding: the framework's own running mean vs the same mean in float64")
    for name in strategies:
        print(f"  {name}: {get_strategy(name).summary}")
    for d in results:
        print(reading(d))
    return 0
