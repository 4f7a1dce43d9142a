"""Test-session set-up.

torch_impl is imported before anything else that could load TensorFlow (the
import-order segfault, docs/PORTING.md "Environment"); tf_impl then turns off
TF32 on the TensorFlow side as torch_impl does on the torch side.

Every session gets its own checkpoint cache (FREEZE_PARITY_CACHE, inherited by
CLI subprocesses), so tests never read or write ~/.cache. Runs start from the
pretrained tinyconv checkpoint that ships in the package (sha256-checked), as
the CLI's do; the tests that pretrain make their own.
"""

import os
import tempfile

import torch_impl  # noqa: F401, I001  (must precede tf_impl / tensorflow / keras)
import tf_impl  # noqa: F401

import pytest

os.environ["FREEZE_PARITY_CACHE"] = tempfile.mkdtemp(prefix="freeze-parity-test-cache-")


@pytest.fixture(scope="session")
def tinyconv_checkpoint():
    """The shipped pretrained tinyconv checkpoint (what compare, run and explain use)."""
    from shared.shipped import shipped_checkpoint

    return shipped_checkpoint("tinyconv")


@pytest.fixture(scope="session")
def run_record(tinyconv_checkpoint):
    """``run_record(framework, strategy, **config)``: a RunRecord, computed once per session."""
    from shared import frameworks
    from shared.record import RunConfig

    cache = {}

    def get(framework, strategy, **overrides):
        key = (framework, strategy, tuple(sorted(overrides.items())))
        if key not in cache:
            config = RunConfig(strategy=strategy, checkpoint=str(tinyconv_checkpoint), **overrides)
            cache[key] = frameworks.load(framework, "train").run(config)
        return cache[key]

    return get
