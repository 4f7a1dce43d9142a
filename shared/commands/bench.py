"""``freeze-parity bench``: time the training paths and strategies, side by side (make bench).

Prints the tables of :func:`shared.bench.render` and, with ``--json``, writes
every figure (medians and raw repeats), the configuration and the machine.
Exit status 0 when it ran (goals met or not: they are reported, not
enforced), 1 when a benchmark worker failed, 2 for bad usage.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from shared.archs import COMPARE_ARCHS, PIPELINE_ARCHS
from shared.bench import (
    DEFAULT_REPEATS,
    DEFAULT_STEPS,
    FRAMEWORK_ORDER,
    LONG_FACTOR,
    BenchConfig,
    BenchError,
    measure,
    render,
)
from shared.errors import UsageError
from shared.io import atomic_write_json, check_output_file
from shared.pretrain import PretrainConfig

__all__ = ["QUICK", "add_parser", "bench_pairing", "bench_port", "bench_port_family", "run"]

# --port: `freeze-parity port` on ResNet-18 (torchvision vs the Keras rebuild), every
# tensor training (the most work per step), lr 0.001 so float32 rounding stays in tolerance.
PORT_BENCH = {"arch": "resnet18", "strategy": "full", "size": 64, "steps": 5,
              "learning_rate": 0.001}
PORT_GOAL_S = 20.0
# --port also times the check on each family keras.applications and torchvision share
# (shared/port/families.py: 64x64, one step; ResNet50's is the figure README states) and
# the pairing alone (describing both models, pairing by dataflow) on the deepest graph.
PAIRING_BENCH_FAMILY = "DenseNet121"

# --quick: a smoke test of the whole machinery in seconds; its figures mean nothing.
QUICK = {"repeats": 1, "steps": 2, "long_factor": 2, "warmup": 0, "threads": 1}


def add_parser(parser) -> None:
    parser.add_argument("--arch", choices=COMPARE_ARCHS, default="tinyconv",
                        help="default tinyconv; vit: --verdicts only (what compare --arch vit "
                             "costs per strategy)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed repeats per figure, medians reported (default {DEFAULT_REPEATS})")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"N: train.run and the bare loops are timed at N and {LONG_FACTOR}N steps "
                             "(default: " + ", ".join(f"{a} {s}" for a, s in DEFAULT_STEPS.items())
                             + ")")
    parser.add_argument("--pretrain-epochs", type=int, default=1,
                        help="epochs of the timed pretraining (default 1; the cached "
                             f"checkpoint uses {PretrainConfig.epochs})")
    parser.add_argument("--framework", choices=FRAMEWORK_ORDER, action="append", default=None,
                        help="measure only this framework (repeatable; default: both)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="canonical pretrained checkpoint (default: the cached one)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra- and inter-op threads in both frameworks (default: each "
                             "framework's own; --quick 1)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory processes")
    parser.add_argument("--no-pretrain", action="store_true", help="skip timing pretraining")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1 repeat, N=2 and 4 steps, no warm-up, 1 thread, idle memory only, frameworks "
                             "and memory processes concurrently; figures meaningless")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here (JSON)")
    parser.add_argument("--replicas", type=int, default=1,
                        help="instead: per-step time of a data-parallel run with this many "
                             "replicas vs one process, per framework (frozen, tinyconv)")
    parser.add_argument("--verdicts", action="store_true",
                        help="instead: what each verdict of compare costs per strategy and "
                             "framework (lockstep, envelope rerun, float64 run), and the demo's "
                             "whole matrix against its free runs alone, side by side")
    parser.add_argument("--port", action="store_true",
                        help=f"time only the port check: the project's ResNet-18 pair "
                             f"({PORT_BENCH['strategy']} strategy, {PORT_BENCH['size']}x"
                             f"{PORT_BENCH['size']}, {PORT_BENCH['steps']} steps; goal <= "
                             f"{PORT_GOAL_S:g} s after imports), each keras.applications / "
                             f"torchvision family, and the pairing alone on "
                             f"{PAIRING_BENCH_FAMILY}")


def config_from_args(args) -> BenchConfig:
    settings = dict(QUICK) if args.quick else {}
    for name in ("repeats", "steps", "threads"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file")
    config = BenchConfig(arch=args.arch, pretrain_epochs=args.pretrain_epochs,
                         pretrain=not args.no_pretrain, memory=not args.no_memory,
                         frameworks=tuple(args.framework or FRAMEWORK_ORDER),
                         checkpoint=str(args.checkpoint) if args.checkpoint else None,
                         quick=args.quick, **settings)
    if args.quick:
        config = replace(config, memory_only=("idle",))
    return config


def _run_replicas(args) -> int:
    from shared import distributed

    if args.replicas < 2:
        raise UsageError(f"--replicas must be >= 2, got {args.replicas}")
    from shared.shipped import default_checkpoint

    checkpoint = default_checkpoint(args.arch, str(args.checkpoint) if args.checkpoint else None)
    repeats = args.repeats or 3
    rows = []
    for fw in args.framework or FRAMEWORK_ORDER:
        print(f"bench: {fw}, one process vs {args.replicas} replicas ...", file=sys.stderr, flush=True)
        try:
            rows.append(distributed.bench_replicas(fw, checkpoint, replicas=args.replicas,
                                                   repeats=repeats))
        except distributed.DistributedError as exc:
            print(" ".join(str(exc).split()), file=sys.stderr)
            return 1
    if args.json:
        atomic_write_json(args.json, {"replicas": rows})
    print(f"frozen tinyconv, global batch 32, marginal per step (10 -> 90 steps), median of "
          f"{repeats}:")
    for row in rows:
        print(f"  {row['framework']:<5} 1 process {1000 * row['single_step_s']:7.2f} ms   "
              f"{row['replicas']} replicas {1000 * row['replicas_step_s']:7.2f} ms   "
              f"ratio {row['ratio']:.2f}x")
    return 0


def bench_port(settings: dict = PORT_BENCH) -> dict:
    """Seconds to build the pair and to run the whole port check on it, and its verdict."""
    from shared import frameworks

    tf_model, tf_train, tf_freeze = (frameworks.load("tf", m) for m in ("model", "train", "freeze"))
    torch_model, torch_freeze = (frameworks.load("torch", m) for m in ("model", "freeze"))
    from shared.port import check_port

    arch, strategy = settings["arch"], settings["strategy"]
    start = time.perf_counter()
    keras_net = tf_freeze.apply_strategy(tf_model.build_model(
        arch, 5, norm_layer=tf_train.norm_layer_for(arch, strategy)), strategy)
    torch_net = torch_freeze.apply_strategy(torch_model.build_model(arch, 5), strategy)
    built, cpu = time.perf_counter(), time.process_time()
    report = check_port(keras_net, torch_net, input_shape=(settings["size"], settings["size"], 3),
                        steps=settings["steps"], learning_rate=settings["learning_rate"],
                        transfer_from="torch")
    done, cpu_done = time.perf_counter(), time.process_time()
    return {"settings": dict(settings), "build_s": built - start, "check_s": done - built,
            "check_cpu_s": cpu_done - cpu,
            "goal_s": PORT_GOAL_S, "met": done - built <= PORT_GOAL_S, "pairs": len(report.pairs),
            "ok": report.ok, "findings": report.codes(), "loadavg": list(os.getloadavg())}


def _family_pair(family: str, size: int):
    from shared import frameworks

    torch_net = frameworks.load("torch", "applications").build(family, size)
    return frameworks.load("tf", "applications").build(family, size), torch_net


def bench_port_family(family: str, size: int | None = None, steps: int | None = None) -> dict:
    """Seconds of the whole port check (torch weights transferred) on one family's pair."""
    from shared.port import check_port
    from shared.port.families import SIZE, STEPS

    size, steps = size or SIZE, STEPS if steps is None else steps
    start = time.perf_counter()
    keras_net, torch_net = _family_pair(family, size)
    built, cpu = time.perf_counter(), time.process_time()
    report = check_port(keras_net, torch_net, input_shape=(size, size, 3), steps=steps,
                        transfer_from="torch")
    done, cpu_done = time.perf_counter(), time.process_time()
    return {"family": family, "size": size, "steps": steps, "build_s": built - start,
            "check_s": done - built, "check_cpu_s": cpu_done - cpu, "pairs": len(report.pairs),
            "findings": report.codes(), "loadavg": list(os.getloadavg())}


def bench_pairing(family: str = PAIRING_BENCH_FAMILY, size: int | None = None) -> dict:
    """Seconds to describe both models of one family on a probe batch and pair them."""
    from shared.port import pair_models
    from shared.port.families import SIZE

    size = size or SIZE
    keras_net, torch_net = _family_pair(family, size)
    start, cpu = time.perf_counter(), time.process_time()
    _, keras_leaves, torch_leaves, pairs = pair_models(keras_net, torch_net,
                                                       input_shape=(size, size, 3))
    return {"family": family, "size": size, "pair_s": time.perf_counter() - start,
            "pair_cpu_s": time.process_time() - cpu, "pairs": len(pairs),
            "records": [len(keras_leaves), len(torch_leaves)], "loadavg": list(os.getloadavg())}


def _run_port(args) -> int:
    from shared.port.families import FAMILIES

    if args.json:
        check_output_file(args.json, "--json")  # before minutes of measuring
    result = bench_port()
    print(f"port check, {result['settings']['arch']} pair ({result['settings']['strategy']}, "
          f"{result['settings']['size']}x{result['settings']['size']}, "
          f"{result['settings']['steps']} steps, {result['pairs']} pairs): "
          f"{result['check_s']:.1f} s wall, {result['check_cpu_s']:.1f} s CPU "
          f"(goal <= {PORT_GOAL_S:g} s wall: "
          f"{'met' if result['met'] else 'NOT met'}); building the pair {result['build_s']:.1f} s; "
          f"verdict {'no finding' if result['ok'] else ', '.join(result['findings'])}; "
          f"load average {result['loadavg'][0]:.1f}", flush=True)
    families = []
    for family in FAMILIES:
        row = bench_port_family(family)
        families.append(row)
        print(f"port check, {family} (keras.applications vs torchvision, {row['size']}x"
              f"{row['size']}, {row['steps']} step{'s' if row['steps'] != 1 else ''}, "
              f"{row['pairs']} pairs): {row['check_s']:.1f} s wall, {row['check_cpu_s']:.1f} s "
              f"CPU; building the pair {row['build_s']:.1f} s; {len(row['findings'])} findings; "
              f"load average {row['loadavg'][0]:.1f}", flush=True)
    pairing = bench_pairing()
    print(f"pairing alone, {pairing['family']} ({pairing['size']}x{pairing['size']}, "
          f"{pairing['records'][0]} keras and {pairing['records'][1]} torch records, "
          f"{pairing['pairs']} pairs): {pairing['pair_s']:.2f} s wall, "
          f"{pairing['pair_cpu_s']:.2f} s CPU; load average {pairing['loadavg'][0]:.1f}")
    if args.json:
        atomic_write_json(args.json, {**result, "families": families, "pairing": pairing})
    return 0


def run(args) -> int:
    from rich.console import Console

    if args.arch not in PIPELINE_ARCHS and not args.verdicts:
        raise UsageError(f"--arch {args.arch}: only --verdicts takes it (the other benches "
                         f"measure {', '.join(PIPELINE_ARCHS)})")
    if args.replicas != 1:
        return _run_replicas(args)
    if args.verdicts:
        from shared.verdict_bench import measure_verdicts, render_verdicts

        if args.json:
            check_output_file(args.json, "--json")  # before minutes of measuring
        result = measure_verdicts(str(args.checkpoint) if args.checkpoint else None,
                                  repeats=args.repeats or 3, arch=args.arch)
        if args.json:
            atomic_write_json(args.json, result)
        print("\n".join(render_verdicts(result)))
        return 0
    if args.port:
        return _run_port(args)
    config = config_from_args(args)
    if args.json:
        check_output_file(args.json, "--json")  # before minutes of measuring
    err = Console(stderr=True)
    start = time.monotonic()

    def progress(message: str) -> None:
        err.print(f"[dim]bench {time.monotonic() - start:6.1f} s: {message}[/]")

    try:
        result = measure(config, progress=progress)
    except BenchError as exc:
        print(" ".join(str(exc).split()), file=sys.stderr)
        return 1
    if args.json:
        atomic_write_json(args.json, result)
    out = Console(width=None if sys.stdout.isatty() else 120)  # no 80-column wrap in a pipe
    for renderable in render(result):
        out.print(renderable)
    if args.json:
        out.print(f"JSON: {args.json}")
    return 0
