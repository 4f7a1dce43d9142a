"""``freeze-parity run``, ``pretrain`` and the ``--json`` writes of ``run`` and ``bench``.

In-process through ``shared.cli.main`` (what the console script calls) where the
test is about what a command does; one real subprocess where it is about the
process (exit status and the raw stderr a user sees, with TensorFlow's
start-up log forced on). stderr is checked as printed: the CLI prints an error
message as raised, so a message that spans lines fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cli_inprocess import Completed
from cli_inprocess import cli as cli_inprocess

from shared import __version__, cli
from shared.checkpoint import load_checkpoint
from shared.pretrain import MIN_SOURCE_ACCURACY
from shared.quiet import DEBUG_ENV, LOG_PREAMBLE, split_framework_log
from shared.record import RunRecord

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


def _one_error_line(err: str, command: str, fragment: str) -> None:
    assert err.count("\n") == 1 and err.endswith("\n"), repr(err)
    assert err.startswith(f"freeze-parity {command}: error: "), err
    assert fragment in err and "Traceback" not in err, err


def _run_argv(checkpoint, *extra: str) -> list[str]:
    return ["run", "--framework", "torch", "--strategy", "bn_adapt", "--steps", str(STEPS),
            "--checkpoint", str(checkpoint), *extra]


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_cli_prints_an_error_message_as_raised(monkeypatch, capsys):
    """No joining of lines in the CLI: a message that spans lines shows, so tests can see it."""
    from shared.commands import run

    def two_lines(args):
        raise ValueError("first line\nsecond line")

    monkeypatch.setattr(run, "run", two_lines)
    assert cli.main(_run_argv("unused.safetensors")) == 2
    assert capsys.readouterr().err == "freeze-parity run: error: first line\nsecond line\n"


# --- tests/cli_inprocess.py (how the other CLI tests run the command) -------------------------

def test_cli_inprocess_version_exit_0_on_captured_stdout():
    assert cli_inprocess("--version") == Completed(0, f"freeze-parity {__version__}\n", "")


def test_cli_inprocess_argparse_error_exit_2_one_captured_stderr_line():
    done = cli_inprocess("no-such-command")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("freeze-parity: error: argument command: invalid choice"), done.stderr


def test_cli_inprocess_env_applies_for_the_call_only(monkeypatch):
    from shared.commands import run

    seen = []
    monkeypatch.setenv("FREEZE_PARITY_UNSET_ME", "before")
    monkeypatch.delenv("FREEZE_PARITY_SET_ME", raising=False)
    monkeypatch.setattr(run, "run", lambda args: seen.append(
        (os.environ.get("FREEZE_PARITY_SET_ME"), os.environ.get("FREEZE_PARITY_UNSET_ME"))) or 3)
    done = cli_inprocess(*_run_argv("unused.safetensors"),
                         env={"FREEZE_PARITY_SET_ME": "during", "FREEZE_PARITY_UNSET_ME": None})
    assert done.returncode == 3 and seen == [("during", None)]
    assert "FREEZE_PARITY_SET_ME" not in os.environ
    assert os.environ["FREEZE_PARITY_UNSET_ME"] == "before"


def test_cli_inprocess_other_exceptions_propagate_streams_restored(monkeypatch):
    from shared.commands import run

    def crash(args):
        print("partial output")
        raise RuntimeError("a bug, not bad input")

    monkeypatch.setattr(run, "run", crash)
    stdout, stderr = sys.stdout, sys.stderr
    with pytest.raises(RuntimeError, match="a bug, not bad input"):
        cli_inprocess(*_run_argv("unused.safetensors"))
    assert (sys.stdout, sys.stderr) == (stdout, stderr)


# --- run --------------------------------------------------------------------------------------

def test_cli_run_writes_its_record_and_meets_expectations(tinyconv_checkpoint, tmp_path, capsys):
    out = tmp_path / "records" / "bn_adapt.json"  # the directory is made
    assert cli.main(_run_argv(tinyconv_checkpoint, "--json", str(out))) == 0
    printed = capsys.readouterr().out
    record = RunRecord.load(out)
    assert (record.framework, record.strategy, len(record.steps)) == ("torch", "bn_adapt", STEPS)
    assert record.config["checkpoint"] == str(tinyconv_checkpoint)
    assert record.bn_stats_changed and record.moved  # it trained
    assert printed.startswith(f"torch bn_adapt (tinyconv, sgd, {STEPS} steps, ")
    assert f"held-out loss {record.heldout[-1].loss:.4f}" in printed
    assert f"record: {out}" in printed and "expectation failed" not in printed


def test_cli_run_json_write_failure_keeps_old_record_exit_2(tinyconv_checkpoint, tmp_path,
                                                            monkeypatch, capsys):
    out = tmp_path / "record.json"
    out.write_text("old record\n")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    assert cli.main(_run_argv(tinyconv_checkpoint, "--json", str(out))) == 2
    monkeypatch.undo()
    _one_error_line(capsys.readouterr().err, "run", "No space left on device")
    assert out.read_text() == "old record\n" and _leftovers(tmp_path) == []


def test_cli_run_json_directory_rejected_before_training(tmp_path, monkeypatch, capsys):
    from shared import frameworks

    monkeypatch.setattr(frameworks, "load", lambda *a: pytest.fail("trained before the check"))
    assert cli.main(_run_argv(tmp_path / "unused.safetensors", "--json", str(tmp_path))) == 2
    _one_error_line(capsys.readouterr().err, "run", f"--json {tmp_path}: is a directory")


def test_cli_run_bad_learning_rate_one_line_before_training(tmp_path, monkeypatch, capsys):
    from shared import frameworks

    monkeypatch.setattr(frameworks, "load", lambda *a: pytest.fail("trained before the check"))
    assert cli.main(_run_argv(tmp_path / "unused.safetensors", "--lr", "-1")) == 2
    _one_error_line(capsys.readouterr().err, "run",
                    "learning_rate must be a positive number, got -1.0")


# TensorFlow enables oneDNN by default on many x86 CPUs and then writes its start-up log to
# fd 2 (shared/quiet.py); forced on here, so these tests see that log on any x86 CPU
ONEDNN_ON = {"TF_ENABLE_ONEDNN_OPTS": "1"}
START_UP_LOG_MARKERS = ("absl::InitializeLog", "oneDNN custom operations are on")


def _console_script(argv, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("freeze-parity")
    run_env = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    return subprocess.run([str(script), *map(str, argv)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, check=False, env={**run_env, **env})


def _no_framework_log(stream: str) -> None:
    assert not any(marker in stream for marker in START_UP_LOG_MARKERS), stream
    assert split_framework_log(stream)[1] == "", stream


def test_cli_run_console_script_missing_checkpoint_one_raw_line(tmp_path):
    """The real process, oneDNN on: exit 2, one raw stderr line (no framework log line), no
    traceback, nothing on stdout."""
    missing = tmp_path / "missing.safetensors"
    argv = ["run", "--framework", "tf", "--strategy", "frozen", "--checkpoint", missing]
    # raised after both frameworks are imported (tf_impl imports torch_impl first)
    done = _console_script(argv, ONEDNN_ON)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    _one_error_line(done.stderr, "run", str(missing))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_compare_console_script_no_framework_log_unless_debug(tmp_path):
    """What make demo runs, short, oneDNN on: both frameworks imported and trained, reports
    written, and no framework log line on stdout or stderr; FREEZE_PARITY_DEBUG=1 shows it."""
    argv = ["compare", "--strategies", "frozen", "--steps", "2", "--quiet"]
    with ThreadPoolExecutor(2) as pool:  # two fresh interpreters: start them together
        plain, debug = pool.map(
            lambda case: _console_script([*argv, "--out", tmp_path / case[0]], case[1]),
            [("plain", ONEDNN_ON), ("debug", {**ONEDNN_ON, DEBUG_ENV: "1"})])
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert plain.stderr == "" and plain.stdout.startswith("freeze-parity compare: "), plain.stderr
    _no_framework_log(plain.stdout)
    assert (tmp_path / "plain" / "report.json").is_file()
    assert debug.returncode == 0, debug.stdout + debug.stderr
    log = split_framework_log(debug.stderr)[1]
    assert log.count(LOG_PREAMBLE) == 2 and log.count("oneDNN custom operations are on") == 2, log


# --- pretrain ---------------------------------------------------------------------------------

def test_cli_pretrain_one_epoch_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "tiny-1.safetensors"
    status = cli.main(["pretrain", "--epochs", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    tensors, meta = load_checkpoint(out)
    assert meta["arch"] == "tinyconv" and "base.block1.conv.weight" in tensors
    accuracy = float(printed.split("held-out accuracy ")[1].split(",")[0])
    assert status == (0 if accuracy >= MIN_SOURCE_ACCURACY else 1)
    assert ("warning: accuracy below" in printed) == (status == 1)
    assert f"checkpoint: {out}" in printed and _leftovers(tmp_path) == []


@pytest.mark.parametrize("argv, fragment", [
    (["--epochs", "0"], "error: --epochs must be >= 1, got 0"),
    (["--out", "{file}/ckpt.safetensors"], "error: checkpoint directory {file}: cannot create it"),
    (["--arch", "vgg"], "error: argument --arch: invalid choice: 'vgg'"),
], ids=["epochs-0", "out-under-a-file", "unknown-arch"])
def test_cli_pretrain_bad_input_one_line_nothing_written(tmp_path, capsys, argv, fragment):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    try:
        status = cli.main(["pretrain", *[a.format(file=a_file) for a in argv]])
    except SystemExit as exit_:  # argparse's own errors exit from parse_args
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("freeze-parity pretrain: error: "), err
    assert fragment.format(file=a_file) in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


# --- bench --json -----------------------------------------------------------------------------

def test_cli_bench_json_directory_rejected_before_measuring(tmp_path, monkeypatch, capsys):
    from shared.commands import bench

    monkeypatch.setattr(bench, "measure", lambda *a, **k: pytest.fail("measured before the check"))
    assert cli.main(["bench", "--quick", "--json", str(tmp_path)]) == 2
    _one_error_line(capsys.readouterr().err, "bench", f"--json {tmp_path}: is a directory")


def test_cli_bench_json_write_failure_keeps_old_file_exit_2(tmp_path, monkeypatch, capsys):
    from shared.commands import bench

    out = tmp_path / "bench.json"
    out.write_text("old figures\n")
    monkeypatch.setattr(bench, "measure", lambda *a, **k: {"version": 0, "figures": {}})

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    assert cli.main(["bench", "--quick", "--json", str(out)]) == 2
    monkeypatch.undo()
    _one_error_line(capsys.readouterr().err, "bench", "No space left on device")
    assert out.read_text() == "old figures\n" and _leftovers(tmp_path) == []
