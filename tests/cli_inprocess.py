"""Run ``freeze-parity`` in this process, as the console script does.

The console script is ``sys.exit(shared.cli.main())``, so ``main(argv)`` called
here shows what a user's process shows: the exit status, what was printed to
stdout and stderr, the files written. A new process would also pay for
importing torch and TensorFlow (about 14 s here); the test processes have
imported both already (tests/conftest.py, torch first).

What a fresh process would show and this cannot: the console-script entry
point itself and what the frameworks print at start-up straight to file
descriptor 2 (tests/test_cli.py keeps one real console-script run for those).
Exceptions other than ``SystemExit`` propagate: that is the traceback a user
would see.

Framework-free: tests import it as ``from cli_inprocess import cli``.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Completed:
    """What the process would have ended with (the fields of subprocess.CompletedProcess)."""

    returncode: int
    stdout: str
    stderr: str


def cli(*argv, env: Mapping[str, str | None] | None = None) -> Completed:
    """``freeze-parity *argv`` in this process; ``env`` overrides os.environ for the call only
    (a value of None unsets the variable)."""
    from shared.cli import main

    out, err = io.StringIO(), io.StringIO()
    with _environ(env or {}), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main([os.fspath(a) if isinstance(a, os.PathLike) else a for a in argv])
        except SystemExit as exit_:  # argparse's errors, --help and --version exit from parse_args
            status = _exit_status(exit_.code, err)
    return Completed(int(status), out.getvalue(), err.getvalue())


def _exit_status(code, err: io.StringIO) -> int:
    """The status the interpreter gives ``SystemExit(code)``: None is 0, a message is 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=err)
    return 1


@contextlib.contextmanager
def _environ(overrides: Mapping[str, str | None]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in overrides}
    try:
        for name, value in overrides.items():
            _set(name, value)
        yield
    finally:
        for name, value in saved.items():
            _set(name, value)


def _set(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
