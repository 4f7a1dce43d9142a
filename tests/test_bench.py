"""``freeze-parity bench`` runs end to end and writes well-formed JSON.

Benchmarks are not tests: nothing here checks a timing, a ratio or a goal.
The bench runs on smoke-test settings (``--quick``: one repeat, N=2 steps, no
warm-up) from the shipped checkpoint, and the tests check that every
figure it promises is present, that durations and memory are positive numbers,
and that the figures are the arithmetic the module documents.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from shared import bench
from shared.checkpoint import save_checkpoint
from shared.commands import bench as bench_command

ROOT = Path(__file__).resolve().parents[1]
HAS_RESNET = all((ROOT / pkg / "resnet.py").is_file() for pkg in ("tf_impl", "torch_impl"))

STRATEGY_FIGURES = {"run_per_step_s", "loop_per_step_s", "bare_full_per_step_s", "bare_per_step_s",
                    "loop_vs_bare", "run_vs_bare", "record_per_step_s", "heldout_per_step_s",
                    "remainder_per_step_s", "loop_epoch_s", "bare_epoch_s"}
# measured directly (not a difference of two measurements): always > 0
DIRECT_FIGURES = {"run_per_step_s", "bare_full_per_step_s", "record_per_step_s",
                  "heldout_per_step_s", "run_vs_bare"}


def _bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    bench_command.add_parser(parser)
    return bench_command.run(parser.parse_args(argv))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def quick_checkpoint(tinyconv_checkpoint) -> Path:
    """The shipped tinyconv checkpoint (what `make bench` times by default)."""
    return tinyconv_checkpoint


@pytest.fixture(scope="module")
def quick_result(quick_checkpoint, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench-out") / "bench.json"
    assert _bench(["--quick", "--checkpoint", str(quick_checkpoint), "--json", str(out)]) == 0
    return json.loads(out.read_text(encoding="utf-8"))


def test_bench_quick_json_has_machine_and_config(quick_result):
    assert quick_result["version"] == bench.BENCH_VERSION
    machine = quick_result["machine"]
    assert machine["cpu_count"] >= 1 and machine["platform"] and machine["python"]
    assert machine["frameworks"]["torch"]["torch"] and machine["frameworks"]["tf"]["tensorflow"]
    assert machine["frameworks"]["tf"]["keras"]
    config = quick_result["config"]
    assert (config["arch"], config["repeats"], config["quick"]) == ("tinyconv", 1, True)
    assert config["steps_long"] > config["steps_short"]
    assert config["steps_per_epoch"] >= 1


def test_bench_quick_raw_timings_positive_for_every_task(quick_result):
    tasks = quick_result["config"]["timed_tasks"]
    assert "pretrain" in tasks and "heldout" in tasks
    for fw in bench.FRAMEWORK_ORDER:
        raw = quick_result["raw_seconds"][fw]
        assert sorted(raw) == sorted(tasks), fw
        for task, values in raw.items():
            assert len(values) == quick_result["config"]["repeats"], (fw, task)
            assert all(_is_number(v) and v > 0 for v in values), (fw, task, values)


def test_bench_quick_figures_complete_and_finite(quick_result):
    figures = quick_result["figures"]
    for fw in bench.FRAMEWORK_ORDER:
        for strategy in bench.TIMED_STRATEGIES:
            assert set(figures[fw][strategy]) == STRATEGY_FIGURES, (fw, strategy)
            for name, figure in figures[fw][strategy].items():
                median = figure["median"]
                assert median is None or _is_number(median), (fw, strategy, name)
                if name in DIRECT_FIGURES:
                    assert median > 0, (fw, strategy, name, median)
        for name in ("feature_cache_s", "heldout_eval_s", "pretrain_s"):
            assert figures[fw][name]["median"] > 0, (fw, name)
        assert set(figures[fw]["feature_speedup"]) == {"project", "bare"}
    for strategy in bench.TIMED_STRATEGIES:
        assert set(figures["tf_vs_torch"][strategy]) == {"run", "loop", "bare"}
        assert figures["tf_vs_torch"][strategy]["run"]["median"] > 0


def test_bench_quick_memory_positive_from_fresh_processes(quick_result):
    memory = quick_result["memory"]
    assert memory["source"] in ("VmHWM", "ru_maxrss")
    for fw in bench.FRAMEWORK_ORDER:
        peaks = memory["peak_rss_kib"][fw]
        assert peaks, fw
        assert all(isinstance(v, int) and v > 0 for v in peaks.values()), (fw, peaks)


def test_bench_quick_goals_reported_per_framework(quick_result):
    goals = quick_result["goals"]
    assert {(g["goal"], g["framework"]) for g in goals} == {
        (goal, fw) for fw in bench.FRAMEWORK_ORDER
        for goal in ("loop_vs_bare", "run_vs_bare", "feature_speedup")}
    assert all(isinstance(g["met"], bool) for g in goals)


def test_bench_summarise_marginal_and_paired_ratios_exact():
    # N = 2: run 1.0 s at N, 2.0 s at 2N -> loop 0.5 s/step; bare 0.25 s/step -> 2x.
    # Every value is exact in binary floating point, so the figures compare with ==.
    n = 2
    raw = {"heldout": [0.5], "cache": [0.25], "pretrain": [4.0]}
    for strategy, scale in (("frozen", 1.0), ("feature_extraction", 0.25)):
        raw |= {f"run/{strategy}/{n}": [1.0 * scale], f"run/{strategy}/{2 * n}": [2.0 * scale],
                f"bare/{strategy}/{n}": [0.5 * scale], f"bare/{strategy}/{2 * n}": [1.0 * scale],
                f"record/{strategy}/{n}": [0.125 * scale]}
    config = {"steps_short": n, "steps_long": 2 * n, "steps_per_epoch": 4, "eval_every": 8}
    figures = bench.summarise({"torch": raw}, config)["torch"]
    frozen = figures["frozen"]
    assert frozen["loop_per_step_s"]["median"] == 0.5
    assert frozen["bare_per_step_s"]["median"] == 0.25
    assert frozen["loop_vs_bare"]["median"] == 2.0
    assert frozen["run_vs_bare"]["median"] == 2.0
    assert frozen["heldout_per_step_s"]["median"] == 0.0625
    assert frozen["remainder_per_step_s"]["median"] == 0.5 - 0.25 - 0.0625 - 0.0625
    assert frozen["loop_epoch_s"]["median"] == 2.0
    assert figures["feature_speedup"]["project"]["median"] == 4.0


def test_bench_summarise_nonpositive_marginal_gives_no_ratio():
    n = 1
    raw = {"heldout": [0.5], "cache": [0.25]}
    for strategy in bench.TIMED_STRATEGIES:
        # noise made the longer run faster: the marginal is negative, its ratio undefined
        raw |= {f"run/{strategy}/{n}": [2.0], f"run/{strategy}/{2 * n}": [1.0],
                f"bare/{strategy}/{n}": [0.5], f"bare/{strategy}/{2 * n}": [1.0],
                f"record/{strategy}/{n}": [0.125]}
    figures = bench.summarise({"torch": raw}, {"steps_short": n, "steps_long": 2 * n,
                                               "steps_per_epoch": 1, "eval_every": 1})["torch"]
    assert figures["frozen"]["loop_per_step_s"]["median"] == -1.0
    assert figures["frozen"]["loop_vs_bare"] == {"median": None, "repeats": [None]}


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--steps", "0"], ["--threads", "0"]])
def test_bench_rejects_nonpositive_settings(argv):
    parser = argparse.ArgumentParser()
    bench_command.add_parser(parser)
    with pytest.raises(ValueError, match=argv[0].lstrip("-")):
        bench_command.config_from_args(parser.parse_args(argv))


@pytest.mark.skipif(not HAS_RESNET, reason="tf_impl/resnet.py or torch_impl/resnet.py not written yet")
@pytest.mark.parametrize("framework", bench.FRAMEWORK_ORDER)
def test_bench_resnet18_bare_loop_and_probes_run(framework, tmp_path):
    """``--arch resnet18``: the bench's framework code builds, freezes and trains ResNet-18.

    One step each (the whole CLI on ResNet-18 takes minutes; the orchestration
    around these calls does not depend on the architecture).
    """
    from shared.finetune import prepare
    from shared.frameworks import load
    from shared.record import RunConfig
    from torch_impl.model import build_model
    from torch_impl.weights import export_weights

    # Canonical tensors of a fresh model: timings do not depend on pretraining.
    checkpoint = tmp_path / "resnet18-init.safetensors"
    save_checkpoint(checkpoint, export_weights(build_model("resnet18", 5)), {"arch": "resnet18"})
    prepared = prepare(RunConfig(arch="resnet18", steps=1, checkpoint=str(checkpoint)))
    impl = load(framework, "bench")
    assert math.isfinite(impl.bare_train(prepared, "frozen")(1))
    impl.record_probe(prepared, "feature_extraction")(1)


@pytest.mark.parametrize("threads", [None, 2], ids=["default", "threads-2"])
def test_bench_bare_loop_and_project_run_use_the_same_torch_threads(tinyconv_checkpoint,
                                                                    monkeypatch, threads):
    """Like with like: the threads torch computes with inside a timed bare loop and inside a
    timed train.run are the same, by default and with --threads."""
    import torch

    from torch_impl import train as torch_train

    monkeypatch.setattr(torch_train, "RUN_THREADS", torch_train.RUN_THREADS)  # restored after
    seen: dict[str, set[int]] = {}
    task = ["?"]
    real = torch.nn.functional.cross_entropy

    def spy(*args, **kwargs):
        seen.setdefault(task[0], set()).add(torch.get_num_threads())
        return real(*args, **kwargs)

    previous = torch.get_num_threads(), torch.get_num_interop_threads()
    session = bench._Session("torch", {"threads": None, "arch": "tinyconv", "long_steps": 4,
                                       "checkpoint": str(tinyconv_checkpoint),
                                       "pretrain_epochs": 1})
    if threads is not None:  # what the worker does for --threads (interop is fixed once set)
        monkeypatch.setattr(torch, "set_num_interop_threads", lambda n: None)
        session.impl.set_threads(threads)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", spy)
    try:
        for name in ("bare/frozen/2", "run/frozen/2"):
            task[0] = name.split("/")[0]
            session.time(name)
    finally:
        torch.set_num_threads(previous[0])
    assert seen["bare"] == seen["run"] == {threads or 1}, seen
    assert session.impl.info()["run_threads"] == (threads or 1)


def test_verdict_bench_baseline_checkout_is_the_demo_before_the_verdicts(tmp_path):
    """bench --verdicts times make demo against DEMO_BASELINE's: git gives that tree, whose
    compare judged the free runs with fitted tolerances (no lockstep, no envelope)."""
    from shared import verdict_bench

    tree = verdict_bench._checkout(verdict_bench.DEMO_BASELINE, tmp_path)
    assert tree is not None and (tree / "shared" / "cli.py").is_file()
    assert not (tree / "shared" / "lockstep.py").exists()
    assert not (tree / "shared" / "envelope.py").exists()
    assert verdict_bench._checkout("0" * 40, tmp_path / "none") is None


@pytest.mark.parametrize("now_s, verdict", [(60.0, "NOT met"), (52.0, "met")])
def test_verdict_bench_side_by_side_line_states_ratio_and_goal(now_s, verdict):
    from shared import verdict_bench

    side = {"baseline": "abc1234", "repeats": {"now_s": [now_s, now_s]}, "baseline_s": 40.0,
            "now_s": now_s, "ratio": now_s / 40.0, "met": now_s / 40.0 <= 1.3,
            "status": {"baseline": [0, 0], "now": [0, 0]}}
    strategy = dict.fromkeys(("torch_run_s", "tf_run_s", "lockstep_s", "lockstep_tf_s",
                              "lockstep_compare_s", "lockstep_float64_s", "rerun_s",
                              "float64_s"), 1.0)
    result = {"demo_repeats": {"runs_s": [1.0]}, "cpu": "cpu", "cores": 2,
              "load_before": [0.0], "load_after": [0.0], "strategies": {"frozen": strategy},
              "demo": {"imports_s": 1.0, "runs_s": 1.0, "matrix_s": 1.0}, "workers": "default",
              "demo_ratio": 1.0, "goal_ratio": 1.3, "met": True, "side_by_side": side}
    last = verdict_bench.render_verdicts(result)[-1]
    assert f"commit abc1234) 40.0 s, now {now_s:.1f} s: {now_s / 40:.2f}x" in last
    assert f"(goal <= 1.3x: {verdict};" in last


def test_verdict_bench_vit_rows_show_the_dropout_runs_and_no_demo_goal():
    """bench --verdicts --arch vit: the verdict columns and each framework's dropout-on run;
    the matrix line names compare --arch vit, with no demo goal (it is not the demo)."""
    from shared import verdict_bench

    strategy = dict.fromkeys(("torch_run_s", "tf_run_s", "lockstep_s", "lockstep_tf_s",
                              "lockstep_compare_s", "lockstep_float64_s", "rerun_s",
                              "float64_s"), 1.0)
    strategy.update(tf_dropout_run_s=2.5, torch_dropout_run_s=3.25)
    result = {"arch": "vit", "steps": 30, "optimizer": "sgd",
              "demo_repeats": {"runs_s": [1.0]}, "cpu": "cpu", "cores": 2,
              "load_before": [0.0], "load_after": [0.0], "strategies": {"lora": strategy},
              "demo": {"imports_s": 1.0, "runs_s": 1.0, "matrix_s": 1.0}, "workers": "default",
              "demo_ratio": 1.0, "goal_ratio": 1.3, "met": True,
              "side_by_side": {"baseline": None}}
    lines = verdict_bench.render_verdicts(result)
    assert lines[0].startswith("verdict costs, vit, 30 SGD steps, median of 1")
    assert lines[1].endswith("  tf drop. torch drop.")
    assert lines[2].split()[0] == "lora" and lines[2].split()[-2:] == ["2.50", "3.25"]
    assert lines[-1].startswith("compare --arch vit: imports 1.0 s")
    assert lines[-1].endswith("(no goal: its own command, not the demo)")
    assert not any("make demo" in line for line in lines)


def test_bench_vit_only_with_verdicts():
    from cli_inprocess import cli

    proc = cli("bench", "--arch", "vit", "--quick")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr == ("freeze-parity bench: error: --arch vit: only --verdicts takes it "
                           "(the other benches measure tinyconv, resnet18)\n")
