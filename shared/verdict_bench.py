"""``freeze-parity bench --verdicts``: what each verdict of ``compare`` costs, per strategy and
framework, and the whole demo against the runs alone, measured side by side.

Per strategy (tinyconv, the demo's 100 SGD steps), each a median over repeats, in one
process that holds both frameworks (as ``compare`` does):

* the free runs: torch's ``train.run``, Keras's ``fit`` (model built and traced included);
* lockstep, on top of torch's run: Keras taking every step from torch's state (loading it,
  the step, reading it back), the comparison of every tensor, the float64 decisions;
* one envelope rerun (torch) and the float64 run (torch): the worker process's jobs.

Then the demo itself: ``compare``'s matrix with its worker process, against the free runs
alone (what ``compare`` ran before it had lockstep, an envelope and a float64 run), timed
alternately, plus the import of both frameworks in a fresh interpreter, which both pay.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
import time

from shared import frameworks
from shared.matrix import exact_config, run_matrix
from shared.record import RunConfig
from shared.strategies import STRATEGIES

__all__ = ["DEMO_GOAL_RATIO", "measure_verdicts", "render_verdicts"]

DEMO_GOAL_RATIO = 1.3  # issue 18: make demo no more than 1.3x its time before lockstep


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
    return row


def measure_verdicts(checkpoint: str | None = None, repeats: int = 3,
                     strategies: tuple[str, ...] = tuple(STRATEGIES)) -> dict:
    """Every figure's repeats and medians (seconds), and the machine's load."""
    configs = {name: RunConfig(strategy=name, checkpoint=checkpoint) for name in strategies}
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
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
               for name, runs in rows.items()}
    demo_median = {k: statistics.median(v) for k, v in demo.items()}
    imports = demo_median["imports_s"]
    ratio = (imports + demo_median["matrix_s"]) / (imports + demo_median["runs_s"])
    return {"strategies": medians, "repeats": rows, "demo": demo_median, "demo_repeats": demo,
            "demo_ratio": ratio, "goal_ratio": DEMO_GOAL_RATIO, "met": ratio <= DEMO_GOAL_RATIO,
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
    lines = [(f"verdict costs, tinyconv, 100 SGD steps, median of "
              f"{len(result['demo_repeats']['runs_s'])} (seconds; {result['cpu']}, "
              f"{result['cores']} cores, load average {result['load_before'][0]:.1f} before, "
              f"{result['load_after'][0]:.1f} after)"),
             (f"{'strategy':<20}{'torch run':>10}{'tf run':>9}{'lockstep':>10}{'tf steps':>10}"
              f"{'compare':>9}{'float64?':>9}{'rerun':>8}{'float64':>9}")]
    for name, row in result["strategies"].items():
        extra = row["lockstep_s"] - row["torch_run_s"]
        lines.append(f"{name:<20}{row['torch_run_s']:>10.2f}{row['tf_run_s']:>9.2f}{extra:>10.2f}"
                     f"{row['lockstep_tf_s']:>10.2f}{row['lockstep_compare_s']:>9.2f}"
                     f"{row['lockstep_float64_s']:>9.2f}{row['rerun_s']:>8.2f}"
                     f"{row['float64_s']:>9.2f}")
    demo = result["demo"]
    lines += [("lockstep: its cost over torch's run alone, of which tf steps (load, step, read "
               "back), compare (every tensor), float64? (decisions outside the float32 bound)"),
              (f"demo: imports {demo['imports_s']:.1f} s; the free runs alone "
               f"{demo['runs_s']:.1f} s; compare's matrix (lockstep, free runs, envelope, "
               f"float64; worker processes: {result['workers']}) {demo['matrix_s']:.1f} s; "
               f"ratio with imports {result['demo_ratio']:.2f}x (goal <= "
               f"{result['goal_ratio']:g}x: {'met' if result['met'] else 'NOT met'})")]
    return lines
