"""Test-session set-up.

torch_impl is imported before anything else that could load TensorFlow (the
import-order segfault, docs/PORTING.md "Environment"); tf_impl then turns off
TF32 on the TensorFlow side as torch_impl does on the torch side.

Every session gets its own checkpoint cache (FREEZE_PARITY_CACHE, inherited by
CLI subprocesses), so tests never read or write ~/.cache. Runs start from the
pretrained tinyconv checkpoint that ships in the package (sha256-checked), as
the CLI's do; the tests that pretrain make their own. Under pytest-xdist the
workers of one run share one cache directory, keyed by the run's id.

Scheduling under xdist (``make test`` runs ``-n 2 --dist loadfile``): each test
file is one work unit, so its module-scoped fixtures are built once, and files
that share the ``run_record`` session fixture's runs are one unit with the file
they share with (SHARED_GROUPS), so each run is computed once per session. The
units are handed out heaviest first (UNIT_ORDER), so the two workers finish
together. xdist's own ``--dist loadgroup`` cannot do this under pytest 9: it
marks a group by rewriting ``item._nodeid``, which pytest 9 no longer reads, so
every test became its own unit and both workers built every fixture. The
scheduler that replaces it is tests/xdist_units.py (pinned by
tests/test_xdist_units.py).

The controller process of an xdist run collects and runs nothing, so it does
not import the frameworks (about 14 s on this machine); every process that runs
tests imports torch_impl before tf_impl in ``pytest_configure``, before any
test module is imported.

Every collected node id is recorded (tests/session_ids.py), so
tests/test_porting_doc.py checks the guide's citations against this session's
collection when it collected the whole tests directory, instead of collecting
again in a new process.
"""

import os
import tempfile
from pathlib import Path

import pytest
from session_ids import pytest_itemcollected  # noqa: F401
from xdist_units import pytest_collection_modifyitems, pytest_xdist_make_scheduler  # noqa: F401


def _cache_dir() -> str:
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run:  # an xdist worker: one directory for all workers of this run
        path = Path(tempfile.gettempdir()) / f"freeze-parity-test-cache-{run}"
        path.mkdir(exist_ok=True)
        return str(path)
    return tempfile.mkdtemp(prefix="freeze-parity-test-cache-")


os.environ["FREEZE_PARITY_CACHE"] = _cache_dir()
# compare's torch-only runs in this process: the xdist workers already use both cores, a
# worker process per compare would only add its start-up (tests/test_matrix.py runs one)
os.environ.setdefault("FREEZE_PARITY_WORKERS", "0")


def _is_xdist_controller(config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) and "PYTEST_XDIST_WORKER" not in os.environ


def pytest_configure(config):
    if _is_xdist_controller(config):
        return
    # isort: off
    import torch_impl  # must precede tf_impl / tensorflow / keras
    import tf_impl  # noqa: F401
    # isort: on

    # One intra-op thread for torch in the test processes, as train.run uses: the suite's
    # nets are tiny, and on a small busy machine torch's OpenMP pool stalls whenever another
    # process (the other xdist worker, TensorFlow's pools) holds a core: an EfficientNet-B0
    # forward on 32x32 measured 2 s on two threads, 0.07 s on one, at a load average of 6.
    torch_impl.torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tinyconv_checkpoint():
    """The shipped pretrained tinyconv checkpoint (what compare, run and explain use)."""
    from shared.shipped import shipped_checkpoint

    return shipped_checkpoint("tinyconv")


# run_record configs that are strategy_result's too (the demo's, and its Adam variants)
MATRIX_OVERRIDES = {"optimizer", "steps"}


@pytest.fixture(scope="session")
def strategy_result(tinyconv_checkpoint):
    """``strategy_result(strategy, **config)``: the compare matrix's StrategyResult (lockstep,
    both free runs, envelope, float64 run), computed once per session; the default config
    is the demo's (``make demo``)."""
    from shared.matrix import _Shared, run_strategy
    from shared.record import RunConfig

    cache, shared = {}, _Shared()

    def get(strategy, **overrides):
        key = (strategy, tuple(sorted(overrides.items())))
        if key not in cache:
            config = RunConfig(strategy=strategy, checkpoint=str(tinyconv_checkpoint), **overrides)
            cache[key] = run_strategy(config, shared)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def run_record(tinyconv_checkpoint, strategy_result):
    """``run_record(framework, strategy, **config)``: a RunRecord, computed once per session
    (float32 runs of the matrix come from ``strategy_result``)."""
    from shared import frameworks
    from shared.record import RunConfig

    cache = {}

    def get(framework, strategy, **overrides):
        if set(overrides) <= MATRIX_OVERRIDES:  # the matrix's own runs: computed there once
            return getattr(strategy_result(strategy, **overrides), framework)
        key = (framework, strategy, tuple(sorted(overrides.items())))
        if key not in cache:
            config = RunConfig(strategy=strategy, checkpoint=str(tinyconv_checkpoint), **overrides)
            cache[key] = frameworks.load(framework, "train").run(config)
        return cache[key]

    return get
