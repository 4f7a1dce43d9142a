"""``freeze-parity bench --verdicts``: what each verdict of ``compare`` costs, per strategy and
framework, and the whole demo against the runs alone, measured side by side.

Per strategy (tinyconv, the demo's 100 SGD steps; ``--arch`` another arch at its
defaults), each a median over repeats, in one process that holds both frameworks (as
``compare`` does):

* the free runs: torch's ``train.run``, Keras's ``fit`` (model built and traced included);
* lockstep, on top of torch's run: Keras taking every step from torch's state (loading it,
  the step, reading it back), the comparison of every tensor, the float64 decisions;
* one envelope rerun (torch) and the float64 run (torch): the worker process's jobs;
* vit: those of the runs with the base's dropout at 0 (``verdict_run_config``), and each
  framework's run with it on (the "gap, dropout on" columns).

Then the demo itself: ``compare``'s matrix with its worker process, against the free runs
alone (what ``compare`` ran before it had lockstep, an envelope and a float64 run), timed
alternately, plus the import of both frameworks in a fresh interpreter, which both pay.

And ``make demo`` side by side with the demo as it was before these verdicts
(:data:`DEMO_BASELINE`, the commit before lockstep, envelope and float64 runs): each
checkout's ``freeze-parity compare`` in a fresh process, whole wall time, alternately,
in the same environment. The old checkout comes from this repository's history (``git
archive`` into a temporary directory); without git or that commit, it is left out.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from shared import frameworks
from shared.matrix import exact_config, run_matrix, verdict_run_config
from shared.record import RunConfig
from shared.strategies import strategies_for

__all__ = ["DEMO_BASELINE", "DEMO_GOAL_RATIO", "measure_demo", "measure_verdicts",
           "render_verdicts"]

DEMO_GOAL_RATIO = 1.3  # issue 18: make demo no more than 1.3x its time before lockstep
# the last commit before compare had lockstep, the envelope and float64 runs: its compare
# ran the two free runs per strategy and judged them with tolerances fitted to one CPU
DEMO_BASELINE = "dfa3828"
_ROOT = Path(__file__).resolve().parent.parent


def _demo_seconds(tree: Path) -> tuple[float, int]:
    """Wall seconds and exit status of ``tree``'s ``freeze-parity compare`` (the demo), in a
    fresh interpreter that imports ``tree``'s packages (its directory first on the path)."""
    with tempfile.TemporaryDirectory(prefix="freeze-parity-demo-") as out:
        code = ("import sys; from shared.cli import main; "
                f"sys.exit(main(['compare', '--quiet', '--out', {out!r}]))")
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True,
                              text=True, check=False)
        return time.perf_counter() - start, done.returncode


def _checkout(commit: str, into: Path) -> Path | None:
    """``commit``'s tree of this repository under ``into``, or None (no git, no commit)."""
    try:
        archive = subprocess.run(["git", "-C", str(_ROOT), "archive", "--format=tar", commit],
                                 capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    tar = into / "baseline.tar"
    tar.write_bytes(archive)
    tree = into / commit
    with tarfile.open(tar) as handle:
        handle.extractall(tree, filter="data")
    return tree


def measure_demo(repeats: int = 2, baseline: str = DEMO_BASELINE) -> dict:
    """``make demo`` now against ``baseline``'s, alternately, ``repeats`` times each:
    medians, every repeat, exit statuses; ``{"baseline": None}`` when git cannot give it."""
    with tempfile.TemporaryDirectory(prefix="freeze-parity-baseline-") as tmp:
        tree = _checkout(baseline, Path(tmp))
        if tree is None:
            return {"baseline": None}
        times: dict[str, list[float]] = {"baseline_s": [], "now_s": []}
        status: dict[str, list[int]] = {"baseline": [], "now": []}
        for _ in range(repeats):
            for name, where in (("baseline", tree), ("now", _ROOT)):
                seconds, code = _demo_seconds(where)
                times[f"{name}_s"].append(seconds)
                status[name].append(code)
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians["now_s"] / medians["baseline_s"]
    return {"baseline": baseline, "repeats": times, "status": status, **medians,
            "ratio": ratio, "met": ratio <= DEMO_GOAL_RATIO}


def _seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _imports() -> float:
    """Seconds a fresh interpreter takes to import both frameworks (torch first)."""
    code = "import time; t = time.perf_counter(); import torch_impl, tf_impl; " \
           "print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "FREEZE_PARITY_WORKERS": "0"})
    return float(out.stdout.strip().splitlines()[-1])


def _strategy(config: RunConfig) -> dict:
    from shared.lockstep import lockstep

    tf, torch = (frameworks.load(fw, "train") for fw in ("tf", "torch"))
    users = config
    config = verdict_run_config(config)  # vit: the verdicts' runs, dropout at 0
    row = {"torch_run_s": _seconds(lambda: torch.run(config))}
    follower = {}
    row["tf_run_s"] = _seconds(lambda: follower.setdefault(
        "stepper", tf.Stepper(config)) and tf.run(config, stepper=follower["stepper"]))
    timings: dict = {}
    total = _seconds(lambda: lockstep(config, follower["stepper"], timings))
    row["lockstep_tf_s"] = timings["follower_s"]
    row["lockstep_compare_s"] = timings["compare_s"]
    row["lockstep_float64_s"] = timings["float64_s"]
    row["lockstep_s"] = total  # torch's run with the observer, everything above included
    row["rerun_s"] = _seconds(lambda: torch.run(dataclasses.replace(config, rounding_seed=1)))
    row["float64_s"] = _seconds(lambda: torch.run(exact_config(config)))
    if users != config:
        row["tf_dropout_run_s"] = _seconds(lambda: tf.run(users))
        row["torch_dropout_run_s"] = _seconds(lambda: torch.run(users))
    return row


def measure_verdicts(checkpoint: str | None = None, repeats: int = 3,
                     strategies: tuple[str, ...] | None = None,
                     demo_repeats: int = 2, arch: str = "tinyconv") -> dict:
    """Every figure's repeats and medians (seconds), the demo side by side with
    :data:`DEMO_BASELINE`'s (``demo_repeats`` each; 0: not measured; tinyconv only: the
    demo is tinyconv's), and the machine's load. ``strategies`` None: every one ``arch``
    runs."""
    strategies = tuple(strategies_for(arch)) if strategies is None else tuple(strategies)
    configs = {name: RunConfig(arch=arch, strategy=name, checkpoint=checkpoint)
               for name in strategies}
    first = next(iter(configs.values()))
    load_before = list(os.getloadavg())
    rows: dict[str, list[dict]] = {name: [] for name in strategies}
    demo: dict[str, list[float]] = {"matrix_s": [], "runs_s": [], "imports_s": []}
    tf, torch = (frameworks.load(fw, "train") for fw in ("tf", "torch"))
    for name, config in configs.items():  # warm-up: first traces, lazy imports
        tf.run(dataclasses.replace(config, steps=2))
        torch.run(dataclasses.replace(config, steps=2))
    for _ in range(repeats):
        for name, config in configs.items():
            rows[name].append(_strategy(config))
        demo["runs_s"].append(_seconds(lambda: [fw.run(c) for c in configs.values()
                                                 for fw in (tf, torch)]))
        demo["matrix_s"].append(_seconds(lambda: run_matrix(configs)))
        demo["imports_s"].append(_imports())
    side_by_side = (measure_demo(demo_repeats) if demo_repeats and arch == "tinyconv"
                    else {"baseline": None})
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
               for name, runs in rows.items()}
    demo_median = {k: statistics.median(v) for k, v in demo.items()}
    imports = demo_median["imports_s"]
    ratio = (imports + demo_median["matrix_s"]) / (imports + demo_median["runs_s"])
    return {"arch": arch, "steps": first.steps, "optimizer": first.optimizer,
            "strategies": medians, "repeats": rows, "demo": demo_median, "demo_repeats": demo,
            "demo_ratio": ratio, "goal_ratio": DEMO_GOAL_RATIO, "met": ratio <= DEMO_GOAL_RATIO,
            "side_by_side": side_by_side,
            "workers": os.environ.get("FREEZE_PARITY_WORKERS", "default"),
            "load_before": load_before, "load_after": list(os.getloadavg()),
            "cpu": _cpu(), "cores": os.cpu_count()}


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def render_verdicts(result: dict) -> list[str]:
    arch = result.get("arch", "tinyconv")
    dropout = any("tf_dropout_run_s" in row for row in result["strategies"].values())
    lines = [(f"verdict costs, {arch}, {result.get('steps', 100)} "
              f"{result.get('optimizer', 'sgd').upper()} steps, median of "
              f"{len(result['demo_repeats']['runs_s'])} (seconds; {result['cpu']}, "
              f"{result['cores']} cores, load average {result['load_before'][0]:.1f} before, "
              f"{result['load_after'][0]:.1f} after)"),
             (f"{'strategy':<20}{'torch run':>10}{'tf run':>9}{'lockstep':>10}{'tf steps':>10}"
              f"{'compare':>9}{'float64?':>9}{'rerun':>8}{'float64':>9}"
              + (f"{'tf drop.':>10}{'torch drop.':>12}" if dropout else ""))]
    for name, row in result["strategies"].items():
        extra = row["lockstep_s"] - row["torch_run_s"]
        lines.append(f"{name:<20}{row['torch_run_s']:>10.2f}{row['tf_run_s']:>9.2f}{extra:>10.2f}"
                     f"{row['lockstep_tf_s']:>10.2f}{row['lockstep_compare_s']:>9.2f}"
                     f"{row['lockstep_float64_s']:>9.2f}{row['rerun_s']:>8.2f}"
                     f"{row['float64_s']:>9.2f}"
                     + (f"{row['tf_dropout_run_s']:>10.2f}{row['torch_dropout_run_s']:>12.2f}"
                        if dropout else ""))
    if dropout:
        lines.append("vit: every verdict column is of the runs with the base's dropout and "
                     "drop-path at 0; tf drop., torch drop.: each framework's run with them on")
    demo = result["demo"]
    lines += [("lockstep: its cost over torch's run alone, of which tf steps (load, step, read "
               "back), compare (every tensor), float64? (decisions outside the float32 bound)"),
              (f"{'demo' if arch == 'tinyconv' else f'compare --arch {arch}'}: imports "
               f"{demo['imports_s']:.1f} s; the free runs alone {demo['runs_s']:.1f} s; "
               f"compare's matrix (lockstep, free runs, envelope, float64; worker processes: "
               f"{result['workers']}) {demo['matrix_s']:.1f} s; ratio with imports "
               f"{result['demo_ratio']:.2f}x " + (
                   f"(goal <= {result['goal_ratio']:g}x: {'met' if result['met'] else 'NOT met'})"
                   if arch == "tinyconv" else "(no goal: its own command, not the demo)"))]
    side = result.get("side_by_side", {})
    if side.get("baseline"):
        lines.append(f"make demo side by side ({len(side['repeats']['now_s'])} alternate runs "
                     f"each, whole process): before the verdicts (commit {side['baseline']}) "
                     f"{side['baseline_s']:.1f} s, now {side['now_s']:.1f} s: "
                     f"{side['ratio']:.2f}x (goal <= {result['goal_ratio']:g}x: "
                     f"{'met' if side['met'] else 'NOT met'}; exit statuses "
                     f"{side['status']['baseline']} and {side['status']['now']})")
    elif arch == "tinyconv":
        lines.append(f"make demo side by side: not measured (no git history with commit "
                     f"{DEMO_BASELINE} here)")
    return lines
