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
from shared.errors import UsageError
from shared.record import HeldOut, RunConfig, RunRecord, StepRecord
from shared.strategies import STRATEGIES

STEPS = 5
# a BN-mode-like train/eval gap and a cross-framework offset, both far above TRAP_MIN_GAP
GAP = 1000 * tol.TRAP_MIN_GAP
OFFSET = 300 * tol.TRAP_MIN_GAP


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


def _pair(strategy: str, **torch_overrides) -> tuple[RunRecord, RunRecord]:
    differ = OFFSET if strategy == "naive" else 0.0  # naive: each framework's own mistake
    return _record("tf", strategy), _record("torch", strategy, offset=differ, **torch_overrides)


def _report(pairs) -> rep.Report:
    return rep.build_report(pairs, {"arch": "tinyconv", "optimizer": "sgd", "learning_rate": 0.01,
                                    "steps": STEPS, "batch_size": 32})


@pytest.fixture(scope="module")
def all_ok() -> rep.Report:
    return _report([_pair(name) for name in STRATEGIES])


def test_report_all_ok_verdicts(all_ok):
    verdicts = {row["strategy"]: row["verdict"] for row in all_ok.rows}
    assert all_ok.ok, all_ok.failures
    assert verdicts.pop("naive") == "ok: differs as expected"
    assert set(verdicts.values()) == {"ok"}


def test_report_rows_hold_last_step_losses_and_largest_gap(all_ok):
    tf_record, torch_record = _pair("bn_adapt")
    row = next(r for r in all_ok.rows if r["strategy"] == "bn_adapt")
    assert row["tf_train"] == tf_record.steps[-1].train_loss
    assert row["torch_eval"] == torch_record.steps[-1].eval_loss
    assert row["tf_gap"] == tf_record.max_train_eval_gap
    assert row["torch_acc"] == torch_record.heldout[-1].accuracy
    assert row["tolerance"] == "BATCH_STATS_STEP"


def test_report_json_rows_equal_table_cells(all_ok):
    data = json.loads(rep.render_json(all_ok))
    columns = data["table"]["columns"]
    formatted = [[str(row[c["key"]]) if c["format"] is None else format(row[c["key"]], c["format"])
                  for c in columns] for row in data["table"]["rows"]]
    assert formatted == all_ok.cells()
    assert [c["title"] for c in columns] == [c.title for c in rep.COLUMNS]
    run = data["runs"]["frozen"]["torch"]
    assert len(run["train_loss"]) == len(run["eval_loss"]) == STEPS


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


def test_report_parity_failure_named():
    tf_record, _ = _pair("frozen")
    torch_record = _record("torch", "frozen", offset=OFFSET)
    report = _report([(tf_record, torch_record)])
    assert report.rows[0]["verdict"] == "FAIL: parity"
    assert not report.ok
    assert any(f.startswith("frozen: train_loss tf vs torch differ") for f in report.failures)


def test_report_parity_failure_in_eval_losses_only_named():
    """Records whose training-mode losses agree but whose inference-mode losses differ at
    one step fail parity on eval_loss (compare must read the eval losses themselves)."""
    tf_record, torch_record = _pair("bn_adapt")
    assert _report([(tf_record, torch_record)]).rows[0]["verdict"] == "ok"  # must match
    steps = [StepRecord(s.step, s.train_loss, s.eval_loss + (OFFSET if s.step == 2 else 0.0))
             for s in torch_record.steps]
    shifted = dataclasses.replace(torch_record, steps=steps)
    report = _report([(tf_record, shifted)])
    assert report.rows[0]["verdict"] == "FAIL: parity"  # must differ
    assert len(report.failures) == 1
    assert report.failures[0].startswith(
        f"bn_adapt: eval_loss tf vs torch differ by {OFFSET:.3g} at index 2")


def test_report_expectation_failure_named():
    report = _report([_pair("frozen", bn_stats_changed=True)])
    assert report.rows[0]["verdict"] == "FAIL: torch expectations"
    assert report.failures == ["frozen[torch]: expected bn_stats_changed=False, got True"]


def test_report_naive_agreeing_is_a_failure():
    report = _report([(_record("tf", "naive"),
                       _record("torch", "naive", frozen_unchanged=True, bn_stats_changed=False))])
    assert report.rows[0]["verdict"] == "FAIL: agree, expected to differ, torch expectations"
    assert len(report.failures) == 3


def test_report_rejects_swapped_frameworks():
    tf_record, torch_record = _pair("frozen")
    with pytest.raises(ValueError, match=r"expected \(tf, torch\) records"):
        _report([(torch_record, tf_record)])


@pytest.mark.parametrize("count", [1, 4, 6])
def test_figure_png_has_one_panel_per_strategy(count):
    names = list(STRATEGIES)[:count]
    png = rep.render_figure(_report([_pair(name) for name in names]))
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
        rep.write_reports(_report([_pair("frozen")]), out)
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
    rep.write_reports(_report([_pair("frozen")]), out)
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
