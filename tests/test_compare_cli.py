"""``freeze-parity compare`` end to end, as a user runs it.

Each run goes through ``shared.cli.main`` in this process (tests/cli_inprocess.py:
what the console script runs, with its exit status and its stdout and stderr
captured), so it does not pay for importing the frameworks again; the one real
console-script run is in tests/test_cli.py. The cache (``FREEZE_PARITY_CACHE``,
set for each call only) is an empty directory of the session's temp dir: runs
start from the shipped checkpoint, and nothing is pretrained. Runs are short
(``STEPS`` steps, two strategies) to keep the file fast.

Exit status 1 needs a run whose declared expectations fail. The project's own
catalogue is right, so the test declares a wrong one, honestly and visibly:
the ``wrong_expectation`` fixture replaces ``frozen``'s expectation with
"BatchNorm statistics change" for that test only; the real run then shows
they did not, and compare must say so and exit 1.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from cli_inprocess import Completed, cli
from PIL import Image
from table_cells import parse_table

from shared import report as rep
from shared import strategies
from shared import tolerances as tol
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.shipped import shipped_checkpoint

STEPS = 5
PAIR = ("frozen", "naive")



@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.getbasetemp() / "fp-cache"  # empty: runs use the shipped checkpoint
    path.mkdir(exist_ok=True)
    return path


def _compare(cache: Path, *argv: str) -> Completed:
    return cli("compare", *argv, env={"FREEZE_PARITY_CACHE": str(cache)})


def _formatted(report: dict) -> list[list[str]]:
    columns = report["table"]["columns"]
    return [["-" if row[c["key"]] is None else str(row[c["key"]]) if c["format"] is None
             else format(row[c["key"]], c["format"]) for c in columns]
            for row in report["table"]["rows"]]


def _no_temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") or
                  p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- #
# exit 0: a real run, table, report.json, report.md and figure agree
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def ok_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare-ok") / "reports"
    proc = _compare(cache, "--strategies", ",".join(PAIR), "--steps", str(STEPS), "--out", str(out))
    return proc, out


@pytest.mark.slow
def test_compare_exit_0_when_expectations_and_parity_hold(ok_run):
    proc, _ = ok_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ("every declared expectation holds, lockstep agrees step by step, every free run "
            "stays within its rounding envelope; reports: ") in proc.stdout


@pytest.mark.slow
def test_compare_writes_three_reports_atomically(ok_run):
    _, out = ok_run
    assert sorted(p.name for p in out.iterdir()) == sorted(rep.REPORT_FILES)
    assert _no_temp_files(out) == []


@pytest.mark.slow
def test_compare_report_json_equals_printed_table(ok_run):
    proc, out = ok_run
    report = json.loads((out / "report.json").read_text())
    printed = parse_table(proc.stdout)
    assert [row[0] for row in printed] == list(PAIR)
    assert printed == _formatted(report)
    naive = next(r for r in report["table"]["rows"] if r["strategy"] == "naive")
    assert naive["verdict"] == "ok: differs as expected"


@pytest.mark.slow
def test_compare_report_json_holds_per_step_losses(ok_run):
    _, out = ok_run
    report = json.loads((out / "report.json").read_text())
    for name in PAIR:
        for fw in ("tf", "torch"):
            run = report["runs"][name][fw]
            assert len(run["train_loss"]) == len(run["eval_loss"]) == STEPS
            assert np.isfinite(run["train_loss"]).all()
    rows = {r["strategy"]: r for r in report["table"]["rows"]}
    assert rows["frozen"]["tf_train"] == report["runs"]["frozen"]["tf"]["train_loss"][-1]


@pytest.mark.slow
def test_compare_report_md_holds_the_table(ok_run):
    _, out = ok_run
    text = (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    for cells in _formatted(report):
        assert "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" in text


@pytest.mark.slow
def test_compare_figure_is_png_with_one_panel_per_strategy(ok_run):
    _, out = ok_run
    image = Image.open(out / "figure.png")
    _, _, width, height = rep.figure_size(len(PAIR))
    assert image.format == "PNG"
    assert image.size == (width, height)
    assert image.info["panels"] == str(len(PAIR))
    assert image.info["size"] == f"{width}x{height}"
    assert image.info["strategies"] == ",".join(PAIR)


@pytest.mark.slow
def test_compare_dtype_float64_is_the_exactness_proof(cache, tmp_path):
    """``--dtype float64``: lockstep with the float64 bounds, both free runs within
    FLOAT64_RUN_ATOL, no envelope (and no float64 reference: the runs are float64)."""
    from shared import tolerances

    out = tmp_path / "reports"
    proc = _compare(cache, "--strategies", "bn_adapt", "--steps", "3", "--dtype", "float64",
                    "--out", str(out), "--json", "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    run = report["runs"]["bn_adapt"]
    assert report["settings"]["dtype"] == "float64"
    assert run["lockstep"]["bounds"] == "LOCKSTEP_FLOAT64" and run["lockstep"]["events"] == []
    assert run["envelope"] is None and run["float64"] is None
    assert report["table"]["rows"][0]["free_max"] <= tolerances.FLOAT64_RUN_ATOL
    assert _formatted(report)[0][[c["key"] for c in report["table"]["columns"]].index("envelope")] == "-"


# --------------------------------------------------------------------------- #
# exit 1: a declared expectation fails
# --------------------------------------------------------------------------- #
@pytest.fixture
def wrong_expectation(monkeypatch):
    """Declares a wrong expectation for `frozen` (statistics change), for one test."""
    s = strategies.STRATEGIES["frozen"]
    wrong = {fw: dataclasses.replace(e, bn_stats_changed=True) for fw, e in s.expect.items()}
    monkeypatch.setitem(strategies.STRATEGIES, "frozen", dataclasses.replace(s, expect=wrong))


@pytest.mark.slow
def test_compare_exit_1_names_the_failed_expectation(cache, tmp_path, wrong_expectation):
    out = tmp_path / "reports"
    proc = _compare(cache, "--strategies", "frozen", "--steps", str(STEPS), "--out", str(out),
                    "--json", "--quiet")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    printed = json.loads(proc.stdout)
    assert printed == json.loads((out / "report.json").read_text())
    assert printed["ok"] is False
    assert printed["table"]["rows"][0]["verdict"] == "FAIL: tf expectations, torch expectations"
    assert printed["failures"] == [f"frozen[{fw}]: expected bn_stats_changed=True, got False"
                                   for fw in ("tf", "torch")]
    assert sorted(p.name for p in out.iterdir()) == sorted(rep.REPORT_FILES)  # evidence written


# --------------------------------------------------------------------------- #
# --arch vit: verdicts of the runs with the base's dropout at 0, the trap of those with it on
# --------------------------------------------------------------------------- #
VIT_PAIR = ("naive", "lora")
VIT_STEPS = 3


@pytest.fixture(scope="module")
def vit_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare-vit") / "reports"
    proc = _compare(cache, "--arch", "vit", "--strategies", ",".join(VIT_PAIR), "--steps",
                    str(VIT_STEPS), "--out", str(out))
    return proc, json.loads((out / "report.json").read_text()) if out.exists() else None


@pytest.mark.slow
def test_compare_vit_exit_0_table_equals_report(vit_run):
    proc, report = vit_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert parse_table(proc.stdout) == _formatted(report)
    titles = [c["title"] for c in report["table"]["columns"]]
    assert titles.index("tf gap, dropout on") < titles.index("one step")
    assert "dropout, attention dropout and drop-path at 0" in report["settings"]["verdict_runs"]


@pytest.mark.slow
def test_compare_vit_naive_matches_across_frameworks_and_shows_the_dropout_trap(vit_run):
    """naive on vit is the same mistake in both frameworks: with the rates at 0 the two agree
    (verdict "ok", not "differs as expected"), lockstep included; with them on, train != eval
    in each. lora keeps the base in inference mode: no gap either way."""
    _, report = vit_run
    rows = {r["strategy"]: r for r in report["table"]["rows"]}
    assert rows["naive"]["verdict"] == rows["lora"]["verdict"] == "ok"
    for name in VIT_PAIR:
        run = report["runs"][name]
        assert run["lockstep"]["expected_to_match"] is True and run["lockstep"]["ok"] is True
        for fw in ("tf", "torch"):
            assert rows[name][f"{fw}_gap"] <= tol.SAME_FRAMEWORK_ATOL  # the verdict runs
            assert len(run["dropout_on"][fw]["train_loss"]) == VIT_STEPS
    for fw in ("tf", "torch"):
        assert rows["naive"][f"{fw}_dropout_gap"] > tol.TRAP_MIN_GAP, fw
        assert rows["lora"][f"{fw}_dropout_gap"] <= tol.SAME_FRAMEWORK_ATOL, fw
        # naive's dropout-on run is another run (its masks move the training loss); lora's
        # base in inference mode computes the same with the rates on or at 0
        naive, lora = report["runs"]["naive"], report["runs"]["lora"]
        assert np.max(np.abs(np.subtract(naive["dropout_on"][fw]["train_loss"],
                                         naive[fw]["train_loss"]))) > tol.TRAP_MIN_GAP, fw
        assert np.max(np.abs(np.subtract(lora["dropout_on"][fw]["train_loss"],
                                         lora[fw]["train_loss"]))) <= tol.SAME_FRAMEWORK_ATOL, fw
    # lora learns in its verdict runs: held-out loss falls over the 3 steps in both
    for fw in ("tf", "torch"):
        held = report["runs"]["lora"][fw]["heldout"]
        assert held[-1]["loss"] < held[0]["loss"], (fw, held)


@pytest.fixture
def vit_naive_without_trap(monkeypatch):
    """Declares, wrongly, that naive on vit keeps train == eval (no dropout trap)."""
    s = strategies.STRATEGIES["naive"]
    wrong = {fw: dataclasses.replace(e, train_eval_match=True)
             for fw, e in s.arch_expect["vit"].items()}
    monkeypatch.setitem(strategies.STRATEGIES, "naive",
                        dataclasses.replace(s, arch_expect={**s.arch_expect, "vit": wrong}))


@pytest.mark.slow
def test_compare_vit_judges_the_dropout_on_runs(cache, tmp_path, vit_naive_without_trap):
    """The verdict runs cannot show the trap (their rates are 0): only the dropout-on runs
    can fail the wrong declaration, and compare must say which."""
    out = tmp_path / "reports"
    proc = _compare(cache, "--arch", "vit", "--strategies", "naive", "--steps", "2",
                    "--out", str(out), "--json", "--quiet")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["failures"] == [f"naive[{fw}]: expected train_eval_match=True, got False"
                                   for fw in ("tf", "torch")]


# --------------------------------------------------------------------------- #
# exit 2: bad usage or input, one line, nothing run, nothing written
# --------------------------------------------------------------------------- #
def _bad_checkpoint(kind: str, directory: Path, cache: Path) -> Path:
    path = directory / f"{kind}.safetensors"
    if kind == "corrupt":
        path.write_bytes(b"\x00\x01 this is not a safetensors file")
        return path
    good = shipped_checkpoint("tinyconv")
    tensors, meta = load_checkpoint(good)
    if kind == "other-arch":
        meta = {**meta, "arch": "resnet18"}
    elif kind == "wrong-shape":
        key = "base.block1.conv.weight"
        tensors = {**tensors, key: np.zeros((8, *tensors[key].shape[1:]), np.float32)}
    save_checkpoint(path, tensors, {k: v for k, v in meta.items() if k != "format_version"})
    return path


@pytest.mark.parametrize("argv, message", [
    (["--strategies", "frozen,bogus"], "unknown strategy 'bogus'"),
    (["--strategies", ","], "no strategy given"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--lr", "-1"], "learning_rate must be a positive number"),
    (["--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    (["--dtype", "float16"], "invalid choice: 'float16'"),
    (["--checkpoint", "{tmp}/missing.safetensors"], "file not found"),
    (["--checkpoint", "{corrupt}"], "not a safetensors file"),
    (["--checkpoint", "{other-arch}"], "made for arch 'resnet18', not 'tinyconv'"),
    (["--checkpoint", "{wrong-shape}"], "key 'base.block1.conv.weight': shape expected (16, 3, 3, 3)"),
    (["--out", "{file}/reports"], "--out directory"),
    (["--strategies", "lora"], "strategy 'lora' does not run on arch 'tinyconv'"),
    (["--arch", "vit", "--strategies", "frozen,bn_adapt"],
     "strategy 'bn_adapt' does not run on arch 'vit'"),
    (["--arch", "vit", "--replicas", "2"], "the data-parallel comparison does not take vit"),
], ids=["unknown-strategy", "no-strategy", "steps-0", "lr-negative", "optimizer", "dtype", "missing-ckpt",
        "corrupt-ckpt", "other-arch-ckpt", "wrong-shape-ckpt", "out-not-writable",
        "lora-on-tinyconv", "bn-adapt-on-vit", "vit-replicas"])
def test_compare_bad_input_exit_2_one_line_nothing_written(cache, tmp_path, argv, message):
    """One stderr line as printed, nothing on stdout, no partial report."""
    argv, out = _bad_argv(argv, tmp_path, cache)
    proc = _compare(cache, *argv)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert proc.stderr.startswith("freeze-parity compare: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not out.exists() or list(out.iterdir()) == []  # no partial report


def _bad_argv(argv, tmp_path, cache):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    names = {"tmp": str(tmp_path), "file": str(a_file)}
    for kind in ("corrupt", "other-arch", "wrong-shape"):
        if "{" + kind + "}" in argv[-1]:
            names[kind] = str(_bad_checkpoint(kind, tmp_path, cache))
    argv = [arg.format(**names) for arg in argv]
    out = tmp_path / "reports"
    defaults = {"--steps": str(STEPS), "--out": str(out)}
    argv += [arg for flag, value in defaults.items() if flag not in argv for arg in (flag, value)]
    return argv, out


def test_compare_says_when_it_pretrains(tmp_path, monkeypatch, capsys):
    from shared.commands import compare

    made = []
    monkeypatch.setenv("FREEZE_PARITY_CACHE", str(tmp_path))
    monkeypatch.setattr(compare, "ensure_checkpoint", lambda arch: made.append(arch) or "ckpt")
    assert compare.pretrained_checkpoint("tinyconv", checkpoint="cache") == "ckpt"
    assert made == ["tinyconv"]
    assert "pretraining it on the source domain first" in capsys.readouterr().err


def test_compare_quiet_about_pretraining_when_cached(tmp_path, monkeypatch, capsys):
    from shared.commands import compare
    from shared.pretrain import PretrainConfig, checkpoint_path

    monkeypatch.setenv("FREEZE_PARITY_CACHE", str(tmp_path))
    cached = checkpoint_path(PretrainConfig(arch="tinyconv"))
    cached.write_bytes(shipped_checkpoint("tinyconv").read_bytes())
    assert Path(compare.pretrained_checkpoint("tinyconv", checkpoint="cache")) == cached
    assert capsys.readouterr().err == ""


def test_compare_uses_the_shipped_checkpoint_by_default(tmp_path, monkeypatch, capsys):
    from shared.commands import compare

    monkeypatch.setenv("FREEZE_PARITY_CACHE", str(tmp_path))
    assert compare.pretrained_checkpoint("tinyconv") == str(shipped_checkpoint("tinyconv"))
    assert compare.pretrained_checkpoint("tinyconv", checkpoint="x.safetensors") == "x.safetensors"
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().err == ""


def test_replica_table_caption_prints_brackets_as_text():
    """A numerics finding names Keras's variance 'E[x^2] - E[x]^2': rich must not take
    '[x^2]' for markup and drop it (it did: the table printed 'E - E^2')."""
    from rich.console import Console

    from shared.commands.compare import _replica_table

    section = {"notes": "notes", "rows": [],
               "numerics": ["the all-reduced variance as E[x^2] - E[x]^2 in float32"]}
    console = Console(record=True, width=200)
    console.print(_replica_table(section))
    assert "variance as E[x^2] - E[x]^2 in float32" in console.export_text()
