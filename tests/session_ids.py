"""The node ids this test session collected, for tests that check citations of tests.

tests/test_porting_doc.py needs the node ids of the files docs/PORTING.md cites.
When this session collected the whole tests directory, it has them already: the
``pytest_itemcollected`` hook (re-exported by tests/conftest.py) records every
collected id, before ``-k``, ``-m`` or ``--deselect`` drop any, in the format
``pytest --collect-only -q`` prints (relative to the rootdir). Otherwise
(some files or node ids named, ``--ignore``, ``--lf``, another rootdir) the
caller must collect the files itself.

Framework-free: it is loaded by tests/conftest.py, also in the xdist controller.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_IDS = pytest.StashKey[list[str]]()


def pytest_itemcollected(item):
    item.config.stash.setdefault(_IDS, []).append(item.nodeid)


def collected_ids(config) -> list[str]:
    """Every node id collected so far in this session (empty where nothing was collected)."""
    return list(config.stash.get(_IDS, []))


def collects_whole(config, directory: Path) -> bool:
    """Whether this session collected every test file under ``directory`` (ids as printed from
    the rootdir ``directory.parent``)."""
    narrowed = (config.getoption("pyargs", False) or config.getoption("ignore", None)
                or config.getoption("ignore_glob", None) or config.getoption("lf", False))
    return (not narrowed and Path(config.rootpath).resolve() == directory.resolve().parent
            and covers(config.args, Path(config.invocation_params.dir), directory))


def covers(args: list[str], invocation_dir: Path, directory: Path) -> bool:
    """Whether collecting ``args`` (paths as given on the command line or by testpaths, from
    ``invocation_dir``) collects everything under ``directory``: some arg is a directory that
    is ``directory`` or holds it (other args only add files)."""
    directory = directory.resolve()
    paths = [(invocation_dir / arg).resolve() for arg in args if "::" not in arg]
    return any(p.is_dir() and (p == directory or p in directory.parents) for p in paths)
