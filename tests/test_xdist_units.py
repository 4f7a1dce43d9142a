"""The suite's xdist scheduling (tests/xdist_units.py) builds each expensive fixture once.

A real two-worker run of a small suite in a subprocess: every file has a
module-scoped fixture that logs the process that built it. With the project's
scheduler each fixture is built once, and the files that share run_record's runs
(SHARED_GROUPS) run in one process. xdist's own ``--dist loadgroup`` with
``xdist_group`` marks built each one on both workers under pytest 9: that run is
kept here as the "must differ" half, so a fixed xdist shows up as a failing test
(and the project's scheduler can then be retired).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import pytest
from xdist_units import SHARED_GROUPS, UNIT_ORDER, unit_of

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent
FILES = ("test_train.py", "test_strategy_oracle.py", "test_readme_numbers.py", "test_alpha.py",
         "test_beta.py", "test_gamma.py")
MODULE = """
import os
import pytest

@pytest.fixture(scope="module")
def built():
    with open({log!r}, "a") as log:
        log.write("{name} %d\\n" % os.getpid())

@pytest.mark.parametrize("i", range(4))
def test_uses_fixture(built, i):
    pass

def test_uses_fixture_again(built):
    pass
"""
MARKING_CONFTEST = """
import pytest

@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(item.path.name))
"""


def _suite(pytester, log: Path) -> None:
    for name in FILES:
        pytester.makepyfile(**{name[:-3]: MODULE.format(log=str(log), name=name)})


def _builds(log: Path) -> dict[str, list[int]]:
    seen = defaultdict(list)
    for line in log.read_text().splitlines():
        name, pid = line.split()
        seen[name].append(int(pid))
    return dict(seen)


def test_unit_of_joins_shared_run_files_to_their_owner():
    assert unit_of("tests/test_readme_numbers.py::test_x[a-b]") == "test_train.py"
    assert unit_of("tests/test_strategy_oracle.py::test_y") == "test_train.py"
    assert unit_of("tests/test_bench.py::test_z") == "test_bench.py"
    assert unit_of("test_port.py::TestA::test_b") == "test_port.py"
    assert set(SHARED_GROUPS.values()) <= set(UNIT_ORDER)
    assert all((TESTS / name).is_file() for name in (*SHARED_GROUPS, *UNIT_ORDER))


@pytest.mark.slow
def test_two_workers_build_each_module_fixture_once_shared_files_in_one_process(pytester,
                                                                               monkeypatch):
    log = pytester.path / "builds.log"
    _suite(pytester, log)
    pytester.makeconftest("from xdist_units import *  # noqa: F401,F403\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "loadfile", "-p",
                                           "no:cacheprovider", "-q", timeout=120)
    result.assert_outcomes(passed=5 * len(FILES))
    builds = _builds(log)
    assert sorted(builds) == sorted(FILES)
    assert all(len(pids) == 1 for pids in builds.values()), builds
    shared = {builds[name][0] for name in ("test_train.py", *SHARED_GROUPS)}
    assert len(shared) == 1, f"files sharing run_record's runs ran in processes {shared}"
    assert len({pids[0] for pids in builds.values()}) == 2, "one worker ran everything"


@pytest.mark.slow
def test_xdist_loadgroup_marks_build_fixtures_on_both_workers_under_pytest_9(pytester,
                                                                             monkeypatch):
    """Why the project has its own scheduler: xdist 3.8's loadgroup groups nothing here."""
    log = pytester.path / "builds.log"
    _suite(pytester, log)
    pytester.makeconftest(MARKING_CONFTEST)
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "loadgroup", "-p",
                                           "no:cacheprovider", "-q", timeout=120)
    result.assert_outcomes(passed=5 * len(FILES))
    builds = _builds(log)
    assert any(len(set(pids)) > 1 for pids in builds.values()), (
        f"loadgroup kept every file on one worker ({builds}): xdist's grouping works again, "
        "so tests/xdist_units.py's scheduler can be retired")


def test_collection_order_puts_units_in_unit_order_stable_within_a_file():
    from types import SimpleNamespace

    from xdist_units import pytest_collection_modifyitems

    ids = ["tests/test_alpha.py::a", "tests/test_readme_numbers.py::r1", "tests/test_bench.py::b",
           "tests/test_train.py::t1", "tests/test_alpha.py::a2", "tests/test_readme_numbers.py::r2",
           "tests/test_train.py::t2"]
    items = [SimpleNamespace(nodeid=i) for i in ids]
    pytest_collection_modifyitems(None, items)
    # written out by hand: test_train's unit (with test_readme_numbers) first, then
    # test_bench (UNIT_ORDER), then the rest; inside a unit the collection's order
    assert [item.nodeid.split("::")[1] for item in items] == ["r1", "t1", "r2", "t2", "b", "a", "a2"]
