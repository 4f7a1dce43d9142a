"""shared.quiet: the frameworks' start-up log held back at file descriptor 2, the rest kept.

Each fd-level test runs a small framework-free script in a fresh interpreter (no
torch, no TensorFlow: a fraction of a second), because only there does Python's
own stderr write through fd 2 as in a user's process (pytest's capture replaces
``sys.stderr``). The script writes to fd 2 what TensorFlow's native code writes
(the lines as tensorflow-cpu 2.21.0 printed them here). The real frameworks'
output is checked where a user sees it: tests/test_cli.py (console script) and
tests/test_pytest_plugin.py (a user's suite).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from shared.quiet import DEBUG_ENV, LOG_PREAMBLE, split_framework_log

REPO = Path(__file__).resolve().parents[1]
# TensorFlow 2.21's start-up log on this CPU with oneDNN on, as written (the records of the
# second native library repeat the preamble and the port.cc line)
START_UP_LOG = (
    f"{LOG_PREAMBLE}\n"
    "I0000 00:00:1796607786.635206    5907 port.cc:153] oneDNN custom operations are on. You "
    "may see slightly different numerical results due to floating-point round-off errors from "
    "different computation orders. To turn them off, set the environment variable "
    "`TF_ENABLE_ONEDNN_OPTS=0`.\n"
    "I0000 00:00:1796607786.684711    5907 cpu_feature_guard.cc:227] This TensorFlow binary is "
    "optimized to use available CPU instructions in performance-critical operations.\n"
    "To enable the following instructions: AVX2 AVX512F AVX512_VNNI AVX512_BF16 AVX_VNNI FMA, "
    "in other operations, rebuild TensorFlow with the appropriate compiler flags.\n"
    f"{LOG_PREAMBLE}\n"
    "I0000 00:00:1796607788.962783    5907 port.cc:153] oneDNN custom operations are on.\n"
)


def _script(body: str, env: dict | None = None) -> subprocess.CompletedProcess:
    code = "import os, sys, warnings\nfrom shared import quiet\n" + textwrap.dedent(body)
    run_env = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**run_env, "LOG": START_UP_LOG, **(env or {})}, timeout=60,
                          check=False)


def test_split_framework_log_takes_tensorflow_start_up_log_whole_keeps_the_rest():
    warning = "/x/y.py:3: FutureWarning: a real warning\n  warnings.warn('a real warning')\n"
    text = "before\n" + START_UP_LOG + warning + "\nafter\n"
    kept, log = split_framework_log(text)
    assert log == START_UP_LOG
    assert kept == "before\n" + warning + "\nafter\n"
    assert split_framework_log("E only an ordinary line\n") == ("E only an ordinary line\n", "")


def test_quiet_native_stderr_drops_log_keeps_python_warning_and_later_output():
    done = _script("""
        with quiet.quiet_native_stderr():
            os.write(2, os.environ["LOG"].encode())
            warnings.warn("kept", FutureWarning)
            print("python stderr line", file=sys.stderr)
        os.write(2, b"after the block\\n")
        print("stdout untouched")
    """)
    assert done.returncode == 0, done.stderr
    assert "absl::InitializeLog" not in done.stderr and "oneDNN" not in done.stderr, done.stderr
    # python -c: the warning has no source line to show
    assert done.stderr.splitlines() == ["<string>:6: FutureWarning: kept", "python stderr line",
                                        "after the block"], done.stderr
    assert done.stdout == "stdout untouched\n"


def test_quiet_native_stderr_block_raising_shows_everything_captured():
    done = _script("""
        try:
            with quiet.quiet_native_stderr():
                os.write(2, os.environ["LOG"].encode() + b"native: the reason it failed\\n")
                raise ImportError("no such library")
        except ImportError:
            os.write(2, b"caught\\n")
    """)
    assert done.returncode == 0, done.stderr
    assert done.stderr == START_UP_LOG + "native: the reason it failed\ncaught\n"


def test_quiet_native_stderr_debug_env_writes_log_through_as_written():
    done = _script("""
        with quiet.quiet_native_stderr():
            os.write(2, os.environ["LOG"].encode())
    """, env={DEBUG_ENV: "1"})
    assert done.returncode == 0 and done.stderr == START_UP_LOG


def test_install_quiet_import_first_import_quiet_loader_untouched_undo_removes_hook(tmp_path):
    package = tmp_path / "noisy_native"
    package.mkdir()
    (package / "__init__.py").write_text("import os\nos.write(2, os.environ['LOG'].encode())\n")
    done = _script(f"""
        import importlib.machinery
        sys.path.insert(0, {str(tmp_path)!r})
        undo = quiet.install_quiet_import(("noisy_native",))
        again = quiet.install_quiet_import(("noisy_native",))
        import noisy_native
        print(type(noisy_native.__loader__).__name__, "exec_module" in vars(noisy_native.__loader__))
        hooks = lambda: sum(type(f).__name__ == "_QuietFirstImport" for f in sys.meta_path)
        print(hooks(), end=" ")
        again()
        print(hooks(), end=" ")
        undo()
        print(hooks())
    """)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    assert done.stdout.splitlines() == ["SourceFileLoader False", "1 1 0"]
