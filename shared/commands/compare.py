"""``freeze-parity compare``: every strategy in both frameworks, as a table, a report and a figure.

Runs each strategy in Keras and PyTorch from the same pretrained checkpoint,
on the same batches (the matrix of :mod:`shared.matrix`: lockstep, both free
runs, the rounding envelope, the float64 run), and prints one row per strategy
(see :mod:`shared.report`). Writes ``report.md``, ``report.json`` and
``figure.png`` (all or none) to ``--out``. Exit status: 0 when every declared
expectation holds, lockstep agrees and every free run stays within its
envelope (numerics findings are printed, not failures), 1 when any fails (each
named below the table), 2 for bad usage or input, checked before anything runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from shared import frameworks
from shared.archs import COMPARE_ARCHS, has_base_dropout
from shared.checkpoint import CheckpointError, load_checkpoint
from shared.errors import UsageError
from shared.io import ensure_writable_dir
from shared.pretrain import PretrainConfig, checkpoint_path, ensure_checkpoint, stack_versions
from shared.record import ARCH_DEFAULTS, OPTIMIZERS, RunConfig
from shared.shipped import default_checkpoint, uses_cache
from shared.strategies import ALL_STRATEGIES, STRATEGIES, check_strategy_arch, strategies_for

__all__ = ["DEFAULT_OUT", "add_parser", "parse_strategies", "pretrained_checkpoint", "run"]

DEFAULT_OUT = Path("reports") / "latest"


def add_parser(parser) -> None:
    parser.add_argument("--arch", choices=COMPARE_ARCHS, default="tinyconv",
                        help="default tinyconv; vit: the verdicts run with its dropout and "
                             "drop-path at 0, and each framework also runs with them on "
                             "(the 'gap, dropout on' columns)")
    parser.add_argument("--strategies", default=None,
                        help=f"comma-separated, in table order (default: every one the arch "
                             f"runs: tinyconv, resnet18 {','.join(strategies_for('tinyconv'))}; "
                             f"vit {','.join(strategies_for('vit'))})")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per run (default: " + ", ".join(
                            f"{a} {d['steps']}" for a, d in ARCH_DEFAULTS.items()) + ")")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="float32 (default: what users run; lockstep, free runs against "
                             "the rounding envelope, each framework against float64) or float64 "
                             "(the exactness proof: lockstep and free runs within FLOAT64_RUN_ATOL)")
    parser.add_argument("--lr", type=float, default=None, help="default: " + "; ".join(
        f"{a} SGD {d['sgd']:g}, Adam {d['adam']:g}" for a, d in ARCH_DEFAULTS.items()))
    parser.add_argument("--checkpoint", default=None,
                        help="canonical pretrained checkpoint; 'cache' = the cache's (pretrained "
                             "here on first use); default: the shipped one (tinyconv, vit) or "
                             "the cache's (resnet18)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"directory for report.md, report.json, figure.png (default {DEFAULT_OUT})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the report JSON instead of the table")
    parser.add_argument("--replicas", type=int, default=1,
                        help="also run every strategy data-parallel with this many replicas "
                             "(torch DDP via torchrun, tf MirroredStrategy) and add a table of "
                             "one process vs replicas (default 1: single process only)")


def parse_strategies(text: str | None, arch: str | None = None) -> list[str]:
    """``"frozen, naive"`` -> ``["frozen", "naive"]``; UsageError naming unknown ones, or
    (``arch`` given) ones that do not run on ``arch``. None: every strategy ``arch`` runs
    (without ``arch``: the catalogue, :data:`~shared.strategies.STRATEGIES`)."""
    known = list(STRATEGIES) if arch is None else list(ALL_STRATEGIES)
    if text is None:
        return list(STRATEGIES) if arch is None else strategies_for(arch)
    names = [name.strip() for name in str(text).split(",") if name.strip()]
    if not names:
        raise UsageError(f"--strategies: no strategy given; expected some of: {', '.join(known)}")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UsageError(f"--strategies: unknown strategy {', '.join(map(repr, unknown))}; "
                         f"expected some of: {', '.join(known)}")
    if arch is not None:
        for name in names:
            try:
                check_strategy_arch(name, arch)
            except ValueError as error:
                raise UsageError(f"--strategies: {error}") from None
    return list(dict.fromkeys(names))  # first occurrence wins, order kept


def _cached_checkpoint_usable(arch: str) -> bool:
    path = checkpoint_path(PretrainConfig(arch=arch))
    try:
        return path.is_file() and load_checkpoint(path)[1].get("arch") == arch
    except CheckpointError:
        return False


def pretrained_checkpoint(arch: str, command: str = "compare", checkpoint=None) -> str:
    """What the runs start from: ``checkpoint`` if given; else the shipped file (tinyconv,
    sha256-checked) or, with ``"cache"`` or for resnet18, the cache's (pretrained first, and
    said so, if absent)."""
    if not uses_cache(arch, checkpoint):
        return default_checkpoint(arch, checkpoint)
    if not _cached_checkpoint_usable(arch):
        print(f"freeze-parity {command}: no pretrained {arch} checkpoint in the cache yet: "
              f"pretraining it on the source domain first (once; "
              f"{checkpoint_path(PretrainConfig(arch=arch))})", file=sys.stderr, flush=True)
    return str(ensure_checkpoint(arch))


def _check_checkpoint(config: RunConfig) -> None:
    """Load ``config.checkpoint`` into a model exactly as a run will; CheckpointError if it can't."""
    from shared.finetune import prepare

    prepared = prepare(config)  # readable, made for this arch, has base tensors
    model_module = frameworks.load("torch", "model")
    weights = frameworks.load("torch", "weights")
    model = model_module.build_model(config.arch, prepared.num_classes)
    weights.import_weights(model, prepared.initial, prepared.checkpoint)  # keys and shapes


def _versions() -> dict[str, str]:
    """The report's framework versions: torch, tensorflow (the -cpu wheel first), keras."""
    stack = stack_versions()
    found = {"torch": stack.get("torch"),
             "tensorflow": stack.get("tensorflow-cpu") or stack.get("tensorflow"),
             "keras": stack.get("keras")}
    return {name: version for name, version in found.items() if version}


def _progress(quiet: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), transient=True,
                    disable=quiet)


def run(args) -> int:
    # --- everything that can be wrong with the input, before anything runs ---------------
    strategies = parse_strategies(args.strategies, args.arch)
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.replicas < 1 or RunConfig.batch_size % args.replicas:
        raise UsageError(f"--replicas must be >= 1 and divide the batch of {RunConfig.batch_size}, "
                         f"got {args.replicas}")
    if args.replicas > 1 and has_base_dropout(args.arch):
        raise UsageError(f"--replicas {args.replicas}: the data-parallel comparison does not take "
                         f"{args.arch} yet (its dropout masks are drawn per replica); run "
                         f"--replicas 1")
    configs = {name: RunConfig(arch=args.arch, strategy=name, steps=args.steps,
                               optimizer=args.optimizer, learning_rate=args.lr, dtype=args.dtype)
               for name in strategies}  # ValueError (exit 2) for a bad --lr
    from shared.report import check_report_dir

    out = ensure_writable_dir(check_report_dir(args.out), "--out directory")
    checkpoint = pretrained_checkpoint(args.arch, "compare", args.checkpoint)
    configs = {name: RunConfig(**{**config.__dict__, "checkpoint": checkpoint})
               for name, config in configs.items()}
    _check_checkpoint(next(iter(configs.values())))

    # --- the matrix ---------------------------------------------------------------------
    from shared.matrix import run_matrix
    from shared.report import build_report, render_json, render_table, table_width, write_reports

    for fw in ("torch", "tf"):  # torch first
        frameworks.load(fw, "train")
    with _progress(args.quiet) as progress:
        # each strategy twice: its Keras free run and lockstep, then (all stepped) its
        # envelope and float64 runs and verdict
        task = progress.add_task("starting", total=2 * len(configs))
        done: list[str] = []

        def note(name: str, what: str) -> None:
            if done and done[-1] != name:
                progress.advance(task)
            done.append(name)
            progress.update(task, description=f"{name}: {what}")

        results = run_matrix(configs, note=note)
        progress.update(task, completed=2 * len(configs), description="done")
    first = next(iter(configs.values()))
    settings = {"arch": first.arch, "optimizer": first.optimizer,
                "learning_rate": first.learning_rate, "momentum": first.momentum,
                "steps": first.steps, "batch_size": first.batch_size, "seed": first.seed,
                "dtype": first.dtype, "checkpoint": checkpoint, "strategies": list(configs),
                "versions": _versions()}
    if has_base_dropout(first.arch):
        settings["verdict_runs"] = ("dropout, attention dropout and drop-path at 0; the "
                                    "'gap, dropout on' columns: each framework's run with them on")
    report = build_report(results, settings)
    if args.replicas > 1:
        from shared import distributed

        if not args.quiet:
            print(f"freeze-parity compare: data-parallel runs, {args.replicas} replicas per "
                  f"framework ...", file=sys.stderr, flush=True)
        replicated = distributed.replica_jobs(list(configs), configs, args.replicas)
        singles = {(r.framework, r.strategy): r for res in results for r in (res.tf, res.torch)}
        from shared.matrix import envelope_of

        # each framework's replicas against its own rounding envelope of the single run
        envelopes = {("torch", res.strategy): res.envelope for res in results
                     if res.envelope is not None}
        for res in results:
            if res.dtype == "float32" and any(fw == "tf" and key.removesuffix(
                    distributed.SYNC_SUFFIX) == res.strategy for fw, key in replicated):
                envelopes["tf", res.strategy] = envelope_of("tf", configs[res.strategy], res.tf)
        report.replicas = distributed.replica_section(singles, replicated, envelopes,
                                                      float64=True)
        report.failures += report.replicas["failures"]
        report.settings["replicas"] = args.replicas
    paths = write_reports(report, out)

    # --- output -------------------------------------------------------------------------
    if args.json:
        sys.stdout.write(render_json(report))
    else:
        from rich.console import Console

        tables = [render_table(report)]
        if report.replicas is not None:
            tables.append(_replica_table(report.replicas))
        console = Console()
        console = Console(width=max(console.width, *(table_width(t, console) for t in tables)))
        for table in tables:
            console.print(table)
        for failure in report.failures:
            print(f"FAILED: {failure}")
        for finding in report.findings:
            print(f"numerics: {finding}")
        print(("every declared expectation holds, lockstep agrees step by step, every free run "
               "stays within its rounding envelope" if report.ok else
               f"{len(report.failures)} failure(s)") + f"; reports: {', '.join(map(str, paths.values()))}")
    return 0 if report.ok else 1



def _replica_table(section: dict):
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from shared.distributed import REPLICA_COLUMNS, replica_cells

    # escaped: a finding's "E[x^2]" is text, not rich markup
    caption = escape("\n".join([section["notes"], *(f"numerics: {line}"
                                                     for line in section.get("numerics", []))]))
    table = Table(title="one process vs data parallel (same global batch)", box=box.SQUARE,
                  title_justify="left", caption=caption, caption_justify="left")
    for _, title, fmt in REPLICA_COLUMNS:
        table.add_column(title, justify="left" if fmt is None else "right", no_wrap=True)
    for row, cells in zip(section["rows"], replica_cells(section)):
        table.add_row(*map(escape, cells),
                      style="bold red" if row["verdict"].startswith("FAIL") else None)
    return table
