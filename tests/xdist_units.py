"""How ``make test`` spreads the suite over its xdist workers (``-n 2 --dist loadfile``).

A work unit is a test file, except that files reading another file's shared runs
(the session-scoped ``run_record``) join that file's unit (SHARED_GROUPS): one
worker runs the whole unit, so a module fixture is built once and a shared run is
computed once. Units are handed out in UNIT_ORDER, heaviest first, so the two
workers finish at about the same time.

Framework-free on purpose: the xdist controller loads it and imports neither
torch nor TensorFlow. tests/conftest.py re-exports the two hooks.
"""

from __future__ import annotations

import pytest

# test files whose tests share run_record's runs -> the file whose unit they join
SHARED_GROUPS = {"test_strategy_oracle.py": "test_train.py", "test_readme_numbers.py": "test_train.py"}
# units, heaviest first (per-file totals of `pytest --durations=0`); files not named go after
UNIT_ORDER = ("test_train.py", "test_cpu_matrix.py", "test_resnet.py", "test_port_families.py",
              "test_bench.py", "test_distributed.py", "test_lockstep.py", "test_import_order.py")


def unit_of(nodeid: str) -> str:
    """The work unit of a test: its file's name, or the name of the file it shares runs with."""
    name = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return SHARED_GROUPS.get(name, name)


def _rank(unit: str) -> int:
    return UNIT_ORDER.index(unit) if unit in UNIT_ORDER else len(UNIT_ORDER)


def pytest_collection_modifyitems(config, items):
    """Order the collection by unit rank (stable: a file's tests keep their order)."""
    items.sort(key=lambda item: _rank(unit_of(item.nodeid)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with unit_of() as the unit, handed out in collection order.

    xdist's ``--dist loadgroup`` would group by an ``xdist_group`` mark, but it records
    the group by rewriting ``item._nodeid``, which pytest 9 no longer reads: every test
    became a unit of its own, and both workers built every module and session fixture.
    """
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileUnitScheduling(LoadScopeScheduling):
        def __init__(self, config, log=None):
            super().__init__(config, log)
            config.option.loadscopereorder = False  # UNIT_ORDER, not the number of tests

        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return FileUnitScheduling(config, log)
