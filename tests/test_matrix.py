"""shared.matrix and shared.worker: the compare matrix's runs, in one process or two.

The worker process (torch only) must give the same records bit for bit as this process,
leave no process behind, and report a failing job in one line; frozen shares
feature_extraction's envelope and float64 runs (the same maths); a free run outside the
envelope gets more reruns before it is judged.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess

import pytest

from shared import matrix, tolerances
from shared.record import RunConfig
from shared.worker import TorchWorker, WorkerError

STEPS = 4


@pytest.fixture(scope="module")
def configs(tinyconv_checkpoint):
    return {name: RunConfig(strategy=name, steps=STEPS, checkpoint=str(tinyconv_checkpoint))
            for name in ("frozen", "bn_adapt")}


def _workers_alive() -> int:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=False).stdout
    return sum("-m shared.worker" in line for line in out.splitlines())


def test_run_matrix_worker_process_gives_the_same_records_bit_for_bit(configs):
    before = _workers_alive()
    alone = matrix.run_matrix(configs, processes=0)
    paired = matrix.run_matrix(configs, processes=1)
    assert _workers_alive() == before  # the worker ended with the call
    for a, b in zip(alone, paired):
        assert a.strategy == b.strategy
        assert a.exact.to_json() == b.exact.to_json()
        assert a.envelope.to_dict() == b.envelope.to_dict()
        assert a.tf.to_json() == b.tf.to_json() and a.torch.to_json() == b.torch.to_json()
        # the lockstep replayed from the worker's reference states = stepped alongside here
        assert a.lockstep.to_dict() == b.lockstep.to_dict()
        assert a.lockstep.steps == STEPS and a.lockstep.max_ratio > 0


def test_frozen_shares_feature_extractions_envelope_and_float64_run(configs):
    shared = matrix._Shared()
    frozen = matrix.run_strategy(configs["frozen"], shared)
    keys = {(c.strategy, c.rounding_seed, c.dtype) for c in shared.runs}
    assert keys == {("feature_extraction", None, "float32"), ("feature_extraction", 1, "float32"),
                    ("feature_extraction", 2, "float32"), ("feature_extraction", None, "float64")}
    assert frozen.exact.strategy == "frozen" and frozen.exact.config["dtype"] == "float64"
    assert frozen.ok, frozen.failures


def test_free_run_outside_gets_more_envelope_reruns_up_to_the_maximum(configs, monkeypatch):
    """With an allowed multiple far too small, a free run that parts by more than one
    forward's rounding (full, 20 steps) is outside: compare takes more reruns (seeds 3, 4,
    ...) before judging, up to ENVELOPE_MAX_SEEDS."""
    monkeypatch.setattr(tolerances, "ENVELOPE_MULTIPLE", 1e-30)
    result = matrix.run_strategy(dataclasses.replace(configs["bn_adapt"], strategy="full",
                                                     steps=20))
    assert result.envelope.seeds == list(range(1, tolerances.ENVELOPE_MAX_SEEDS + 1))
    assert not result.free.within


def test_worker_failing_job_raises_one_line_naming_the_job(tmp_path):
    bad = RunConfig(strategy="frozen", steps=1, checkpoint=str(tmp_path / "missing.safetensors"))
    with TorchWorker() as worker:
        job = worker.submit(bad)
        with pytest.raises(WorkerError) as info:
            worker.result(job)
    message = str(info.value)
    assert message.startswith("torch worker, job 0 (frozen): CheckpointError: checkpoint ")
    assert "file not found" in message and "\n" not in message


def test_workers_env_parsed_and_bad_value_one_line(monkeypatch):
    monkeypatch.setenv(matrix.WORKERS_ENV, "0")
    assert matrix.workers() == 0
    monkeypatch.setenv(matrix.WORKERS_ENV, "3")
    assert matrix.workers() == 1  # one worker process is all the matrix uses
    monkeypatch.setenv(matrix.WORKERS_ENV, "two")
    with pytest.raises(ValueError, match="FREEZE_PARITY_WORKERS: expected a number"):
        matrix.workers()
    monkeypatch.delenv(matrix.WORKERS_ENV)
    assert matrix.workers() == (1 if (os.cpu_count() or 1) >= 2 else 0)


def test_exact_config_is_float64_with_heldout_at_start_and_end(configs):
    exact = matrix.exact_config(configs["frozen"])
    assert exact.dtype == "float64" and exact.eval_every == STEPS
    assert dataclasses.replace(exact, dtype="float32", eval_every=10) == configs["frozen"]
