"""``freeze-parity run``: one strategy, one framework, one RunRecord.

With ``--replicas N`` the run is data-parallel (:mod:`shared.distributed`): the
same global batch split over N replicas, and ``--json`` gets the ReplicaRecord
(the RunRecord plus every replica's BN statistics). A replica that fails ends
the command with one line naming it and exit status 2, and writes nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from shared import frameworks
from shared.archs import RUN_ARCHS
from shared.compare import expectation_failures
from shared.errors import UsageError
from shared.io import atomic_write_text, check_output_file
from shared.record import OPTIMIZERS, RunConfig
from shared.strategies import ALL_STRATEGIES


def add_parser(parser) -> None:
    parser.add_argument("--framework", choices=frameworks.FRAMEWORKS, required=True)
    parser.add_argument("--strategy", choices=list(ALL_STRATEGIES), required=True)
    parser.add_argument("--arch", choices=RUN_ARCHS, default="tinyconv")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps (default: tinyconv 100, resnet18 30, vit 30)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    parser.add_argument("--lr", type=float, default=None, help="default: SGD 0.02 (resnet18 and vit 0.01), Adam 0.001")
    parser.add_argument("--checkpoint", default=None,
                        help="canonical pretrained checkpoint; 'cache' = the cache's (pretrained "
                             "here on first use); default: the shipped one (tinyconv, vit) or "
                             "the cache's (resnet18)")
    parser.add_argument("--json", type=Path, default=None, help="write the RunRecord here")
    parser.add_argument("--replicas", type=int, default=1,
                        help="data-parallel replicas (torch: DDP ranks under torchrun; tf: "
                             "MirroredStrategy over logical CPU devices); global batch unchanged")
    parser.add_argument("--synchronized-bn", action="store_true",
                        help="tf with --replicas: BatchNormalization(synchronized=True)")
    parser.add_argument("--no-broadcast-buffers", action="store_true",
                        help="torch with --replicas: DDP does not copy rank 0's buffers (BN "
                             "statistics) at each forward: DDP(forward_sync_buffers=False) "
                             "where torch has it (2.14 deprecates broadcast_buffers), else "
                             "DDP(broadcast_buffers=False); the launcher line says which")


def run(args) -> int:
    config = RunConfig(arch=args.arch, strategy=args.strategy, steps=args.steps,
                       optimizer=args.optimizer, learning_rate=args.lr,
                       checkpoint=args.checkpoint)
    if args.replicas < 1:
        raise UsageError(f"--replicas must be >= 1, got {args.replicas}")
    if args.replicas == 1 and (args.synchronized_bn or args.no_broadcast_buffers):
        raise UsageError("--synchronized-bn / --no-broadcast-buffers need --replicas >= 2")
    if args.json:  # before the run, not after it
        check_output_file(args.json, "--json")
    start = time.perf_counter()
    if args.replicas > 1:
        from shared import distributed

        options = distributed.ReplicaOptions(replicas=args.replicas,
                                             broadcast_buffers=not args.no_broadcast_buffers,
                                             synchronized_bn=args.synchronized_bn)
        replicated = distributed.run_replicas(args.framework, config, options)
        record = replicated.record
        text = json.dumps(replicated.to_dict(), indent=2) + "\n"
    else:
        record = frameworks.load(args.framework, "train").run(config)
        text = record.to_json()
    seconds = time.perf_counter() - start
    if args.json:
        atomic_write_text(args.json, text)
    first, last = record.steps[0], record.steps[-1]
    held = record.heldout[-1]
    where = f", {args.replicas} replicas x {config.batch_size // args.replicas}" if args.replicas > 1 else ""
    print(f"{args.framework} {config.strategy} ({config.arch}, {config.optimizer}, {config.steps} steps"
          f"{where}, {seconds:.1f} s)")
    print(f"  train loss {first.train_loss:.4f} -> {last.train_loss:.4f}; eval loss "
          f"{first.eval_loss:.4f} -> {last.eval_loss:.4f}; largest train/eval gap "
          f"{record.max_train_eval_gap:.3g}")
    print(f"  held-out loss {held.loss:.4f}, accuracy {held.accuracy:.3f}; frozen tensors unchanged: "
          f"{record.frozen_unchanged}; BN statistics changed: {record.bn_stats_changed}")
    if args.replicas > 1:
        ddp = next((e["ddp_buffer_sync"] for e in replicated.extra if "ddp_buffer_sync" in e),
                   None)  # the keyword the ranks passed (torch)
        launcher = replicated.launcher + (f", DDP({ddp})" if ddp else "")
        print(f"  launcher: {launcher}; BN statistics spread across replicas "
              f"{replicated.replica_spread():.3g}; saved statistics = "
              f"{', '.join(replicated.saved_matches()) or 'no single replica'}")
    failures = expectation_failures(record)
    for failure in failures:
        print(f"  expectation failed: {failure}")
    if args.json:
        print(f"  record: {args.json}")
    return 1 if failures else 0
