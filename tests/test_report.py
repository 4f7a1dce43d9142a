"""shared.report: the compare table, its three renderings, the figure and the atomic write.

Framework-free: the records are made by hand, each satisfying (or, on purpose,
breaking) its strategy's declared expectations, so every verdict path is
exercised in milliseconds.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import pytest
from PIL import Image
from rich.console import Console
from table_cells import parse_table

from shared import report as rep
from shared import tolerances as tol
from shared.compare import expectation_failures
from shared.envelope import Envelope, FreeRun
from shared.errors import UsageError
from shared.lockstep import LockstepEvent, LockstepRecord
from shared.matrix import StrategyResult
from shared.record import HeldOut, RunConfig, RunRecord, StepRecord
from shared.strategies import STRATEGIES

STEPS = 5
# a BN-mode-like train/eval gap and a cross-framework offset, both far above TRAP_MIN_GAP
GAP = 1000 * tol.TRAP_MIN_GAP
OFFSET = 300 * tol.TRAP_MIN_GAP
# numbers the table shows, distinct so that a column reading another's is seen
LOSS_ONE_STEP, FREE_DIFF, SPREAD, DEPART_TF, DEPART_TORCH = 1.5e-7, 2.5e-7, 3.5e-7, 4.5e-7, 5.5e-7


def _record(framework: str, strategy: str, *, offset: float = 0.0, **overrides) -> RunRecord:
    """A record that shows exactly what ``strategy`` declares for ``framework``."""
    expected = STRATEGIES[strategy].expectation(framework)
    train = [2.0 - 0.1 * i + offset for i in range(STEPS)]
    gap = 0.0 if expected.train_eval_match else GAP
    config = RunConfig(strategy=strategy, steps=STEPS).__dict__
    flags = {"frozen_unchanged": expected.frozen_unchanged,
             "bn_stats_changed": expected.bn_stats_changed, **overrides}
    return RunRecord(
        framework=framework, strategy=strategy, arch="tinyconv", config=dict(config),
        steps=[StepRecord(i, t, t + gap) for i, t in enumerate(train)],
        heldout=[HeldOut(0, 2.1 + offset, 0.2), HeldOut(STEPS, 1.9 + offset, 0.4)],
        frozen_unchanged=flags["frozen_unchanged"], bn_stats_changed=flags["bn_stats_changed"],
        frozen_changes={} if flags["frozen_unchanged"] else {"base.block1.bn.running_mean": 0.2},
        bn_stats_max_change=0.2 if flags["bn_stats_changed"] else 0.0,
    )


def _result(strategy: str, *, lockstep_failure: str = "", free_failure: str = "",
            finding: str = "", numerics_event: str = "", **torch_overrides) -> StrategyResult:
    """A StrategyResult whose verdicts are set here by hand (the judging functions are
    tested in test_lockstep.py and test_envelope.py)."""
    differ = strategy == "naive"  # naive: each framework's own mistake
    tf_record = _record("tf", strategy)
    torch_record = _record("torch", strategy, offset=OFFSET if differ else 0.0, **torch_overrides)
    lock = LockstepRecord(strategy, "tinyconv", "float32", STEPS, "LOCKSTEP", not differ,
                          max_loss_diff=LOSS_ONE_STEP, max_ratio=0.1)
    if numerics_event:
        lock.events.append(LockstepEvent(1, "tensor head.fc.weight: ...", 5.0, 0.01, False,
                                         5.0, 0.2, numerics_event))
    if lockstep_failure:
        lock.failures.append(lockstep_failure)
    free = FreeRun(strategy, not differ, tol.ENVELOPE_MULTIPLE,
                   max_diff=OFFSET if differ else FREE_DIFF, envelope=SPREAD,
                   tf_departure=None if differ else DEPART_TF,
                   torch_departure=None if differ else DEPART_TORCH,
                   departs="tf" if finding else "", finding=finding)
    if free_failure:
        free.failures.append(free_failure)
    envelope = Envelope("torch", [1, 2], {"train_loss": [SPREAD] * STEPS,
                                          "eval_loss": [SPREAD] * STEPS,
                                          "heldout_loss": [SPREAD] * 2}, [0.4, 0.4, 0.4])
    exact = None if differ else dataclasses.replace(torch_record, config={
        **torch_record.config, "dtype": "float64"})
    expectations = {r.framework: expectation_failures(r) for r in (tf_record, torch_record)}
    return StrategyResult(strategy, "float32", tf_record, torch_record, lock, free, envelope,
                          exact, expectations)


def _report(results) -> rep.Report:
    return rep.build_report(results, {"arch": "tinyconv", "optimizer": "sgd",
                                      "learning_rate": 0.01, "steps": STEPS, "batch_size": 32})


@pytest.fixture(scope="module")
def all_ok() -> rep.Report:
    return _report([_result(name) for name in STRATEGIES])


def test_report_all_ok_verdicts(all_ok):
    verdicts = {row["strategy"]: row["verdict"] for row in all_ok.rows}
    assert all_ok.ok, all_ok.failures
    assert verdicts.pop("naive") == "ok: differs as expected"
    assert set(verdicts.values()) == {"ok"}
    assert all_ok.findings == []


def test_report_rows_hold_last_step_losses_largest_gap_and_the_verdicts_numbers(all_ok):
    result = _result("bn_adapt")
    row = next(r for r in all_ok.rows if r["strategy"] == "bn_adapt")
    assert row["tf_train"] == result.tf.steps[-1].train_loss
    assert row["torch_eval"] == result.torch.steps[-1].eval_loss
    assert row["tf_gap"] == result.tf.max_train_eval_gap
    assert row["torch_acc"] == result.torch.heldout[-1].accuracy
    assert (row["step_max"], row["free_max"], row["envelope"]) == (LOSS_ONE_STEP, FREE_DIFF, SPREAD)
    assert (row["tf_vs_f64"], row["torch_vs_f64"]) == (DEPART_TF, DEPART_TORCH)
    naive = next(r for r in all_ok.rows if r["strategy"] == "naive")
    assert naive["tf_vs_f64"] is None and naive["torch_vs_f64"] is None  # no float64 run: "-"
    cells = dict(zip((c.key for c in rep.COLUMNS), all_ok.cells()[rep_index(all_ok, "naive")]))
    assert cells["tf_vs_f64"] == cells["torch_vs_f64"] == "-"


def rep_index(report, strategy: str) -> int:
    return report.strategies.index(strategy)


def _format(value, fmt):
    return "-" if value is None else str(value) if fmt is None else format(value, fmt)


def test_report_json_rows_equal_table_cells(all_ok):
    data = json.loads(rep.render_json(all_ok))
    columns = data["table"]["columns"]
    formatted = [[_format(row[c["key"]], c["format"]) for c in columns]
                 for row in data["table"]["rows"]]
    assert formatted == all_ok.cells()
    assert [c["title"] for c in columns] == [c.title for c in rep.COLUMNS]
    run = data["runs"]["frozen"]["torch"]
    assert len(run["train_loss"]) == len(run["eval_loss"]) == STEPS
    assert data["runs"]["frozen"]["envelope"]["seeds"] == [1, 2]
    assert data["runs"]["frozen"]["lockstep"]["ok"] and data["runs"]["frozen"]["free_run"]["ok"]
    assert data["runs"]["naive"]["float64"] is None


def test_report_printed_table_equals_cells(all_ok):
    table = rep.render_table(all_ok)
    console = Console(width=200, record=True, file=io.StringIO())
    console = Console(width=rep.table_width(table, console), record=True, file=io.StringIO())
    console.print(table)
    assert parse_table(console.export_text()) == all_ok.cells()


def test_report_markdown_table_equals_cells(all_ok):
    text = rep.render_markdown(all_ok)
    rows = [[c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")]
            for line in text.splitlines() if line.startswith("| ") and
            line[2:].split(" ")[0] in STRATEGIES]
    assert rows == all_ok.cells()
    assert "](figure.png)" in text


def test_report_lockstep_failure_named():
    report = _report([_result("frozen", lockstep_failure="frozen: lockstep step 2: tensor x")])
    assert report.rows[0]["verdict"] == "FAIL: lockstep"
    assert not report.ok and report.failures == ["frozen: lockstep step 2: tensor x"]


def test_report_free_run_failure_named_apart_from_lockstep():
    report = _report([_result("bn_adapt", free_failure="bn_adapt: free run: tf vs torch 0.5")])
    assert report.rows[0]["verdict"] == "FAIL: free run"
    assert report.failures == ["bn_adapt: free run: tf vs torch 0.5"]


def test_report_numerics_finding_is_listed_not_a_failure():
    """One framework's float32 departing from float64 is named in the verdict and the
    findings, and leaves the report ok (the freezing semantics held)."""
    report = _report([_result("partial", finding="partial: free run: ... tf's float32 leaves",
                              numerics_event="torch")])
    assert report.ok and report.failures == []
    assert report.rows[0]["verdict"] == "ok; numerics: tf, torch"
    assert report.findings[0] == "partial: free run: ... tf's float32 leaves"
    assert report.findings[1].startswith("partial: lockstep: at 1 of 5 steps one framework's")
    text = rep.render_markdown(report)
    assert "## Numerics findings (not failures)" in text and "tf's float32 leaves" in text


def test_report_expectation_failure_named():
    report = _report([_result("frozen", bn_stats_changed=True)])
    assert report.rows[0]["verdict"] == "FAIL: torch expectations"
    assert report.failures == ["frozen[torch]: expected bn_stats_changed=False, got True"]


def test_report_naive_agreeing_is_a_failure():
    report = _report([_result("naive", frozen_unchanged=True, bn_stats_changed=False,
                              lockstep_failure="naive: lockstep: expected to differ",
                              free_failure="naive: free run: expected to differ")])
    assert report.rows[0]["verdict"] == ("FAIL: lockstep agrees, expected to differ, free run "
                                         "agrees, expected to differ, torch expectations")
    assert len(report.failures) == 4


def test_report_rejects_swapped_frameworks():
    result = _result("frozen")
    swapped = dataclasses.replace(result, tf=result.torch, torch=result.tf)
    with pytest.raises(ValueError, match=r"expected \(tf, torch\) records"):
        _report([swapped])


def _with_gap(record: RunRecord, gap: float) -> RunRecord:
    """``record`` with every eval loss ``gap`` above its train loss (a dropout-on run)."""
    return dataclasses.replace(record, steps=[StepRecord(s.step, s.train_loss, s.train_loss + gap)
                                              for s in record.steps])


def test_report_dropout_columns_only_with_dropout_runs_and_before_the_verdicts(all_ok):
    """vit: the "gap, dropout on" columns hold each framework's dropout-on run's largest
    gap, placed before "one step"; a report without such runs keeps COLUMNS."""
    assert all_ok.columns == rep.COLUMNS
    assert "tf gap, dropout on" not in render_md(all_ok)
    result = _result("frozen")
    result.dropout = {"tf": _with_gap(result.tf, 0.25), "torch": _with_gap(result.torch, 0.5)}
    report = _report([result])
    titles = [c.title for c in report.columns]
    assert titles.index("torch gap, dropout on") == titles.index("tf gap, dropout on") + 1
    assert titles.index("one step") == titles.index("torch gap, dropout on") + 1
    assert len(titles) == len(rep.COLUMNS) + 2
    row = report.rows[0]
    assert (row["tf_dropout_gap"], row["torch_dropout_gap"]) == pytest.approx((0.25, 0.5))
    assert report.cells()[0][titles.index("tf gap, dropout on")] == "0.25"
    assert [c["key"] for c in report.to_dict()["table"]["columns"]] == [c.key for c in report.columns]
    assert "| tf gap, dropout on | torch gap, dropout on |" in render_md(report)
    assert set(report.runs["frozen"]["dropout_on"]) == {"tf", "torch"}


def test_report_refuses_dropout_runs_for_some_strategies_only():
    with_runs = _result("frozen")
    with_runs.dropout = {"tf": with_runs.tf, "torch": with_runs.torch}
    with pytest.raises(ValueError, match="dropout-on runs or none"):
        _report([with_runs, _result("full")])


def render_md(report: rep.Report) -> str:
    return rep.render_markdown(report, figure=None)


@pytest.mark.parametrize("count", [1, 4, 6])
def test_figure_png_has_one_panel_per_strategy(count):
    names = list(STRATEGIES)[:count]
    png = rep.render_figure(_report([_result(name) for name in names]))
    image = Image.open(io.BytesIO(png))
    rows, cols, width, height = rep.figure_size(count)
    assert image.format == "PNG"
    assert image.size == (width, height)
    assert image.info["panels"] == str(count)
    assert image.info["grid"] == f"{rows}x{cols}"
    assert image.info["size"] == f"{width}x{height}"
    assert image.info["strategies"].split(",") == names


def test_write_reports_writes_three_files_and_no_temp_files(tmp_path, all_ok):
    out = tmp_path / "latest"
    paths = rep.write_reports(all_ok, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(rep.REPORT_FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]  # no temporary directory left
    assert json.loads(paths["report.json"].read_text()) == json.loads(rep.render_json(all_ok))
    assert Image.open(paths["figure.png"]).info["panels"] == str(len(STRATEGIES))
    assert oct(paths["report.md"].stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _contents(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_write_reports_failure_leaves_previous_reports_untouched(tmp_path, all_ok, monkeypatch):
    out = tmp_path / "latest"
    rep.write_reports(all_ok, out)
    before = _contents(out)

    def broken(report, dpi=100):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(rep, "render_figure", broken)
    with pytest.raises(RuntimeError, match="figure failed"):
        rep.write_reports(_report([_result("frozen")]), out)
    assert _contents(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_write_reports_failure_while_writing_a_file_writes_nothing(tmp_path, all_ok, monkeypatch):
    real_open = open
    opened = []

    def failing_third(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).endswith(rep.REPORT_FILES):
            opened.append(path)
            if len(opened) == len(rep.REPORT_FILES):
                raise OSError("disk full")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_third)
    with pytest.raises(OSError, match="disk full"):
        rep.write_reports(all_ok, tmp_path / "latest")
    assert len(opened) == len(rep.REPORT_FILES)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failing_call", [1, 2])
def test_write_reports_failure_between_file_renames_keeps_old_set(tmp_path, all_ok, monkeypatch,
                                                                 failing_call):
    """Whatever rename fails (of a file or a directory), the old set stays whole."""
    out = tmp_path / "latest"
    rep.write_reports(_report([_result("frozen")]), out)
    before = _contents(out)
    calls = []
    real_replace, real_rename = os.replace, os.rename

    def counted(real):
        def call(src, dst, *args, **kwargs):
            calls.append((src, dst))
            if len(calls) == failing_call:
                raise OSError("rename failed")
            return real(src, dst, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "replace", counted(real_replace))
    monkeypatch.setattr(os, "rename", counted(real_rename))
    with pytest.raises(OSError, match="rename failed"):
        rep.write_reports(all_ok, out)
    monkeypatch.undo()
    assert _contents(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_write_reports_refuses_a_directory_with_other_files(tmp_path, all_ok):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"holds 'notes\.txt' besides the reports"):
        rep.write_reports(all_ok, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="exists and is not a directory"):
        rep.write_reports(all_ok, tmp_path / "file")
