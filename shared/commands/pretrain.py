"""``freeze-parity pretrain``: train a base on the source domain, write the checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

from shared import shipped
from shared.archs import RUN_ARCHS
from shared.errors import UsageError
from shared.frameworks import FRAMEWORKS
from shared.pretrain import (
    DEFAULT_EPOCHS,
    MIN_SOURCE_ACCURACY,
    PretrainConfig,
    checkpoint_path,
    pretrain,
)


def add_parser(parser) -> None:
    parser.add_argument("--arch", choices=RUN_ARCHS, default="tinyconv")
    parser.add_argument("--framework", choices=FRAMEWORKS, default="torch",
                        help="framework that trains (either's checkpoint loads into the other)")
    parser.add_argument("--out", type=Path, default=None,
                        help="checkpoint path (default: the cache, $FREEZE_PARITY_CACHE or "
                             "~/.cache/freeze-parity)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"default per arch: {', '.join(f'{a} {e}' for a, e in DEFAULT_EPOCHS.items())}")
    parser.add_argument("--ship", action="store_true",
                        help="maintainers: remake the checkpoint that ships in the package "
                             "(shared/pretrained/) with its recipe and sha256")


def run(args) -> int:
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if args.ship:
        if args.epochs is not None or args.out is not None:
            raise UsageError("--ship uses the default recipe and location: no --epochs or --out")
        recipe = shipped.ship(args.arch, framework=args.framework)
        # the directory ship() wrote to (read now, not when this module was imported)
        print(f"shipped {args.arch}: {shipped.SHIPPED_DIR / recipe['file']} sha256 "
              f"{recipe['sha256']}, held-out source accuracy "
              f"{recipe['source_test_accuracy']:.4f}")
        return 0
    config = PretrainConfig(arch=args.arch, framework=args.framework, epochs=args.epochs)
    out = args.out or checkpoint_path(config)
    start = time.perf_counter()
    metrics = pretrain(config, out)
    seconds = time.perf_counter() - start
    print(f"pretrained {config.arch} in {config.framework} on the source domain in {seconds:.1f} s: "
          f"held-out accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}")
    print(f"checkpoint: {out}")
    if metrics["accuracy"] < MIN_SOURCE_ACCURACY:
        print(f"warning: accuracy below {MIN_SOURCE_ACCURACY:.2f}; the base did not learn the source task")
        return 1
    return 0
