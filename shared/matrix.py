"""The compare matrix: for each strategy, every run its verdict needs, and the verdict.

Per strategy (float32, what users run):

* the lockstep comparison (``shared.lockstep``): torch's ``train.run``, with
  Keras taking every step from torch's state; it decides the freezing
  semantics, step by step;
* Keras's own free run (``model.fit``), judged against torch's within the
  rounding envelope (``shared.envelope``), measured by torch reruns from
  one-ulp-perturbed starts (``ENVELOPE_SEEDS``, more up to
  ``ENVELOPE_MAX_SEEDS`` while the difference is outside);
* the float64 run from the same start, which says how far each framework's
  float32 departs from exact arithmetic.

``frozen`` and ``feature_extraction`` train the same head on the same
inference-mode features (the same maths, one computes the base every step):
``frozen`` takes its envelope reruns and float64 run from the cached path.

In float64 (``RunConfig.dtype``) the runs are the exactness proof instead:
lockstep with the float64 bounds, and the two free runs agree within
``FLOAT64_RUN_ATOL`` over the whole run; there is no envelope.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from shared import frameworks
from shared import tolerances as tol
from shared.archs import has_base_dropout
from shared.compare import Tolerance, compare_records, expectation_failures, expected_to_match
from shared.envelope import Envelope, FreeRun, envelope_from, judge_free_run
from shared.lockstep import LockstepRecord, ReferenceRun, lockstep
from shared.record import RunConfig, RunRecord
from shared.worker import TorchWorker

__all__ = ["EQUIVALENT", "FLOAT64_RUN", "WORKERS_ENV", "StrategyResult", "envelope_of",
           "exact_config", "run_matrix", "run_strategy", "verdict_run_config", "workers"]

# strategy -> the strategy whose envelope and float64 run it shares (the same maths)
EQUIVALENT = {"frozen": "feature_extraction"}
FLOAT64_RUN = Tolerance("FLOAT64_RUN", tol.FLOAT64_RUN_ATOL, 0.0)
# "0": every run in this process. Default: one worker process for the torch-only runs
# (envelope reruns, float64 runs) where the machine has a second core.
WORKERS_ENV = "FREEZE_PARITY_WORKERS"


@dataclass
class StrategyResult:
    strategy: str
    dtype: str
    tf: RunRecord
    torch: RunRecord
    lockstep: LockstepRecord
    free: FreeRun
    envelope: Envelope | None = None
    exact: RunRecord | None = None   # the float64 run from the same start (torch)
    expectations: dict[str, list[str]] = field(default_factory=dict)
    # an arch with dropout in its base (vit): each framework's run with it on (what users
    # run), judged against the declared train/eval expectations only; ``tf``, ``torch`` and
    # every verdict are then of the runs with the rates at 0 (RunConfig.base_dropout)
    dropout: dict[str, RunRecord] = field(default_factory=dict)

    @property
    def arch(self) -> str:
        return self.tf.arch

    @property
    def expected_to_match(self) -> bool:
        return expected_to_match(self.strategy, self.arch)

    @property
    def failures(self) -> list[str]:
        return (self.lockstep.failures + self.free.failures + self.expectations.get("tf", [])
                + self.expectations.get("torch", []))

    @property
    def findings(self) -> list[str]:
        """Numerics findings: one framework's float32 departing; never a failure."""
        out = [self.free.finding] if self.free.finding else []
        numerics = self.lockstep.numerics_events
        departing = [e for e in numerics if e.departs != "both"]
        if departing:
            by = sorted({e.departs for e in departing})
            worst = max(departing, key=lambda e: max(e.tf_departure, e.torch_departure))
            out.append(f"{self.strategy}: lockstep: at {len(departing)} of {self.lockstep.steps} "
                       f"steps one framework's float32 step left its own float64 step beyond "
                       f"the one-step bound ({', '.join(by)}); float64 agrees there. Largest: "
                       f"step {worst.step}, tf {worst.tf_departure:.3g} and torch "
                       f"{worst.torch_departure:.3g} bounds from float64 ({worst.check})")
        return out

    @property
    def ok(self) -> bool:
        return not self.failures


def exact_config(config: RunConfig) -> RunConfig:
    """The float64 run from the same start; held-out losses after the first and last step only
    (a float64 pass over the held-out split costs about ten float32 ones)."""
    return dataclasses.replace(config, dtype="float64", eval_every=config.steps)


def verdict_run_config(config: RunConfig) -> RunConfig:
    """The config the verdicts of ``config`` run: on an arch with dropout in its base (vit)
    the same run with the rates at 0 (``base_dropout=False``): each framework draws its own
    masks, so with them on neither a step from the other's state nor a rerun whose rounding
    differs could be compared. ``config`` itself otherwise."""
    if config.base_dropout and has_base_dropout(config.arch):
        return dataclasses.replace(config, base_dropout=False)
    return config


def _run(framework: str, config: RunConfig) -> RunRecord:
    return frameworks.load(framework, "train").run(config)


def workers() -> int:
    """Worker processes for torch-only runs: ``FREEZE_PARITY_WORKERS``, else 1 on 2+ cores."""
    text = os.environ.get(WORKERS_ENV, "").strip()
    if text:
        if not text.isdigit():
            raise ValueError(f"{WORKERS_ENV}: expected a number of worker processes, got {text!r}")
        return min(int(text), 1)
    return 1 if (os.cpu_count() or 1) >= 2 else 0


class _Shared:
    """torch-only runs (envelope reruns, float64 runs), shared between strategies of the same
    maths; run by a worker process where one is given, else here when first needed."""

    def __init__(self, worker: TorchWorker | None = None):
        self.worker = worker
        self.runs: dict[RunConfig, RunRecord | int] = {}
        self.references: dict[RunConfig, int] = {}  # lockstep reference runs in the worker

    @staticmethod
    def rerun_config(config: RunConfig, seed: int | None) -> RunConfig:
        """torch's run of ``config``'s maths with rounding seed ``seed`` (None: the run itself)."""
        return dataclasses.replace(config, strategy=EQUIVALENT.get(config.strategy, config.strategy),
                                   rounding_seed=seed)

    @staticmethod
    def float64_config(config: RunConfig) -> RunConfig:
        return exact_config(dataclasses.replace(
            config, strategy=EQUIVALENT.get(config.strategy, config.strategy)))

    def submit(self, config: RunConfig) -> None:
        """Start ``config`` in the worker now (if there is one), to be collected later."""
        if self.worker is not None and config not in self.runs:
            self.runs[config] = self.worker.submit(config)

    def submit_reference(self, config: RunConfig) -> None:
        """Start the lockstep's reference run of ``config`` (torch's run and its states) in
        the worker now (if there is one)."""
        if self.worker is not None and config not in self.references:
            self.references[config] = self.worker.submit(config, states=True)

    def reference(self, config: RunConfig) -> ReferenceRun | None:
        """The worker's reference run of ``config``, or None: the lockstep runs it here."""
        job = self.references.pop(config, None)
        return None if job is None else self.worker.reference(job)

    def get(self, config: RunConfig) -> RunRecord:
        held = self.runs.get(config)
        if isinstance(held, int):
            held = self.runs[config] = self.worker.result(held)
        if held is None:
            held = self.runs[config] = _run("torch", config)
        return held

    def rerun(self, config: RunConfig, seed: int | None) -> RunRecord:
        return self.get(self.rerun_config(config, seed))

    def float64(self, config: RunConfig) -> RunRecord:
        return self.get(self.float64_config(config))


def _as_strategy(record: RunRecord, strategy: str) -> RunRecord:
    return dataclasses.replace(record, strategy=strategy)


@dataclass
class _Stepped:
    """A strategy's runs in this process: Keras's free run, the lockstep (and torch's run)."""
    tf: RunRecord
    torch: RunRecord
    lockstep: LockstepRecord
    expectations: dict[str, list[str]]
    dropout: dict[str, RunRecord] = field(default_factory=dict)


def _step(config: RunConfig, shared: _Shared, note: Callable[[str], None]) -> _Stepped:
    """``config``'s Keras free run and lockstep (of :func:`verdict_run_config`), and where
    that is another config, both frameworks' runs of ``config`` itself."""
    verdict = verdict_run_config(config)
    note("tf run")
    tf_train = frameworks.load("tf", "train")
    follower = tf_train.Stepper(verdict)
    tf_record = tf_train.run(verdict, stepper=follower)
    note("lockstep")  # the same Keras model again, loaded with torch's state at every step
    torch_record, lock = lockstep(verdict, follower, reference=shared.reference(verdict))
    expectations = {r.framework: expectation_failures(r) for r in (tf_record, torch_record)}
    dropout = {}
    if verdict != config:
        note("tf run, dropout on")
        dropout = {"tf": tf_train.run(config)}
        note("torch run, dropout on")
        dropout["torch"] = shared.get(config)
        for fw, record in dropout.items():
            expectations[fw] = expectations[fw] + expectation_failures(record)
    return _Stepped(tf_record, torch_record, lock, expectations, dropout)


def _judge(config: RunConfig, shared: _Shared, stepped: _Stepped, seeds: tuple[int, ...],
           max_seeds: int, note: Callable[[str], None]) -> StrategyResult:
    tf_record, torch_record, lock = stepped.tf, stepped.torch, stepped.lockstep
    config = verdict_run_config(config)
    expected = expected_to_match(config.strategy, config.arch)
    if config.dtype == "float64":
        cmp = compare_records(tf_record, torch_record, FLOAT64_RUN)  # naive: must differ
        free = FreeRun(config.strategy, expected, 0.0, cmp.max_diff, "", 0.0, "")
        free.failures += cmp.failures
        return StrategyResult(config.strategy, config.dtype, tf_record, torch_record, lock, free,
                              expectations=stepped.expectations, dropout=stepped.dropout)
    note("float64 run")
    exact = _as_strategy(shared.float64(config), config.strategy) if expected else None
    reruns = []
    for seed in seeds:
        note(f"envelope seed {seed}")
        reruns.append(_as_strategy(shared.rerun(config, seed), config.strategy))
    # the spread around the run of the same maths and path as the reruns
    base = torch_record if config.strategy not in EQUIVALENT else shared.rerun(config, None)
    env = envelope_from(base, reruns)
    free = judge_free_run(tf_record, torch_record, env, exact, expected)
    seed = max(seeds, default=0)
    while expected and not free.within and len(reruns) < max_seeds:
        # outside: is it rarer rounding than the first seeds saw? more reruns before judging
        seed += 1
        note(f"envelope seed {seed}")
        reruns.append(_as_strategy(shared.rerun(config, seed), config.strategy))
        env = envelope_from(base, reruns)
        free = judge_free_run(tf_record, torch_record, env, exact, expected)
    return StrategyResult(config.strategy, config.dtype, tf_record, torch_record, lock, free,
                          env, exact, stepped.expectations, stepped.dropout)


def _seeds(seeds, max_seeds) -> tuple[tuple[int, ...], int]:
    return (tuple(tol.ENVELOPE_SEEDS) if seeds is None else tuple(seeds),
            tol.ENVELOPE_MAX_SEEDS if max_seeds is None else max_seeds)


def run_strategy(config: RunConfig, shared: _Shared | None = None,
                 seeds: tuple[int, ...] | None = None, max_seeds: int | None = None,
                 note: Callable[[str], None] | None = None) -> StrategyResult:
    """Every run of one strategy and its verdicts (``seeds``, ``max_seeds`` None:
    ``ENVELOPE_SEEDS``, ``ENVELOPE_MAX_SEEDS``)."""
    shared = shared or _Shared()
    note = note or (lambda what: None)
    return _judge(config, shared, _step(config, shared, note), *_seeds(seeds, max_seeds), note)


def envelope_of(framework: str, config: RunConfig, run: RunRecord | None = None,
                seeds: tuple[int, ...] | None = None) -> Envelope:
    """``framework``'s own rounding envelope of ``config``: its reruns with rounding seeds
    around its run (``run``, or run here). What a same-framework comparison (one process
    against its replicas) is judged against: TensorFlow's float32 rounding is not torch's."""
    seeds = tuple(tol.ENVELOPE_SEEDS) if seeds is None else tuple(seeds)
    run = run or _run(framework, config)
    return envelope_from(run, [_run(framework, dataclasses.replace(config, rounding_seed=s))
                               for s in seeds])


def run_matrix(configs: dict[str, RunConfig],
               note: Callable[[str, str], None] | None = None,
               processes: int | None = None) -> list[StrategyResult]:
    """:func:`run_strategy` for each config, in order, sharing envelope and float64 runs:
    every strategy's Keras free run and lockstep first, then every strategy's judgement.

    ``processes`` (None: :func:`workers`): with 1, a worker process (``shared.worker``: a
    fresh interpreter that imports torch only) runs every torch-only run, the lockstep's
    reference runs among them, while this process runs the Keras side (its free runs, and
    its lockstep steps replayed from the reference's states); the records are the same bit
    for bit either way.
    """
    processes = workers() if processes is None else processes
    float32 = [verdict_run_config(c) for c in configs.values() if c.dtype == "float32"]
    # vit: each framework's run with its dropout on, besides the verdict runs
    dropout_on = [c for c in configs.values() if verdict_run_config(c) != c]
    worker = TorchWorker() if processes and float32 else None
    if worker is not None:
        # this process's Keras work on one core, the worker's torch runs on the other (a
        # no-op where TensorFlow has already started, e.g. after other runs in a test)
        frameworks.load("tf", "train").limit_threads(1)
    notes = {name: (lambda what, n=name: note(n, what)) if note else (lambda what: None)
             for name in configs}
    try:
        shared = _Shared(worker)
        # the worker's queue, in the order this process will need it: torch's lockstep
        # reference runs first (this process replays them after each Keras free run), then
        # the float64 runs and envelope reruns (needed once every strategy has stepped)
        for config in float32:
            shared.submit_reference(config)
        for config in dropout_on:
            shared.submit(config)
        for config in float32:
            if expected_to_match(config.strategy, config.arch):
                shared.submit(shared.float64_config(config))
            if config.strategy in EQUIVALENT:
                shared.submit(shared.rerun_config(config, None))
            for seed in tol.ENVELOPE_SEEDS:
                shared.submit(shared.rerun_config(config, seed))
        stepped = {name: _step(config, shared, notes[name]) for name, config in configs.items()}
        return [_judge(config, shared, stepped[name], *_seeds(None, None), notes[name])
                for name, config in configs.items()]
    finally:
        if worker is not None:
            worker.close()
