"""Keep the frameworks' start-up log out of every command's output (framework-free).

TensorFlow's native code writes to file descriptor 2 while ``import tensorflow``
runs, before Python could filter anything, and ``TF_CPP_MIN_LOG_LEVEL`` does not
silence it: where oneDNN is on (TensorFlow's default on recent x86 CPUs,
``TF_ENABLE_ONEDNN_OPTS=1`` forces it) every process gets, twice (two native
libraries),

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:... 1234 port.cc:153] oneDNN custom operations are on. ...

and, with the level unset, a two-line ``cpu_feature_guard.cc`` record. Measured
(tensorflow-cpu 2.21.0): all of it is written during ``import tensorflow``;
device initialisation, the first op, ``tf.function`` tracing and ``fit`` add
nothing, and later native records below ERROR are filtered by the
``TF_CPP_MIN_LOG_LEVEL=2`` that ``tf_impl`` sets.

:func:`quiet_native_stderr` points fd 2 at a temporary file around the imports
(``tf_impl``/``torch_impl`` ``__init__``) and restores it. What was captured
comes back on fd 2 unless it is a framework log record: everything when the
block raises (the import failed, the reason is shown), everything but the log
records when it succeeds (a Python warning printed meanwhile is kept). A
process that dies inside the block (abort, segfault) loses what was captured:
``FREEZE_PARITY_DEBUG=1`` turns all of this off and shows the log as written.

The pytest plugin cannot import a framework when it loads, and a user's suite
imports Keras itself: :func:`install_quiet_import` adds a one-shot import hook
that runs TensorFlow's first import inside :func:`quiet_native_stderr`.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator

__all__ = ["DEBUG_ENV", "LOG_PREAMBLE", "debug_requested", "split_framework_log",
           "quiet_native_stderr", "install_quiet_import"]

DEBUG_ENV = "FREEZE_PARITY_DEBUG"
# absl prints this once per native library, before its first record
LOG_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# an absl/glog record: severity + MMDD, time, thread id, file:line]
_RECORD = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [^\s\]]+:\d+\] ")
# how Python's warnings module starts a warning: "<path>:<line>: <Category>: ..."
_PYTHON_WARNING = re.compile(r"^\S.*:\d+: \w+: ")

_depth = 0  # quiet_native_stderr blocks open now (nested ones capture nothing more)


def debug_requested() -> bool:
    """``FREEZE_PARITY_DEBUG`` set to anything: tracebacks and the frameworks' log, as written."""
    return bool(os.environ.get(DEBUG_ENV))


def split_framework_log(text: str) -> tuple[str, str]:
    """``text`` as (everything else, the framework log): the absl preamble, records, and the
    continuation lines of a multi-line record (up to a blank line, a Python warning or the
    next record)."""
    kept, log, in_record = [], [], False
    for line in text.splitlines(keepends=True):
        bare = line.rstrip("\r\n")
        if bare == LOG_PREAMBLE or _RECORD.match(bare):
            log.append(line)
            in_record = True
        elif in_record and bare and not _PYTHON_WARNING.match(bare):
            log.append(line)  # e.g. cpu_feature_guard's "To enable the following instructions"
        else:
            kept.append(line)
            in_record = False
    return "".join(kept), "".join(log)


def _flush_stderr() -> None:
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stderr.flush()


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Hold back what is written to fd 2 inside the block; give back all but framework log
    records (everything if the block raises). A no-op under ``FREEZE_PARITY_DEBUG``."""
    global _depth
    if debug_requested() or _depth:
        yield
        return
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2: nothing to protect
        yield
        return
    _depth += 1
    try:
        with tempfile.TemporaryFile() as captured:
            _flush_stderr()
            os.dup2(captured.fileno(), 2)
            failed = True
            try:
                yield
                failed = False
            finally:
                _flush_stderr()  # Python's own writes meanwhile went to the file too
                os.dup2(saved, 2)
                captured.seek(0)
                text = captured.read().decode("utf-8", errors="replace")
                shown = text if failed else split_framework_log(text)[0]
                if shown:
                    os.write(2, shown.encode("utf-8", errors="replace"))
    finally:
        _depth -= 1
        os.close(saved)


class _QuietFirstImport(importlib.abc.MetaPathFinder):
    """Runs the first import of ``names`` (top-level packages) inside quiet_native_stderr."""

    def __init__(self, names: tuple[str, ...]):
        self.names = frozenset(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.names or fullname in sys.modules:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        real = loader.exec_module

        def exec_module(module):
            # this loader instance only (a file finder makes one per module); the module's
            # __loader__ and __spec__ stay the real loader
            del loader.exec_module
            with quiet_native_stderr():
                real(module)

        loader.exec_module = exec_module
        return spec


def install_quiet_import(names: tuple[str, ...] = ("tensorflow",)) -> Callable[[], None]:
    """Make the first import of ``names``, by anyone, quiet; returns the undo (a no-op when
    a hook was installed already: the pytest plugin of an in-process inner pytest run)."""
    if any(isinstance(f, _QuietFirstImport) for f in sys.meta_path):
        return lambda: None
    hook = _QuietFirstImport(names)
    sys.meta_path.insert(0, hook)

    def undo() -> None:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(hook)

    return undo
