"""Data-parallel runs: the framework-free half (sharding, launching, collecting, expectations).

A replica runs the same ``train.run`` as the single-process run, on its shard
of each global batch; the real launchers are the only new part:

* torch: ``python -m torch.distributed.run`` (torchrun) starts one process per
  rank, gloo backend on 127.0.0.1 and a free port; each rank runs
  ``torch_impl.distributed`` (DistributedDataParallel).
* tf: one process, ``tf_impl.distributed``, configures N logical CPU devices
  before TensorFlow initialises its devices (which the caller's process has
  usually done already: that is why it is a subprocess) and trains under
  ``tf.distribute.MirroredStrategy`` with Keras ``fit``.

A job is a list of entries (a run or a probe); every process writes its results
to one JSON file in a temporary directory the parent reads back. The parent
starts the launcher in its own process group, gives it a deadline, and kills
the whole group whatever happens, so no rank outlives the call. A rank that
exits non-zero is reported in one line naming the rank and its exit status,
and no result is returned.

Global batch = the single-process batch (``RunConfig.batch_size``, 32): rank
``r`` of ``R`` takes the contiguous slice ``r`` of each global batch, the same
samples in the same order (Keras's distributed dataset splits a batch the same
way). Records are the single-process :class:`~shared.record.RunRecord` as rank
(replica) 0 sees it, with every replica's BatchNorm statistics at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from shared import tolerances as tol
from shared.frameworks import check_framework
from shared.io import atomic_write_json
from shared.record import RunConfig, RunRecord
from shared.strategies import get_strategy

__all__ = [
    "FAIL_ENV",
    "KILL_GRACE_S",
    "REPLICAS",
    "REPLICA_COLUMNS",
    "SYNC_SUFFIX",
    "TIMEOUT_PER_ENTRY_S",
    "TIMEOUT_S",
    "DistributedError",
    "ReplicaComparison",
    "ReplicaOptions",
    "ReplicaRecord",
    "bench_replicas",
    "bn_mismatches",
    "compare_replicas",
    "free_port",
    "inject_failure",
    "launch",
    "merge_ranks",
    "parse_failure_injection",
    "replica_cells",
    "replica_expectation",
    "replica_jobs",
    "replica_markdown",
    "replica_section",
    "replica_tolerance",
    "run_job",
    "run_replicas",
    "shard",
]

REPLICAS = 2
# The deadline of a job: TIMEOUT_S plus TIMEOUT_PER_ENTRY_S per run or probe. Imports
# take 5-15 s on 2 busy cores and a 30-step run 5-30 s; a rank that waits on a dead or
# hung peer never ends by itself, so every launch has one.
TIMEOUT_S = 120.0
TIMEOUT_PER_ENTRY_S = 60.0
# seconds a launcher's process group gets to end after SIGTERM (then SIGKILL, as long again)
KILL_GRACE_S = 5.0
# "RANK:STATUS:STEP": that rank exits with STATUS at the start of step STEP (tests only)
FAIL_ENV = "FREEZE_PARITY_FAIL_RANK"
WORKERS = {"torch": "torch_impl.distributed", "tf": "tf_impl.distributed"}


class DistributedError(ValueError):
    """A data-parallel job failed (a rank died, hung, or returned no result): one line."""


@dataclass(frozen=True)
class ReplicaOptions:
    replicas: int = REPLICAS
    # torch DDP: copy rank 0's buffers (BN statistics) to every rank at each forward. Passed as
    # forward_sync_buffers where the installed torch has it (2.14 deprecates broadcast_buffers),
    # else as broadcast_buffers (torch_impl.distributed.BUFFER_SYNC_FLAG). False under
    # forward_sync_buffers still copies them once, when DDP wraps the model: every rank
    # loads the same checkpoint, so that copy changes nothing in these runs
    broadcast_buffers: bool = True
    # torch DDP: look for parameters that got no gradient after each backward
    find_unused_parameters: bool = False
    # Keras: BatchNormalization(synchronized=True) (moments all-reduced over replicas)
    synchronized_bn: bool = False

    def __post_init__(self):
        if int(self.replicas) < 2:
            raise ValueError(f"replicas must be >= 2, got {self.replicas}")


@dataclass
class ReplicaRecord:
    """A data-parallel run: rank 0's RunRecord, plus what every replica ended with."""

    record: RunRecord
    options: ReplicaOptions
    launcher: str
    # per replica: canonical BN statistic key (base.block1.bn.running_mean) -> values
    replica_bn: list[dict[str, list[float]]] = field(default_factory=list)
    # what the saved model's BN statistics are (the framework's own read / rank 0's save)
    saved_bn: dict[str, list[float]] = field(default_factory=dict)
    # per process, measured facts of its engine (e.g. statistics after one more DDP forward)
    extra: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"record": self.record.to_dict(), "options": asdict(self.options),
                "launcher": self.launcher, "replica_bn": self.replica_bn,
                "saved_bn": self.saved_bn, "extra": self.extra}

    @classmethod
    def from_dict(cls, data: dict, where: str = "replica record") -> ReplicaRecord:
        try:
            return cls(RunRecord.from_dict(data["record"], where), ReplicaOptions(**data["options"]),
                       str(data["launcher"]), list(data["replica_bn"]), dict(data["saved_bn"]),
                       list(data.get("extra", [])))
        except (KeyError, TypeError) as exc:
            raise DistributedError(f"{where}: malformed result ({exc})") from None

    def replica_spread(self) -> float:
        """Largest difference of any BN statistic between replica 0 and another replica."""
        first = self.replica_bn[0]
        return max((float(np.max(np.abs(np.subtract(first[k], other[k]))))
                    for other in self.replica_bn[1:] for k in first), default=0.0)

    def bn_mismatches(self, reference: dict[str, list[float]] | None = None) -> list[str]:
        """How the replicas' BN statistics differ from ``reference`` (default replica 0's)
        bit for bit, one line each; [] when all ``options.replicas`` of them are identical.
        See :func:`bn_mismatches`."""
        return bn_mismatches(self.replica_bn, reference, self.options.replicas)

    def saved_matches(self) -> list[str]:
        """Which replicas' statistics the saved ones are bit-identical to ("replica 0", ...)."""
        found = [f"replica {i}" for i, stats in enumerate(self.replica_bn)
                 if stats.keys() == self.saved_bn.keys()
                 and all(np.array_equal(stats[k], self.saved_bn[k]) for k in stats)]
        if self.replica_bn and not found and all(
                np.allclose(np.mean([s[k] for s in self.replica_bn], axis=0), self.saved_bn[k],
                            rtol=0, atol=tol.SAME_FRAMEWORK_ATOL) for k in self.saved_bn):
            found.append("mean of replicas")
        return found


def bn_mismatches(replicas: list[dict[str, list[float]]],
                  reference: dict[str, list[float]] | None = None,
                  count: int | None = None) -> list[str]:
    """Every way ``replicas`` (canonical key -> values, one dict per replica) are not
    bit-identical to ``reference`` (default: replica 0's), one line each.

    A spread of 0 says nothing when a replica is missing, holds no statistics or other
    keys; so each replica must hold exactly the reference's keys (at least one), with the
    same shape and the same float64 bits in every element (one float32 ulp is a
    mismatch, as is -0.0 against 0.0). ``count``: how many replicas there must be.
    """
    lines = []
    if count is not None and len(replicas) != count:
        lines.append(f"BN statistics of {len(replicas)} replicas, expected {count}")
    if reference is None:
        reference = replicas[0] if replicas else {}
    if not reference:
        lines.append("no BN statistics to compare")
    for i, stats in enumerate(replicas):
        for what, keys in (("missing", reference.keys() - stats.keys()),
                           ("unexpected", stats.keys() - reference.keys())):
            if keys:
                lines.append(f"replica {i}: {what} {', '.join(sorted(keys))}")
        for key in sorted(reference.keys() & stats.keys()):
            want = np.asarray(reference[key], np.float64)
            got = np.asarray(stats[key], np.float64)
            if want.shape != got.shape:
                lines.append(f"replica {i}: {key} shape {got.shape}, expected {want.shape}")
                continue
            differ = np.flatnonzero(want.view(np.uint64) != got.view(np.uint64))
            if differ.size:
                j = int(differ[0])
                lines.append(f"replica {i}: {key} differs in {differ.size} of {want.size} "
                             f"elements (first at {j}: {float(got.flat[j])!r}, expected "
                             f"{float(want.flat[j])!r})")
    return lines


def shard(indices: np.ndarray, rank: int, replicas: int) -> np.ndarray:
    """Rank ``rank``'s contiguous slice of one global batch (equal slices)."""
    indices = np.asarray(indices)
    if replicas < 1 or not 0 <= rank < replicas:
        raise ValueError(f"shard: rank {rank} out of range for {replicas} replicas")
    if len(indices) % replicas:
        raise ValueError(f"shard: global batch of {len(indices)} does not split into "
                         f"{replicas} equal shards")
    size = len(indices) // replicas
    return indices[rank * size:(rank + 1) * size]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HANG = -1  # the injected "status" of a rank that stops and waits forever


def parse_failure_injection(text: str | None) -> tuple[int, int, int] | None:
    """``"1:3:2"`` -> (rank 1, exit status 3, at step 2); ``"1:hang:2"``: rank 1 hangs there."""
    if not text:
        return None
    parts = [p.strip() for p in text.split(":")]
    if len(parts) == 3 and parts[1] == "hang":
        parts[1] = str(HANG)
    if len(parts) != 3 or not all(p.lstrip("-").isdigit() for p in parts):
        raise ValueError(f"{FAIL_ENV}={text!r}: expected RANK:STATUS:STEP or RANK:hang:STEP, "
                         f"e.g. 1:3:2")
    return int(parts[0]), int(parts[1]), int(parts[2])


def inject_failure(status: int) -> None:
    """Die with ``status`` now, as a crashing rank does (no cleanup), or hang forever."""
    sys.stderr.flush()
    if status == HANG:
        while True:
            time.sleep(3600)
    os._exit(status)


def _command(framework: str, replicas: int, job: Path, out: Path) -> tuple[list[str], str]:
    worker = ["-m", WORKERS[framework], str(job), str(out)]
    if framework == "tf":
        return [sys.executable, *worker], f"tf MirroredStrategy ({replicas} logical CPU devices)"
    port = free_port()
    return ([sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
             f"--nproc-per-node={replicas}", "--master-addr=127.0.0.1", f"--master-port={port}",
             "--max-restarts=0", "--monitor-interval=0.2", *worker],
            f"torch DDP via torchrun ({replicas} ranks, gloo, 127.0.0.1:{port})")


# torchrun's failure summary: "rank      : 1 (local_rank: 1)" / "exitcode  : 3 (pid: ...)"
_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)", re.MULTILINE)
_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)", re.MULTILINE)


def _failure_line(framework: str, launcher: str, status: int, stderr: str) -> str:
    # torchrun lists every failed rank (the others it stopped with SIGTERM) and then the
    # "Root Cause (first observed failure)": the rank that died first
    cause = stderr.rsplit("Root Cause", 1)[-1]
    ranks, codes = _RANK.findall(cause), _EXIT.findall(cause)
    if framework == "torch" and ranks and codes:
        return (f"{launcher}: rank {ranks[0]} exited with status {codes[0]}; "
                f"no result (torchrun exit status {status})")
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    where = "the process holding every replica" if framework == "tf" else "the launcher"
    return (f"{launcher}: {where} exited with status {status}; no result"
            + (f" (last message: {last[:200]})" if last else ""))


def _kill_group(proc: subprocess.Popen) -> None:
    """End every process of the launcher's group: SIGTERM, then SIGKILL (also after a
    normal exit, for any rank the launcher left behind)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=KILL_GRACE_S)


def launch(framework: str, entries: list[dict], replicas: int = REPLICAS,
           timeout_s: float | None = None, env: dict | None = None) -> list[dict]:
    """Run ``entries`` in the framework's worker(s); rank 0's results, one per entry.

    Every rank's results come back too, under ``"ranks"`` of each result. Raises
    DistributedError (one line) on a non-zero exit, a timeout, or a missing result.
    ``timeout_s`` None: TIMEOUT_S + TIMEOUT_PER_ENTRY_S per entry.
    """
    check_framework(framework)
    if timeout_s is None:
        timeout_s = TIMEOUT_S + TIMEOUT_PER_ENTRY_S * len(entries)
    with tempfile.TemporaryDirectory(prefix=f"freeze-parity-{framework}-replicas-") as tmp:
        tmp = Path(tmp)
        job, out = tmp / "job.json", tmp / "out"
        out.mkdir()
        atomic_write_json(job, {"replicas": replicas, "entries": entries})
        command, launcher = _command(framework, replicas, job, out)
        run_env = {**os.environ, **(env or {})}
        run_env.setdefault("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
        stderr_path = tmp / "stderr.txt"
        with open(stderr_path, "w+", encoding="utf-8", errors="replace") as stderr:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                    env=run_env, start_new_session=True)
            try:
                status = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise DistributedError(f"{launcher}: no result after {timeout_s:g} s (a hung "
                                       f"rank?); stopped its process group") from None
            finally:
                _kill_group(proc)
            stderr.seek(0)
            text = stderr.read()
        if status != 0:
            raise DistributedError(_failure_line(framework, launcher, status, text))
        results = []
        for rank in range(replicas if framework == "torch" else 1):
            path = out / f"rank{rank}.json"
            if not path.is_file():
                raise DistributedError(f"{launcher}: rank {rank} exited 0 but wrote no result")
            results.append(json.loads(path.read_text(encoding="utf-8")))
    return merge_ranks(launcher, len(entries), results)


def merge_ranks(launcher: str, entries: int, results: list[list[dict]]) -> list[dict]:
    """Rank 0's result per entry, each with every rank's under ``"ranks"``.

    Every rank must have written one result per entry: a short (or long) one is a
    DistributedError naming the rank and both counts, never a truncated job.
    """
    for rank, result in enumerate(results):
        if len(result) != entries:
            raise DistributedError(f"{launcher}: rank {rank} wrote {len(result)} results for "
                                   f"{entries} entries")
    return [{**result, "launcher": launcher, "ranks": [r[i] for r in results]}
            for i, result in enumerate(results[0])]


def run_job(framework: str, runs: dict[str, tuple[RunConfig, ReplicaOptions]],
            probes: tuple[str, ...] = (), timeout_s: float | None = None,
            env: dict | None = None) -> dict:
    """Many runs (and named probes) in ONE launch: key -> ReplicaRecord (probes: key -> dict).

    Every run of a job must use the same number of replicas.
    """
    counts = {options.replicas for _, options in runs.values()} or {REPLICAS}
    if len(counts) != 1:
        raise ValueError(f"run_job: one replica count per job, got {sorted(counts)}")
    entries = [{"key": key, "kind": "run", "config": asdict(config), "options": asdict(options)}
               for key, (config, options) in runs.items()]
    entries += [{"key": name, "kind": "probe"} for name in probes]
    results = launch(framework, entries, counts.pop(), timeout_s, env)
    out = {}
    for entry, result in zip(entries, results, strict=True):
        if entry["kind"] == "run":
            ranks = result["ranks"]
            out[entry["key"]] = ReplicaRecord.from_dict(
                {**result, "replica_bn": [s for r in ranks for s in r["replica_bn"]],
                 "extra": [r["extra"] for r in ranks]}, f"{framework} {entry['key']}")
        else:
            out[entry["key"]] = {"ranks": [r["probe"] for r in result["ranks"]]}
    return out


def run_replicas(framework: str, config: RunConfig, options: ReplicaOptions | None = None,
                 timeout_s: float | None = None) -> ReplicaRecord:
    """One data-parallel run of ``config`` in ``framework``."""
    return run_job(framework, {"run": (config, options or ReplicaOptions())},
                   timeout_s=timeout_s)["run"]


# --- expectations ----------------------------------------------------------------------


def replica_expectation(strategy: str, framework: str, options: ReplicaOptions) -> str:
    """"match" (the single-process losses within REPLICA_STEP) or "differ" (above TRAP_MIN_GAP).

    BatchNorm on stored statistics computes the same function of each sample on
    every replica, and averaged gradients of equal shards are the global batch's
    gradient: the run matches. BatchNorm on batch statistics normalises each shard
    with that shard's moments: it differs, unless the moments are all-reduced
    (Keras ``synchronized=True``; torch SyncBatchNorm needs GPUs).
    """
    strategy_ = get_strategy(strategy)
    check_framework(framework)
    if strategy_.bn_mode == "stored":
        return "match"
    if framework == "tf" and options.synchronized_bn and strategy != "naive":
        return "match"
    return "differ"


def replica_tolerance(strategy: str, options: ReplicaOptions,
                      has_envelope: bool = False) -> tuple[str, float | None]:
    """The named tolerance a "match" is judged with: the single run's rounding envelope
    (``None``: the envelope decides; the same framework's, shared.matrix.envelope_of),
    which replicas' other summation order stays within wherever the maths is the same; it
    is required for synchronized BatchNorm on batch statistics, whose backward grows that
    rounding along the run. Without an envelope, REPLICA_STEP_ATOL: a few steps on stored
    statistics, which no point where rounding decides has been crossed in (100 steps of
    `partial` cross one: replicas then part by 2e-3, within the envelope)."""
    if has_envelope or (options.synchronized_bn and get_strategy(strategy).bn_mode == "batch"):
        return "ENVELOPE", None
    return "REPLICA_STEP_ATOL", tol.REPLICA_STEP_ATOL


@dataclass
class ReplicaComparison:
    strategy: str
    framework: str
    replicas: int
    expected: str  # "match" or "differ"
    tolerance: str
    max_diff: float  # largest |single - replicas| over per-step train/eval and held-out losses
    replica_spread: float
    saved_bn: list[str]
    failures: list[str] = field(default_factory=list)
    # a float32 difference outside the envelope that float64 shows to be rounding
    numerics: str = ""

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _loss_diffs(single: RunRecord, rec: RunRecord) -> list[float]:
    diffs = [abs(a - b) for a, b in zip(single.train_losses, rec.train_losses, strict=True)]
    diffs += [abs(a - b) for a, b in zip(single.eval_losses, rec.eval_losses, strict=True)]
    return diffs + [abs(a.loss - b.loss) for a, b in zip(single.heldout, rec.heldout, strict=True)]


def float64_replica_diff(framework: str, config: RunConfig, options: ReplicaOptions,
                         timeout_s: float | None = None) -> float:
    """The same data-parallel run and its single-process run in float64: their largest
    per-step or held-out loss difference (what the maths alone leaves)."""
    from dataclasses import replace

    from shared import frameworks

    config = config if isinstance(config, RunConfig) else RunConfig(**config)
    exact = replace(config, dtype="float64")
    rec = run_job(framework, {"run": (exact, options)}, (), timeout_s)["run"]
    single = frameworks.load(framework, "train").run(exact)
    return max(_loss_diffs(single, rec.record), default=0.0)


# why a synchronized-BN run's float32 leaves the single run's envelope where float64 agrees
SYNC_BN_NUMERICS = ("Keras's synchronized BatchNormalization computes the all-reduced "
                    "variance as E[x^2] - E[x]^2 in float32 (keras/src/backend/tensorflow/nn.py, "
                    "_compute_moments_sync), the single run tf.nn.moments' mean of squared "
                    "differences")


def compare_replicas(single: RunRecord, replicated: ReplicaRecord,
                     envelope=None, float64_diff=None) -> ReplicaComparison:
    """The data-parallel run against the single-process run of the same config.

    ``envelope`` (``shared.envelope.Envelope`` of ``single``, the same framework's): judges
    a "match" (``replica_tolerance``); a synchronized-BN run on batch statistics needs one.
    ``float64_diff`` (a callable, e.g. :func:`float64_replica_diff`): where a
    synchronized-BN run leaves the envelope, the same runs in float64 decide: within
    FLOAT64_RUN_ATOL the float32 difference is a numerics finding (``numerics``), else a
    failure.
    """
    rec = replicated.record
    if (single.framework, single.strategy) != (rec.framework, rec.strategy) or \
            single.config != rec.config:
        raise ValueError(f"compare_replicas: records are of different runs ({single.framework} "
                         f"{single.strategy} vs {rec.framework} {rec.strategy})")
    where = f"{rec.strategy}[{rec.framework}] x{replicated.options.replicas}"
    for what, ours, theirs in (("per-step losses", single.steps, rec.steps),
                               ("held-out evaluations", single.heldout, rec.heldout)):
        if len(ours) != len(theirs):  # zip would compare the common prefix and pass
            short, long_ = (("replicated", "single-process") if len(theirs) < len(ours)
                            else ("single-process", "replicated"))
            raise ValueError(f"compare_replicas {where}: the {short} record is short: "
                             f"{min(len(ours), len(theirs))} {what}, the {long_} record has "
                             f"{max(len(ours), len(theirs))}")
    max_diff = max(_loss_diffs(single, rec), default=0.0)
    expected = replica_expectation(rec.strategy, rec.framework, replicated.options)
    name, atol = replica_tolerance(rec.strategy, replicated.options, envelope is not None)
    cmp = ReplicaComparison(rec.strategy, rec.framework, replicated.options.replicas, expected,
                            name if expected == "match" else "TRAP_MIN_GAP",
                            max_diff, replicated.replica_spread(), replicated.saved_matches())
    if get_strategy(rec.strategy).bn_mode == "stored":  # no replica may update them
        cmp.failures += [f"{where}: BN statistics on stored statistics must be the same on "
                         f"every replica, bit for bit: {line}"
                         for line in replicated.bn_mismatches()]
    if expected == "match" and atol is None:
        if envelope is None:
            raise ValueError(f"compare_replicas {where}: a synchronized-BN run is judged "
                             f"against the single run's rounding envelope; none given")
        if envelope.framework != single.framework:
            raise ValueError(f"compare_replicas {where}: judged against {single.framework}'s "
                             f"own rounding envelope, got {envelope.framework}'s")
        from shared.envelope import judge_free_run

        free = judge_free_run(rec, single, envelope)  # replicas in tf's place: same checks
        outside = (f"{free.max_diff:.3g} apart ({free.max_ratio_at}: {free.max_ratio:.3g} x "
                   f"what {free.multiple:g} x the rounding envelope allows)")
        exact = (float64_diff() if not free.within and float64_diff is not None
                 and replicated.options.synchronized_bn else None)
        if exact is not None and exact <= tol.FLOAT64_RUN_ATOL:
            cmp.numerics = (f"{where}: float32 {outside}; in float64 {exact:.2g} apart (within "
                            f"FLOAT64_RUN_ATOL): rounding, not the maths: {SYNC_BN_NUMERICS}")
        elif not free.within:
            also = (f"; in float64 too: {exact:.3g} apart (FLOAT64_RUN_ATOL "
                    f"{tol.FLOAT64_RUN_ATOL:g})" if exact is not None else "")
            cmp.failures.append(f"{where}: expected the single-process losses within "
                                f"{free.multiple:g} x the rounding envelope, differs by "
                                f"{free.max_diff:.3g} ({free.max_ratio_at}: "
                                f"{free.max_ratio:.3g} x what it allows){also}")
    elif expected == "match" and max_diff > atol:
        cmp.failures.append(f"{rec.strategy}[{rec.framework}] x{cmp.replicas}: expected the "
                            f"single-process losses, differs by {max_diff:.3g} "
                            f"(tolerance {name} {atol:g})")
    if expected == "differ" and max_diff <= tol.TRAP_MIN_GAP:
        cmp.failures.append(f"{rec.strategy}[{rec.framework}] x{cmp.replicas}: expected per-replica "
                            f"BatchNorm statistics to change the losses, but they differ by only "
                            f"{max_diff:.3g} (TRAP_MIN_GAP {tol.TRAP_MIN_GAP:g})")
    return cmp


# --- the compare table's replica section ---------------------------------------------------

SYNC_SUFFIX = " (synchronized BN)"
# (key, title, format): one row per strategy, both frameworks' columns side by side
REPLICA_COLUMNS: tuple[tuple[str, str, str | None], ...] = (
    ("run", "strategy", None),
    *((k, t, f) for fw in ("tf", "torch") for k, t, f in (
        (f"{fw}_single", f"{fw} 1 process", ".4f"),
        (f"{fw}_replicas", f"{fw} replicas", ".4f"),
        (f"{fw}_diff", f"{fw} max Δ", ".3g"),
        (f"{fw}_spread", f"{fw} BN spread", ".3g"),
        (f"{fw}_expected", f"{fw} expected", None))),
    ("verdict", "verdict", None),
)
REPLICA_COLUMN_NOTES = (
    "1 process / replicas: training-mode loss of the last step, one process with the whole "
    "batch vs N replicas of batch/N each (same samples, same order); max Δ: largest absolute per-step train/eval or held-out loss "
    "difference between them; BN spread: largest difference of a BN statistic between replica "
    "0 and any other replica at the end; expected: declared (match: within the single run's "
    "rounding envelope, that framework's own; or differ by more than TRAP_MIN_GAP); saved BN "
    "statistics are replica 0's in both frameworks.")


def replica_section(singles: dict[tuple[str, str], RunRecord],
                    replicated: dict[tuple[str, str], ReplicaRecord],
                    envelopes: dict | None = None, float64: bool = False) -> dict:
    """Rows and failures of the replica table from ``(framework, key)`` -> records.

    ``key`` is a strategy name, or ``name + SYNC_SUFFIX`` for a synchronized-BN run
    (compared with the single-process run of ``name``, within ``envelopes[(framework,
    name)]``, that framework's rounding envelope of the single run). ``float64``: a
    synchronized-BN run outside the envelope is decided by the same runs in float64
    (:func:`float64_replica_diff`), its finding listed under ``numerics``.
    """
    keys = list(dict.fromkeys(key for _, key in replicated))
    envelopes = envelopes or {}
    rows, failures, numerics = [], [], []
    for key in keys:
        strategy = key.removesuffix(SYNC_SUFFIX)
        row, problems = {"run": key}, []
        for fw in ("tf", "torch"):
            if (fw, key) not in replicated:
                row.update({f"{fw}_{c}": "-" for c in ("single", "replicas", "diff", "spread",
                                                        "expected")})
                continue
            rec, single = replicated[(fw, key)], singles[(fw, strategy)]
            decide = (None if not float64 else
                      lambda fw=fw, single=single, rec=rec: float64_replica_diff(
                          fw, single.config, rec.options))
            cmp = compare_replicas(single, rec, envelopes.get((fw, strategy)), decide)
            row.update({f"{fw}_single": single.train_losses[-1],
                        f"{fw}_replicas": rec.record.train_losses[-1], f"{fw}_diff": cmp.max_diff,
                        f"{fw}_spread": cmp.replica_spread, f"{fw}_expected": cmp.expected})
            failures += cmp.failures
            problems += [fw] if cmp.failures else []
            if cmp.numerics:
                numerics.append(cmp.numerics)
                row["numerics"] = row.get("numerics", []) + [fw]
        row["verdict"] = ("FAIL: " + ", ".join(problems) if problems else
                          "ok; numerics: " + ", ".join(row["numerics"]) if row.get("numerics")
                          else "ok")
        rows.append(row)
    return {"columns": [{"key": k, "title": t, "format": f} for k, t, f in REPLICA_COLUMNS],
            "notes": REPLICA_COLUMN_NOTES, "rows": rows, "failures": failures,
            "numerics": numerics}


def replica_cells(section: dict) -> list[list[str]]:
    return [[str(row[k]) if f is None or isinstance(row[k], str) else format(float(row[k]), f)
             for k, _, f in REPLICA_COLUMNS] for row in section["rows"]]


def replica_markdown(section: dict) -> list[str]:
    lines = ["## Data parallel: one process vs 2 replicas", "",
             "| " + " | ".join(t for _, t, _ in REPLICA_COLUMNS) + " |",
             "|" + "|".join("---" if f is None else "---:" for _, _, f in REPLICA_COLUMNS) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in replica_cells(section)]
    found = [f"- numerics: {line}" for line in section.get("numerics", [])]
    return [*lines, "", section["notes"], *([""] + found if found else [])]


def replica_jobs(strategies: list[str], configs: dict[str, RunConfig], replicas: int,
                 timeout_s: float | None = None) -> dict[tuple[str, str], ReplicaRecord]:
    """Every strategy data-parallel in both frameworks (one launch each, concurrently), plus
    Keras ``full`` with synchronized BN: ``(framework, key)`` -> ReplicaRecord."""
    from concurrent.futures import ThreadPoolExecutor

    plain = ReplicaOptions(replicas=replicas)
    runs = {fw: {s: (configs[s], plain) for s in strategies} for fw in ("tf", "torch")}
    for s in strategies:
        if get_strategy(s).bn_mode == "batch" and s != "naive":
            runs["tf"][s + SYNC_SUFFIX] = (configs[s], ReplicaOptions(replicas=replicas,
                                                                     synchronized_bn=True))
    with ThreadPoolExecutor(2) as pool:
        jobs = {fw: pool.submit(run_job, fw, runs[fw], (), timeout_s) for fw in ("tf", "torch")}
        done = {fw: job.result() for fw, job in jobs.items()}
    order = [s for strategy in strategies
             for s in (strategy, strategy + SYNC_SUFFIX)]
    return {(fw, key): done[fw][key] for key in order for fw in ("tf", "torch") if key in done[fw]}


# --- cost: per-step time of the replicated run against one process ------------------------


def bench_replicas(framework: str, checkpoint: str, strategy: str = "frozen",
                   steps: tuple[int, int] = (10, 90), replicas: int = REPLICAS, repeats: int = 3,
                   timeout_s: float | None = None) -> dict:
    """Marginal per-step wall time, one process vs ``replicas``, timed in ONE launch.

    Per repeat, both configurations run ``steps[0]`` and ``steps[1]`` steps in the
    worker; the per-step figure is ``(T(long) - T(short)) / (long - short)``, so
    imports, model building, tracing and held-out evaluations at fixed points cancel
    (the held-out evaluations every 10 steps do not: both configurations pay them).
    The single-process runs happen in the same kind of process (torch: rank 0 while
    the other ranks wait), so both figures pay the same machine. Medians over repeats.
    """
    short, long_ = steps
    if not 0 < short < long_:
        raise ValueError(f"bench_replicas: steps must be 0 < short < long, got {steps}")
    options = ReplicaOptions(replicas=replicas)
    entries = []
    for repeat in range(repeats):
        for kind, opts in (("single", None), ("replicas", options)):
            for n in steps:
                config = RunConfig(strategy=strategy, steps=n, checkpoint=checkpoint)
                entries.append({"key": f"{kind}-{n}-{repeat}", "kind": "time",
                                "config": asdict(config), "options": opts and asdict(opts)})
    results = launch(framework, entries, replicas, timeout_s)
    seconds = {e["key"]: r["seconds"] for e, r in zip(entries, results, strict=True)}
    per_step = {kind: [(seconds[f"{kind}-{long_}-{i}"] - seconds[f"{kind}-{short}-{i}"])
                       / (long_ - short) for i in range(repeats)]
                for kind in ("single", "replicas")}
    ratios = [r / s for r, s in zip(per_step["replicas"], per_step["single"])]
    return {"framework": framework, "strategy": strategy, "replicas": replicas,
            "steps": list(steps), "repeats": repeats,
            "single_step_s": float(np.median(per_step["single"])),
            "replicas_step_s": float(np.median(per_step["replicas"])),
            "ratio": float(np.median(ratios)), "raw_seconds": seconds}
