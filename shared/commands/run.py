"""``freeze-parity run``: one strategy, one framework, one RunRecord."""

from __future__ import annotations

import time
from pathlib import Path

from shared import frameworks
from shared.archs import ARCHS
from shared.compare import expectation_failures
from shared.io import atomic_write_text, check_output_file
from shared.record import OPTIMIZERS, RunConfig
from shared.strategies import STRATEGIES


def add_parser(parser) -> None:
    parser.add_argument("--framework", choices=frameworks.FRAMEWORKS, required=True)
    parser.add_argument("--strategy", choices=list(STRATEGIES), required=True)
    parser.add_argument("--arch", choices=ARCHS, default="tinyconv")
    parser.add_argument("--steps", type=int, default=RunConfig.steps)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    parser.add_argument("--lr", type=float, default=None, help="default: SGD 0.02, Adam 0.001")
    parser.add_argument("--checkpoint", default=None,
                        help="canonical pretrained checkpoint; 'cache' = the cache's (pretrained "
                             "here on first use); default: the shipped one (tinyconv) or the "
                             "cache's (resnet18)")
    parser.add_argument("--json", type=Path, default=None, help="write the RunRecord here")


def run(args) -> int:
    config = RunConfig(arch=args.arch, strategy=args.strategy, steps=args.steps,
                       optimizer=args.optimizer, learning_rate=args.lr,
                       checkpoint=args.checkpoint)
    if args.json:  # before the run, not after it
        check_output_file(args.json, "--json")
    train = frameworks.load(args.framework, "train")
    start = time.perf_counter()
    record = train.run(config)
    seconds = time.perf_counter() - start
    if args.json:
        atomic_write_text(args.json, record.to_json())
    first, last = record.steps[0], record.steps[-1]
    held = record.heldout[-1]
    print(f"{args.framework} {config.strategy} ({config.arch}, {config.optimizer}, {config.steps} steps, "
          f"{seconds:.1f} s)")
    print(f"  train loss {first.train_loss:.4f} -> {last.train_loss:.4f}; eval loss "
          f"{first.eval_loss:.4f} -> {last.eval_loss:.4f}; largest train/eval gap "
          f"{record.max_train_eval_gap:.3g}")
    print(f"  held-out loss {held.loss:.4f}, accuracy {held.accuracy:.3f}; frozen tensors unchanged: "
          f"{record.frozen_unchanged}; BN statistics changed: {record.bn_stats_changed}")
    failures = expectation_failures(record)
    for failure in failures:
        print(f"  expectation failed: {failure}")
    if args.json:
        print(f"  record: {args.json}")
    return 1 if failures else 0
