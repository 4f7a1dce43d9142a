"""The environment traps: import order, the project's guard, framework-free ``shared``, TF32.

With the pinned wheels, TensorFlow imported before torchvision (or ``torch._dynamo``, or
before a torch optimizer is created) kills the process with SIGSEGV. Each scenario runs
in a fresh interpreter (a segfault must not take pytest down); the interpreters start
together, once per module, because each one spends seconds importing TensorFlow.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch  # before keras/TensorFlow (tests/conftest.py has loaded torch_impl already)

from tf_impl import tf  # importing tf_impl turns TF32 off on the TensorFlow side

pytestmark = pytest.mark.slow  # six fresh interpreters, four of them import TensorFlow

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT_S = 300  # 2 shared cores, TensorFlow imports in several at once

_MAKE_OPTIMIZER = "import torch; torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)"
# Every module of the framework-free package, except the pytest entry point (loaded by
# pytest, never by the CLI), imported one after the other.
_IMPORT_SHARED = (
    "import importlib, pkgutil, sys, shared\n"
    "names = sorted(m.name for m in pkgutil.walk_packages(shared.__path__, 'shared.')\n"
    "               if m.name != 'shared.pytest_plugin')\n"
    "for name in names: importlib.import_module(name)\n"
    "print('imported', ' '.join(names))\n"
    "print('loaded', ' '.join(sorted(m for m in ('torch', 'tensorflow', 'keras', 'torchvision')\n"
    "                                 if m in sys.modules)))\n"
)

SCENARIOS = {
    "tensorflow_then_torchvision": "import tensorflow; import torchvision",
    "tf_impl_then_torch_impl": f"import tf_impl; import torch_impl; {_MAKE_OPTIMIZER}",
    "torch_impl_then_tf_impl": f"import torch_impl; import tf_impl; {_MAKE_OPTIMIZER}",
    # also reports TensorFlow's own TF32 default before the project touches it
    "tensorflow_then_torch_impl": (
        "import tensorflow as tf\n"
        "print('tf32', tf.config.experimental.tensor_float_32_execution_enabled(), flush=True)\n"
        "import torch_impl\n"
    ),
    "shared_only": _IMPORT_SHARED,
    "torch_tf32_defaults": (
        "import torch\n"
        "print('cudnn', torch.backends.cudnn.allow_tf32)\n"
        "print('matmul', torch.backends.cuda.matmul.allow_tf32)\n"
    ),
}


def _row(name: str) -> str:
    return f"docs/PORTING.md row {name!r}"


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("KERAS_BACKEND", None)  # as a user's shell would have it
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )


@pytest.fixture(scope="module")
def outcomes():
    """Start every scenario at once; each test waits only for its own."""
    with ThreadPoolExecutor(max_workers=len(SCENARIOS)) as pool:
        futures = {name: pool.submit(_run, code) for name, code in SCENARIOS.items()}
        yield futures


def _printed(result: subprocess.CompletedProcess) -> dict[str, str]:
    """``{first word: rest}`` of each line the scenario printed."""
    return dict((line.split(" ", 1) + [""])[:2] for line in result.stdout.splitlines())


def _describe(result: subprocess.CompletedProcess) -> str:
    tail = (result.stderr.strip().splitlines() or [""])[-1]
    return f"exit {result.returncode}, last stderr line {tail!r}"


def test_tensorflow_before_torchvision_segfaults(outcomes, record_property):
    result = outcomes["tensorflow_then_torchvision"].result()
    record_property("measured", result.returncode)
    assert result.returncode in (-signal.SIGSEGV, 128 + signal.SIGSEGV), (
        f"{_row('import order')}: expected `import tensorflow; import torchvision` to die with "
        f"SIGSEGV; {_describe(result)}"
    )


@pytest.mark.parametrize("scenario", ["tf_impl_then_torch_impl", "torch_impl_then_tf_impl"])
def test_project_packages_either_order_create_optimizer(scenario, outcomes, record_property):
    result = outcomes[scenario].result()
    record_property("measured", result.returncode)
    assert result.returncode == 0, (
        f"{_row('project import guard')}: expected {SCENARIOS[scenario]!r} to exit 0; "
        f"{_describe(result)}"
    )


def test_tensorflow_then_torch_impl_raises_import_error(outcomes, record_property):
    result = outcomes["tensorflow_then_torch_impl"].result()
    record_property("measured", _describe(result))
    assert result.returncode == 1 and "ImportError: freeze-parity" in result.stderr, (
        f"{_row('project import guard')}: expected torch_impl's ImportError, not a segfault; "
        f"{_describe(result)}"
    )


def test_shared_imports_no_framework(outcomes, record_property):
    result = outcomes["shared_only"].result()
    lines = _printed(result)
    record_property("measured", lines.get("loaded", ""))
    assert result.returncode == 0 and "shared.tolerances" in lines.get("imported", ""), (
        f"{_row('framework-free shared')}: importing shared failed; {_describe(result)}"
    )
    assert lines.get("loaded") == "", (
        f"{_row('framework-free shared')}: importing {lines.get('imported')} loaded "
        f"{lines.get('loaded')}"
    )


def test_tf32_on_by_default_before_project_import(outcomes, record_property):
    defaults = {
        "torch cudnn allow_tf32": _printed(outcomes["torch_tf32_defaults"].result()).get("cudnn"),
        "torch matmul allow_tf32": _printed(outcomes["torch_tf32_defaults"].result()).get("matmul"),
        "tensorflow tensor_float_32": _printed(outcomes["tensorflow_then_torch_impl"].result()).get(
            "tf32"
        ),
    }
    record_property("measured", defaults)
    assert defaults == {
        "torch cudnn allow_tf32": "True",
        "torch matmul allow_tf32": "False",
        "tensorflow tensor_float_32": "True",
    }, f"{_row('TF32')}: framework defaults changed, got {defaults}"


def test_tf32_disabled_on_both_sides_after_import(record_property):
    flags = {
        "torch matmul allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "torch cudnn allow_tf32": torch.backends.cudnn.allow_tf32,
        "tensorflow tensor_float_32": tf.config.experimental.tensor_float_32_execution_enabled(),
    }
    record_property("measured", flags)
    assert not any(flags.values()), f"{_row('TF32')}: expected TF32 off everywhere, got {flags}"
