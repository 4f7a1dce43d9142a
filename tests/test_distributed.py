"""Data parallelism with the real engines: torch DDP under torchrun, tf MirroredStrategy.

Multi-process runs are expensive (each worker imports its framework), so the
whole file launches few processes: ONE torchrun job (2 ranks) runs every torch
configuration and probe, ONE MirroredStrategy process (2 logical CPU devices)
every tf one; the two run at the same time (session fixture ``replica_runs``),
and every test below asserts on their results. The single-process runs they are
compared with come from the shared ``run_record`` fixture. Two more small
launches test the failure paths: a rank that dies mid-run, a rank that hangs.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from shared import distributed as dist
from shared.record import HeldOut, RunConfig, RunRecord, StepRecord
from shared.tolerances import REPLICA_STEP_ATOL, TRAP_MIN_GAP

STEPS = 5  # enough for batch statistics to move the losses well above TRAP_MIN_GAP
REPO = Path(__file__).resolve().parents[1]
TORCH_PROBES = ("ddp_no_trainable", "ddp_unused_parameters", "ddp_sync_batchnorm_cpu",
                "ddp_buffer_flags")
TF_PROBES = ("keras_data_parallel", "keras_audit_mirrored")
MARK = "FREEZE_PARITY_TEST_MARK"
FIXTURE_TOKEN = uuid.uuid4().hex


def _config(checkpoint, strategy: str) -> RunConfig:
    return RunConfig(strategy=strategy, steps=STEPS, checkpoint=str(checkpoint))


@pytest.fixture(scope="session")
def replica_runs(tinyconv_checkpoint, run_record):
    """{"torch": key -> ReplicaRecord / probe, "tf": ...}: one launch per framework, concurrent.

    While the launches run, this process makes the single-process runs the tests compare
    with (``run_record`` caches them), instead of waiting idle.
    """
    def c(strategy):
        return _config(tinyconv_checkpoint, strategy)

    torch_runs = {s: (c(s), dist.ReplicaOptions())
                  for s in ("frozen", "feature_extraction", "partial", "bn_adapt", "full")}
    torch_runs["full_no_broadcast"] = (c("full"), dist.ReplicaOptions(broadcast_buffers=False))
    tf_runs = {"frozen": (c("frozen"), dist.ReplicaOptions()),
               "full": (c("full"), dist.ReplicaOptions()),
               "full_sync": (c("full"), dist.ReplicaOptions(synchronized_bn=True))}
    env = {MARK: FIXTURE_TOKEN}  # every process of both launches carries it
    with ThreadPoolExecutor(2) as pool:
        jobs = {"tf": pool.submit(dist.run_job, "tf", tf_runs, TF_PROBES, env=env),
                "torch": pool.submit(dist.run_job, "torch", torch_runs, TORCH_PROBES, env=env)}
        for fw, runs in (("torch", torch_runs), ("tf", tf_runs)):
            for config, _ in runs.values():
                _single(run_record, fw, config.strategy)
        return {fw: job.result() for fw, job in jobs.items()}


def _single(run_record, framework: str, strategy: str):
    return run_record(framework, strategy, steps=STEPS)


@pytest.fixture(scope="session")
def own_envelope(run_record, tinyconv_checkpoint):
    """``own_envelope(framework, strategy)``: that framework's rounding envelope of the
    single-process run (its reruns with rounding seeds), once per session."""
    from shared.matrix import envelope_of

    cache = {}

    def get(framework, strategy):
        if (framework, strategy) not in cache:
            cache[framework, strategy] = envelope_of(
                framework, _config(tinyconv_checkpoint, strategy),
                _single(run_record, framework, strategy))
        return cache[framework, strategy]

    return get


def _our_processes(token: str) -> list[int]:
    """PIDs of live processes carrying ``MARK=token`` in their environment."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"{MARK}={token}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


# --- sharding and declared expectations (no processes) ------------------------------------


def test_shard_gives_each_rank_its_contiguous_half_of_the_global_batch():
    batch = np.array([7, 3, 9, 1, 4, 8])
    assert dist.shard(batch, 0, 2).tolist() == [7, 3, 9]
    assert dist.shard(batch, 1, 2).tolist() == [1, 4, 8]


def test_shard_uneven_global_batch_raises_naming_sizes():
    with pytest.raises(ValueError, match="global batch of 5 does not split into 2"):
        dist.shard(np.arange(5), 0, 2)


def test_replica_expectations_follow_bn_mode_and_synchronized_bn():
    plain, sync = dist.ReplicaOptions(), dist.ReplicaOptions(synchronized_bn=True)
    expected = {  # written by hand from the strategy table in README.md
        "frozen": "match", "feature_extraction": "match", "partial": "match",
        "bn_adapt": "differ", "full": "differ", "naive": "differ"}
    for fw in ("tf", "torch"):
        assert {s: dist.replica_expectation(s, fw, plain) for s in expected} == expected
    assert dist.replica_expectation("full", "tf", sync) == "match"
    assert dist.replica_expectation("bn_adapt", "tf", sync) == "match"
    assert dist.replica_expectation("full", "torch", sync) == "differ"  # no SyncBatchNorm on CPU


def test_failure_injection_parse_bad_value_raises_naming_variable():
    assert dist.parse_failure_injection("1:3:2") == (1, 3, 2)
    assert dist.parse_failure_injection("1:hang:0") == (1, dist.HANG, 0)
    with pytest.raises(ValueError, match=dist.FAIL_ENV):
        dist.parse_failure_injection("rank1")


def _record(steps: int, heldout_at: tuple[int, ...], config: RunConfig) -> RunRecord:
    """A hand-made frozen torch record: ``steps`` per-step losses, held-out at ``heldout_at``."""
    return RunRecord("torch", "frozen", "tinyconv", asdict(config),
                     steps=[StepRecord(i, 2.0 - 0.1 * i, 1.9 - 0.1 * i) for i in range(steps)],
                     heldout=[HeldOut(s, 1.5, 0.5) for s in heldout_at])


def _replicated(record: RunRecord, replica_bn=None) -> dist.ReplicaRecord:
    bn = [{"base.block1.bn.running_mean": [0.5, -0.25]}] * 2 if replica_bn is None else replica_bn
    return dist.ReplicaRecord(record, dist.ReplicaOptions(), "test launcher", replica_bn=bn,
                              saved_bn=bn[0] if bn else {})


@pytest.mark.parametrize("single, replicated, message", [
    pytest.param((5, (0, 5)), (2, (0, 5)), "the replicated record is short: 2 per-step losses, "
                 "the single-process record has 5", id="replicated-steps"),
    pytest.param((2, (0, 5)), (5, (0, 5)), "the single-process record is short: 2 per-step "
                 "losses, the replicated record has 5", id="single-steps"),
    pytest.param((5, (0, 5)), (5, (0,)), "the replicated record is short: 1 held-out "
                 "evaluations, the single-process record has 2", id="replicated-heldout"),
])
def test_compare_replicas_short_record_raises_naming_record_and_both_lengths(single, replicated,
                                                                               message):
    """A record cut short (a rank that stopped writing) must not be compared on its prefix."""
    config = RunConfig(strategy="frozen", steps=5, checkpoint="x")
    with pytest.raises(ValueError) as caught:
        dist.compare_replicas(_record(*single, config), _replicated(_record(*replicated, config)))
    assert str(caught.value) == f"compare_replicas frozen[torch] x2: {message}"


@pytest.mark.parametrize("counts, rank", [((3, 2), 1), ((2, 3), 0)], ids=["rank1-short", "rank0-short"])
def test_merge_ranks_rank_with_missing_results_raises_naming_rank_and_counts(counts, rank):
    results = [[{"key": f"e{i}", "rank": r} for i in range(n)] for r, n in enumerate(counts)]
    with pytest.raises(dist.DistributedError,
                       match=fr"^L: rank {rank} wrote 2 results for 3 entries$"):
        dist.merge_ranks("L", 3, results)
    merged = dist.merge_ranks("L", 2, [r[:2] for r in results])
    assert [[r["rank"] for r in m["ranks"]] for m in merged] == [[0, 1], [0, 1]]


def _float32_stats(*values: float) -> list[float]:
    """BN statistic values as a worker reports them: float32 values, widened to float64."""
    return np.asarray(values, np.float32).astype(np.float64).tolist()


def test_bn_mismatches_one_float32_ulp_on_rank_1_is_named():
    rank0 = {"base.block1.bn.running_mean": _float32_stats(0.5, -0.25, 3.0),
             "base.block1.bn.running_var": _float32_stats(1.5, 2.0, 0.75)}
    rank1 = {k: list(v) for k, v in rank0.items()}
    assert dist.bn_mismatches([rank0, rank1], count=2) == []
    rank1["base.block1.bn.running_var"][2] = float(np.nextafter(np.float32(0.75), np.float32(1)))
    assert dist.bn_mismatches([rank0, rank1], count=2) == [  # 0.75 + 2**-24: one float32 ulp
        ("replica 1: base.block1.bn.running_var differs in 1 of 3 elements (first at 2: "
         "0.7500000596046448, expected 0.75)")]
    record = _replicated(_record(5, (0, 5), RunConfig(strategy="frozen", steps=5,
                                                      checkpoint="x")), [rank0, rank1])
    assert record.bn_mismatches() == dist.bn_mismatches([rank0, rank1])
    cmp = dist.compare_replicas(record.record, record)  # stored statistics: a failure
    assert cmp.failures == ["frozen[torch] x2: BN statistics on stored statistics must be the "
                            "same on every replica, bit for bit: " + record.bn_mismatches()[0]]


def test_bn_mismatches_missing_replica_empty_or_other_keys_are_mismatches():
    """Where replica_spread() is 0: one replica, no statistics, keys that do not match."""
    stats = {"base.block1.bn.running_mean": _float32_stats(0.5, -0.25)}
    other = {"base.block2.bn.running_mean": _float32_stats(0.5, -0.25)}
    assert dist.bn_mismatches([stats], count=2) == ["BN statistics of 1 replicas, expected 2"]
    assert dist.bn_mismatches([{}, {}], count=2) == ["no BN statistics to compare"]
    assert dist.bn_mismatches([stats, other]) == [
        "replica 1: missing base.block1.bn.running_mean",
        "replica 1: unexpected base.block2.bn.running_mean"]
    assert dist.bn_mismatches([stats, {"base.block1.bn.running_mean": [0.5]}]) == [
        "replica 1: base.block1.bn.running_mean shape (1,), expected (2,)"]
    assert dist.bn_mismatches([stats, stats], reference=other) == [
        f"replica {i}: {what} base.block{b}.bn.running_mean"
        for i in (0, 1) for what, b in (("missing", 2), ("unexpected", 1))]


# --- torch DDP against one process ------------------------------------------------------


def _checkpoint_bn(checkpoint) -> dict[str, list[float]]:
    """The starting checkpoint's BN statistics (the hand-listed tinyconv keys): what every
    replica of a stored-statistics run must still hold, bit for bit."""
    from strategy_oracle import TINY_BN_STATS

    from shared.checkpoint import load_checkpoint

    tensors, _ = load_checkpoint(checkpoint)
    return {k: np.asarray(tensors[k], np.float64).tolist() for k in TINY_BN_STATS}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["frozen", "feature_extraction", "partial"])
def test_ddp_stored_bn_strategy_matches_single_process_losses(replica_runs, run_record, strategy,
                                                             own_envelope, tinyconv_checkpoint,
                                                             record_property):
    """Judged both ways: within REPLICA_STEP_ATOL (a few steps on stored statistics) and
    within torch's own rounding envelope of the single run (what compare --replicas uses)."""
    replicated = replica_runs["torch"][strategy]
    single = _single(run_record, "torch", strategy)
    cmp = dist.compare_replicas(single, replicated)
    record_property("measured", cmp.max_diff)
    assert cmp.expected == "match" and cmp.tolerance == "REPLICA_STEP_ATOL" and cmp.ok, cmp.failures
    assert cmp.max_diff <= REPLICA_STEP_ATOL
    judged = dist.compare_replicas(single, replicated, own_envelope("torch", strategy))
    assert judged.tolerance == "ENVELOPE" and judged.ok, judged.failures
    assert replicated.record.train_losses[0] > replicated.record.train_losses[-1]  # it learned
    # stored statistics: both ranks still hold the checkpoint's, bit for bit
    assert replicated.bn_mismatches(_checkpoint_bn(tinyconv_checkpoint)) == []


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["bn_adapt", "full"])
def test_ddp_batch_stat_strategy_differs_from_single_process(replica_runs, run_record, strategy,
                                                            record_property):
    cmp = dist.compare_replicas(_single(run_record, "torch", strategy), replica_runs["torch"][strategy])
    record_property("measured", cmp.max_diff)
    assert cmp.expected == "differ" and cmp.ok, cmp.failures
    assert cmp.max_diff > TRAP_MIN_GAP, f"per-rank BN statistics moved the losses only {cmp.max_diff:.3g}"


@pytest.mark.slow
def test_ddp_saved_bn_stats_are_rank_0s_and_differ_from_rank_1s(replica_runs, record_property):
    full = replica_runs["torch"]["full"]
    record_property("measured", full.replica_spread())
    assert full.saved_matches() == ["replica 0"]
    assert full.replica_spread() > TRAP_MIN_GAP  # rank 1 updated them from its own shard


def _spread(a: dict | list, b: dict | list) -> float:
    """Largest |a - b| over BN statistics (a dict of lists, or one flat list)."""
    if isinstance(a, dict):
        return max((_spread(a[k], b[k]) for k in a), default=0.0)
    return float(np.max(np.abs(np.subtract(a, b))))


@pytest.mark.slow
def test_ddp_forward_buffer_sync_overwrites_rank_1_bn_stats_with_rank_0s(replica_runs,
                                                                        record_property):
    """Trap: with DDP's default (forward_sync_buffers=True, or the deprecated
    broadcast_buffers=True), any forward (eval mode, no_grad) copies rank 0's BN statistics to
    every rank; with False each rank keeps its own. The runs pass the installed torch's flag,
    and every rank starts from the same statistics, so DDP's copy at the wrap changes nothing."""
    from torch_impl.distributed import BUFFER_SYNC_FLAG

    on, off = replica_runs["torch"]["full"], replica_runs["torch"]["full_no_broadcast"]
    assert [e["ddp_buffer_sync"] for e in on.extra + off.extra] == (
        [f"{BUFFER_SYNC_FLAG}=True"] * 2 + [f"{BUFFER_SYNC_FLAG}=False"] * 2)
    for run in (on, off):
        assert _spread(run.extra[0]["bn_at_wrap"], run.extra[1]["bn_at_wrap"]) == 0.0
    rank0 = on.replica_bn[0]
    after = on.extra[1]["bn_after_one_more_forward"]
    assert dist.bn_mismatches([after], reference=rank0) == []  # rank 0's, bit for bit
    kept = off.extra[1]["bn_after_one_more_forward"]
    spread = _spread(kept, off.replica_bn[0])
    assert spread > TRAP_MIN_GAP, f"{BUFFER_SYNC_FLAG}=False: rank 1 still {spread:.3g} from rank 0"
    record_property("measured", f"after one more forward: True 0.0, False {spread:.3g}")


def _flag_stages(replica_runs) -> dict[str, dict[str, float]]:
    """Per way of passing DDP's buffer flag: rank 1's BN statistics' distance from rank 0's at
    each stage of the probe, and from its own before the wrap / after its local update."""
    rank0, rank1 = replica_runs["torch"]["ddp_buffer_flags"]["ranks"]
    out = {}
    for name in rank0:
        a, b = rank0[name], rank1[name]
        out[name] = {stage: _spread(a[stage], b[stage]) for stage in
                     ("before_wrap", "after_wrap", "after_local_update", "after_forward")}
        out[name]["wrap_kept_own"] = _spread(b["before_wrap"], b["after_wrap"])
        out[name]["forward_kept_own"] = _spread(b["after_local_update"], b["after_forward"])
    return out


def _torch_settings() -> list[str]:
    from torch_impl.distributed import BUFFER_SYNC_FLAG

    names = ["default", "broadcast_buffers=True", "broadcast_buffers=False"]
    return names + (["forward_sync_buffers=True", "forward_sync_buffers=False"]
                    if BUFFER_SYNC_FLAG == "forward_sync_buffers" else [])


@pytest.mark.slow
def test_ddp_buffer_flags_wrap_copies_rank_0s_buffers_except_broadcast_buffers_false(
        replica_runs, record_property):
    """Trap (torch 2.14.1): at initialisation DDP copies rank 0's buffers to every rank under
    every setting but broadcast_buffers=False; forward_sync_buffers=False still copies them."""
    stages = _flag_stages(replica_runs)
    assert list(stages) == _torch_settings()
    for name, s in stages.items():
        assert s["before_wrap"] > TRAP_MIN_GAP, (name, s)  # rank-local statistics to start from
        if name == "broadcast_buffers=False":
            assert s["after_wrap"] == s["before_wrap"] and s["wrap_kept_own"] == 0.0, s
        else:
            assert s["after_wrap"] == 0.0, (name, s)
    record_property("measured", {n: (s["before_wrap"], s["after_wrap"]) for n, s in stages.items()})


@pytest.mark.slow
def test_ddp_buffer_flags_every_forward_copies_rank_0s_buffers_unless_false(replica_runs,
                                                                           record_property):
    """Trap (torch 2.14.1): after a rank-local update, one more forward of the wrapped model
    (eval mode, no_grad) copies rank 0's buffers under the default and either flag True; under
    either flag False rank 1 keeps its own, bit for bit."""
    stages = _flag_stages(replica_runs)
    for name, s in stages.items():
        assert s["after_local_update"] > TRAP_MIN_GAP, (name, s)
        if name.endswith("=False"):
            assert s["after_forward"] == s["after_local_update"], (name, s)
            assert s["forward_kept_own"] == 0.0, (name, s)
        else:
            assert s["after_forward"] == 0.0, (name, s)
    record_property("measured", {n: (s["after_local_update"], s["after_forward"])
                                 for n, s in stages.items()})


@pytest.mark.slow
def test_ddp_broadcast_buffers_warns_future_warning_forward_sync_buffers_does_not(replica_runs):
    """Trap (torch 2.14.1): passing broadcast_buffers at all (True or False) warns; the
    default and forward_sync_buffers do not (where torch has it: else nothing warns)."""
    from torch_impl.distributed import BUFFER_SYNC_FLAG

    for rank in replica_runs["torch"]["ddp_buffer_flags"]["ranks"]:
        for name, stages in rank.items():
            warned = stages["future_warnings"]
            if name.startswith("broadcast_buffers") and BUFFER_SYNC_FLAG != "broadcast_buffers":
                assert len(warned) == 1 and "forward_sync_buffers" in warned[0], (name, warned)
                assert "still syncs buffers at init" in warned[0], warned
            else:
                assert warned == [], (name, warned)


@pytest.mark.slow
def test_ddp_refuses_module_without_trainable_parameter(replica_runs):
    """Trap: DDP(model.base) of a frozen base raises; feature_extraction wraps the head only."""
    for rank in replica_runs["torch"]["ddp_no_trainable"]["ranks"]:
        assert "doesn't have any parameter that requires a gradient" in rank["base_error"]
        assert rank["whole_model_accepted"]


@pytest.mark.slow
def test_ddp_frozen_parameters_need_no_find_unused_parameters(replica_runs):
    """Trap: requires_grad=False parameters are never waited for; an unused TRAINABLE one
    fails the second step unless find_unused_parameters=True."""
    for rank in replica_runs["torch"]["ddp_unused_parameters"]["ranks"]:
        assert rank["frozen_unused"]["error_at_step"] is None
        assert rank["trainable_unused"]["error_at_step"] == 1
        assert "find_unused_parameters=True" in rank["trainable_unused"]["error"]
        assert rank["trainable_unused_find"]["error_at_step"] is None


@pytest.mark.slow
def test_ddp_sync_batchnorm_refused_on_cpu(replica_runs):
    """Trap: DDP refuses a CPU model converted to SyncBatchNorm (not measured on a GPU here)."""
    for rank in replica_runs["torch"]["ddp_sync_batchnorm_cpu"]["ranks"]:
        assert rank["error"] == "SyncBatchNorm layers only work with GPU modules"


def test_torch_sync_batchnorm_without_process_group_is_plain_batchnorm():
    """Trap: outside a process group SyncBatchNorm silently normalises each process's batch
    alone (bit-identical to BatchNorm2d); CPU is refused only inside one (next test)."""
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 2 + 1
    sync, plain = nn.SyncBatchNorm(3), nn.BatchNorm2d(3)
    assert torch.equal(sync(x), plain(x))
    assert torch.equal(sync.running_mean, plain.running_mean)


@pytest.mark.slow
def test_ddp_sync_batchnorm_training_forward_on_cpu_raises_in_process_group(replica_runs):
    for rank in replica_runs["torch"]["ddp_sync_batchnorm_cpu"]["ranks"]:
        assert rank["forward_error"].startswith("SyncBatchNorm expected input tensor to be on GPU")


# --- tf MirroredStrategy against one process ----------------------------------------------


@pytest.mark.slow
def test_mirrored_frozen_matches_single_process_losses(replica_runs, run_record, own_envelope,
                                                       tinyconv_checkpoint, record_property):
    replicated = replica_runs["tf"]["frozen"]
    single = _single(run_record, "tf", "frozen")
    cmp = dist.compare_replicas(single, replicated)
    record_property("measured", cmp.max_diff)
    assert cmp.expected == "match" and cmp.ok, cmp.failures
    assert cmp.max_diff <= REPLICA_STEP_ATOL
    judged = dist.compare_replicas(single, replicated, own_envelope("tf", "frozen"))
    assert judged.tolerance == "ENVELOPE" and judged.ok, judged.failures
    with pytest.raises(ValueError, match="judged against tf's own rounding envelope, got torch's"):
        dist.compare_replicas(single, replicated, own_envelope("torch", "frozen"))
    assert replicated.record.train_losses[0] > replicated.record.train_losses[-1]
    # stored statistics: both replica copies still hold the checkpoint's, bit for bit
    assert replicated.bn_mismatches(_checkpoint_bn(tinyconv_checkpoint)) == []


@pytest.mark.slow
def test_mirrored_full_differs_from_single_process(replica_runs, run_record, record_property):
    cmp = dist.compare_replicas(_single(run_record, "tf", "full"), replica_runs["tf"]["full"])
    record_property("measured", cmp.max_diff)
    assert cmp.expected == "differ" and cmp.ok, cmp.failures
    assert cmp.max_diff > TRAP_MIN_GAP


@pytest.mark.slow
def test_mirrored_full_synchronized_bn_matches_single_process(replica_runs, run_record,
                                                             own_envelope, tinyconv_checkpoint,
                                                             record_property):
    """Synchronized moments are summed per replica, then across: the same maths in another
    order, judged against TensorFlow's own rounding envelope of the single run (it needs
    one)."""
    synced = replica_runs["tf"]["full_sync"]
    single = _single(run_record, "tf", "full")
    with pytest.raises(ValueError, match="judged against the single run's rounding envelope; "
                                         "none given"):
        dist.compare_replicas(single, synced)
    cmp = dist.compare_replicas(single, synced, own_envelope("tf", "full"))
    record_property("measured", cmp.max_diff)
    assert cmp.expected == "match" and cmp.tolerance == "ENVELOPE" and cmp.ok, cmp.failures
    unsynced = dist.compare_replicas(_single(run_record, "tf", "full"), replica_runs["tf"]["full"])
    assert cmp.max_diff < TRAP_MIN_GAP < unsynced.max_diff  # the flag is what closes the gap
    # every replica stored the global batch's moments: both copies identical, bit for bit
    assert synced.bn_mismatches() == []
    assert set(synced.replica_bn[0]) == set(_checkpoint_bn(tinyconv_checkpoint))


@pytest.mark.slow
def test_mirrored_bn_replicas_drift_and_a_read_returns_replica_0(replica_runs, record_property):
    """Trap: per-replica BN statistics drift apart silently; get_weights/saving read replica 0."""
    full = replica_runs["tf"]["full"]
    record_property("measured", full.replica_spread())
    assert full.replica_spread() > TRAP_MIN_GAP
    assert full.saved_matches() == ["replica 0"]
    assert full.extra[0]["devices"] == ["/device:CPU:0", "/device:CPU:1"]


@pytest.mark.slow
def test_keras_data_parallel_is_a_silent_no_op_on_tf_backend(replica_runs):
    """Trap: keras.distribution.DataParallel over 2 CPU devices is accepted, yet variables stay
    plain (not mirrored), one replica runs, and the losses are bit-identical to no distribution."""
    probe = replica_runs["tf"]["keras_data_parallel"]["ranks"][0]
    assert len(probe["devices"]) == 2
    assert probe["variable_type"] == "ResourceVariable"
    assert probe["replicas_in_sync"] == 1
    assert probe["max_loss_diff"] == 0.0


# --- multi-process hygiene ----------------------------------------------------------------


@pytest.mark.slow
def test_cli_rank_dying_mid_run_one_line_error_exit_2_no_report(tinyconv_checkpoint, tmp_path):
    token = uuid.uuid4().hex
    out = tmp_path / "record.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), dist.FAIL_ENV: "1:3:1", MARK: token}
    proc = subprocess.run(
        [sys.executable, "-m", "shared.cli", "run", "--framework", "torch", "--strategy", "frozen",
         "--steps", "3", "--replicas", "2", "--checkpoint", str(tinyconv_checkpoint),
         "--json", str(out)], check=False, capture_output=True, text=True, env=env,
        timeout=2 * (dist.TIMEOUT_S + dist.TIMEOUT_PER_ENTRY_S))  # past the job's own deadline
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "rank 1 exited with status 3" in lines[0], proc.stderr
    assert not out.exists() and not list(tmp_path.iterdir())
    assert _our_processes(token) == []


@pytest.mark.slow
def test_successful_launches_leave_no_process_behind(replica_runs):
    assert replica_runs["torch"] and replica_runs["tf"]
    assert _our_processes(FIXTURE_TOKEN) == []


@pytest.mark.slow
def test_hung_rank_times_out_with_message_and_leaves_no_process(tinyconv_checkpoint):
    token = uuid.uuid4().hex
    deadline = 3.0
    start = time.monotonic()
    with pytest.raises(dist.DistributedError, match=r"no result after 3 s \(a hung rank\?\)"):
        dist.run_job("torch", {"frozen": (_config(tinyconv_checkpoint, "frozen"), dist.ReplicaOptions())},
                     timeout_s=deadline, env={dist.FAIL_ENV: "1:hang:0", MARK: token})
    assert time.monotonic() - start < deadline + 2 * dist.KILL_GRACE_S  # SIGTERM, then SIGKILL
    assert _our_processes(token) == []


# --- audit hazards for data-parallel models ----------------------------------------------


@pytest.fixture
def one_rank_group(tmp_path):
    """A real gloo process group of world size 1 in this process (DDP needs one)."""
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                             world_size=1)
    try:
        yield
    finally:
        tdist.destroy_process_group()


def _tinyconv(strategy: str):
    from torch_impl.freeze import apply_strategy
    from torch_impl.model import build_model

    return apply_strategy(build_model("tinyconv", 5), strategy)


def test_audit_ddp_broadcast_with_frozen_bn_on_batch_stats_flags_hazard(one_rank_group):
    from torch.nn.parallel import DistributedDataParallel

    from torch_impl.audit import audit

    naive = DistributedDataParallel(_tinyconv("naive"))  # frozen params, BN left in train()
    report = audit(naive)
    assert "TORCH_DDP_BROADCAST_FROZEN_BATCH_STATS" in report.codes()
    hazard = next(h for h in report.hazards if h.code == "TORCH_DDP_BROADCAST_FROZEN_BATCH_STATS")
    assert hazard.layers == ("module.base.block1.bn", "module.base.block2.bn", "module.base.block3.bn")
    assert "rank 0" in hazard.message and "eval" in hazard.fix
    # the fixes: stored statistics (pinned eval), or no buffer sync at each forward
    assert "TORCH_DDP_BROADCAST_FROZEN_BATCH_STATS" not in audit(
        DistributedDataParallel(_tinyconv("frozen"))).codes()


@pytest.mark.parametrize("flag", ["forward_sync_buffers", "broadcast_buffers"])
def test_audit_ddp_buffer_hazard_follows_either_flag(one_rank_group, flag):
    """The hazard reads what DDP will do, whichever keyword built it (torch 2.14 stores the
    deprecated broadcast_buffers as forward_sync_buffers, and warns)."""
    from torch.nn.parallel import DistributedDataParallel

    from torch_impl.audit import audit
    from torch_impl.distributed import BUFFER_SYNC_FLAG

    if flag not in inspect.signature(DistributedDataParallel).parameters:
        pytest.skip(f"this torch's DistributedDataParallel has no {flag}")
    deprecated = flag == "broadcast_buffers" and BUFFER_SYNC_FLAG != flag
    codes = {}
    for sync in (True, False):
        with pytest.warns(FutureWarning, match="broadcast_buffers") if deprecated else \
                warnings.catch_warnings():
            if not deprecated:
                warnings.simplefilter("error", FutureWarning)
            wrapped = DistributedDataParallel(_tinyconv("naive"), **{flag: sync})
        codes[sync] = audit(wrapped).codes()
    assert "TORCH_DDP_BROADCAST_FROZEN_BATCH_STATS" in codes[True]
    assert "TORCH_DDP_BROADCAST_FROZEN_BATCH_STATS" not in codes[False]


def test_replica_wrap_passes_installed_torchs_buffer_flag_without_future_warning(one_rank_group):
    """What the data-parallel runs build: DDP with the installed torch's buffer keyword, and no
    FutureWarning (torch 2.14 warns for broadcast_buffers)."""
    from torch.nn.parallel import DistributedDataParallel

    from torch_impl.distributed import BUFFER_SYNC_FLAG, Replica

    has_new = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    assert BUFFER_SYNC_FLAG == ("forward_sync_buffers" if has_new else "broadcast_buffers")
    for sync in (True, False):
        model = _tinyconv("frozen")
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            wrapped = Replica(dist.ReplicaOptions(broadcast_buffers=sync), 0, 1).wrap(model, model)
        assert getattr(wrapped, BUFFER_SYNC_FLAG) is sync


def test_torch_convert_sync_batchnorm_keeps_eval_pin_and_requires_grad():
    """Trap (torch 2.14.1): the conversion reuses the Parameters and copies the training flag,
    so a pinned frozen base stays frozen (older releases were reported to reset requires_grad)."""
    model = _tinyconv("frozen")
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    bn = converted.base.block1.bn
    converted.train()
    assert isinstance(bn, nn.SyncBatchNorm) and not bn.training
    assert not bn.weight.requires_grad


def test_audit_sync_bn_conversion_that_lost_freeze_flags_hazard():
    from torch_impl.audit import audit

    reference = _tinyconv("frozen")
    kept = nn.SyncBatchNorm.convert_sync_batchnorm(_tinyconv("frozen"))
    assert "TORCH_SYNC_BN_CONVERSION_LOST_FREEZE" not in audit(kept, reference=reference).codes()
    lost = nn.SyncBatchNorm.convert_sync_batchnorm(_tinyconv("frozen"))
    lost.pin_inference([])  # a conversion that rebuilt the wrapper loses its eval pin ...
    lost.base.block2.bn.requires_grad_(True)  # ... or resets requires_grad (older torch)
    report = audit(lost, reference=reference)
    hazard = next(h for h in report.hazards if h.code == "TORCH_SYNC_BN_CONVERSION_LOST_FREEZE")
    assert hazard.layers == ("base.block1.bn", "base.block2.bn", "base.block3.bn")
    assert "convert" in hazard.fix


@pytest.mark.slow
def test_audit_mirrored_bn_updating_stats_flags_replica_hazard(replica_runs):
    codes = replica_runs["tf"]["keras_audit_mirrored"]["ranks"][0]
    assert "KERAS_MIRRORED_BN_REPLICA_STATS" in codes["full"]
    assert "KERAS_MIRRORED_BN_REPLICA_STATS" not in codes["frozen"]  # stored statistics
    assert "KERAS_MIRRORED_BN_REPLICA_STATS" not in codes["full_sync"]  # synchronized=True


@pytest.mark.slow
def test_logical_devices_cannot_be_configured_after_tensorflow_initialised(replica_runs):
    """Trap: why the MirroredStrategy runs need their own process. This one has run Keras
    (the fixture's single-process runs), so splitting its CPU is refused."""
    from tf_impl.distributed import configure_devices

    with pytest.raises(RuntimeError, match="initialised its devices already"):
        configure_devices(2)


# --- CLI plumbing (the launches above stand in for new ones) -------------------------------


@pytest.mark.slow
def test_cli_run_replicas_prints_replica_summary_and_writes_replica_record(
        replica_runs, tinyconv_checkpoint, tmp_path, monkeypatch, capsys):
    from shared.cli import main

    expected = replica_runs["torch"]["full"]
    calls = []

    def fake_run_replicas(framework, config, options=None, timeout_s=None):
        calls.append((framework, config, options))
        return expected

    monkeypatch.setattr(dist, "run_replicas", fake_run_replicas)
    out = tmp_path / "record.json"
    status = main(["run", "--framework", "torch", "--strategy", "full", "--steps", str(STEPS),
                   "--replicas", "2", "--checkpoint", str(tinyconv_checkpoint), "--json", str(out)])
    text = capsys.readouterr().out
    assert calls == [("torch", _config(tinyconv_checkpoint, "full"), dist.ReplicaOptions())]
    assert status == 0, text
    assert "2 replicas x 16" in text and "saved statistics = replica 0" in text
    from torch_impl.distributed import BUFFER_SYNC_FLAG

    assert "gloo, 127.0.0.1:" in text and f", DDP({BUFFER_SYNC_FLAG}=True);" in text  # which flag
    saved = dist.ReplicaRecord.from_dict(__import__("json").loads(out.read_text()))
    assert saved.replica_bn == expected.replica_bn and saved.record.steps == expected.record.steps


@pytest.mark.slow
def test_cli_compare_replicas_adds_replica_table_and_checks_replica_expectations(
        replica_runs, strategy_result, tinyconv_checkpoint, tmp_path, monkeypatch, capsys):
    import json

    from shared import matrix
    from shared.cli import main

    # the same deterministic single-process matrix, from the session cache
    monkeypatch.setattr(matrix, "run_matrix", lambda configs, note=None: [
        strategy_result(c.strategy, steps=c.steps) for c in configs.values()])
    records = {("tf", "frozen"): replica_runs["tf"]["frozen"],
               ("torch", "frozen"): replica_runs["torch"]["frozen"],
               ("tf", "full"): replica_runs["tf"]["full"],
               ("torch", "full"): replica_runs["torch"]["full"],
               ("tf", "full" + dist.SYNC_SUFFIX): replica_runs["tf"]["full_sync"]}
    monkeypatch.setattr(dist, "replica_jobs", lambda strategies, configs, replicas: records)
    status = main(["compare", "--strategies", "frozen,full", "--steps", str(STEPS), "--replicas", "2",
                   "--checkpoint", str(tinyconv_checkpoint), "--out", str(tmp_path), "--quiet"])
    text = capsys.readouterr().out
    assert status == 0, text
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {row["run"]: row for row in report["replicas"]["rows"]}
    assert list(rows) == ["frozen", "full", "full (synchronized BN)"]
    assert rows["frozen"]["torch_expected"] == "match" and rows["full"]["tf_expected"] == "differ"
    assert rows["full"]["torch_diff"] > TRAP_MIN_GAP >= rows["frozen"]["torch_diff"]
    assert rows["full (synchronized BN)"]["torch_single"] == "-"
    assert "## Data parallel: one process vs 2 replicas" in (tmp_path / "report.md").read_text()
    assert "one process vs data parallel" in text
