"""Lockstep: at every step both frameworks start from the same state and take one step.

The free-running comparison of two float32 runs (``shared.compare``) mixes
what the frameworks compute with how float32 rounding grows over a
trajectory. Lockstep removes the trajectory: the reference framework (torch,
its own ``train.run`` loop) trains; before each of its steps its state
(model tensors, BatchNorm statistics, optimizer slots and step count, as a
:class:`~shared.training_state.TrainingState`) is loaded into the other
framework's :class:`Stepper`, which takes the same step on the same batch.
The two one-step results are compared on

* the training-mode loss and the inference-mode loss (the same weights, the
  same batch: only one forward pass's rounding separates them);
* every tensor's change in the step: parameters, BatchNorm statistics and
  optimizer slots, elementwise, within a bound of a few units in the last
  place of the tensor's scale plus a fraction of its largest change (the
  gradient's rounding);
* which tensors moved at all (exact).

The bounds are those of one forward and backward pass in float32
(``shared.tolerances.LOCKSTEP_*``), whatever the step number. A check outside
its bound is decided in float64: both frameworks take the same step again,
from the same state, in float64. If they agree there (``LOCKSTEP_FLOAT64_*``),
the float32 difference was rounding, and the record keeps it as a numerics
event with each framework's own float32-vs-float64 departure, naming the one
that departs; if they disagree, the frameworks compute different things: a
semantics failure, named by step, check and tensor.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from shared import frameworks
from shared import tolerances as tol
from shared.compare import expected_to_match
from shared.record import RunConfig, RunRecord
from shared.strategies import bn_prefixes, get_strategy
from shared.training_state import TrainingState

__all__ = ["Check", "LockstepEvent", "LockstepRecord", "ReferenceRun", "StepBounds", "adam_rounding",
           "compare_step", "lockstep", "loss_check", "moved_check", "reference_run", "step_bounds",
           "tensor_check", "ulp"]

REFERENCE = "torch"   # trains through its own train.run loop
FOLLOWER = "tf"       # takes each step from the reference's state


@dataclass(frozen=True)
class StepBounds:
    """The one-step bounds of a comparison (float32, or float64 for the decision).

    Every tensor's bound, elementwise: ``ulps`` units in the last place of the tensor's
    largest |value| (each side rounds the stored result), plus a relative part that
    depends on what the tensor is:

    * a parameter: ``update_rtol`` of its largest change in the step (the gradient's
      rounding, passed on by the optimizer), ``batch_stats_rtol`` where the gradient runs
      through BatchNorm on batch statistics;
    * an optimizer slot (momentum buffer, Adam's moments): ``slot_rtol`` of its largest
      |value| (``batch_stats_rtol`` likewise): a slot's change can cancel (the momentum
      buffer's ``g - (1 - m) b``), its value is what the next update is made of;
    * a BatchNorm statistic: the momentum times the rounding of a batch mean over that
      layer's ``n`` values, ``LOCKSTEP_STATS_SUM_C * sqrt(n) * eps`` of its |value|.
    """
    name: str
    loss_atol: float
    loss_rtol: float
    ulps: float
    update_rtol: float
    slot_rtol: float
    batch_stats_rtol: float
    eps: float                    # the dtype's machine epsilon: the ulp of 1
    momentum: float               # BatchNorm's (torch convention)
    reductions: tuple[tuple[str, int], ...] = ()  # BN prefix -> values per channel mean

    def stats_rtol(self, key: str) -> float:
        if self.name == "LOCKSTEP_FLOAT64":
            return tol.LOCKSTEP_FLOAT64_RTOL
        prefix = key.rsplit(".", 1)[0]
        n = dict(self.reductions).get(prefix, max((v for _, v in self.reductions), default=1))
        return tol.LOCKSTEP_STATS_SUM_C * self.momentum * float(np.sqrt(n)) * self.eps


def step_bounds(dtype: str = "float32", config: RunConfig | None = None) -> StepBounds:
    """The one-step bounds of ``dtype`` for ``config``'s arch and batch."""
    from shared.archs import arch_config, bn_reduction_sizes

    config = config or RunConfig(dtype=dtype)
    reductions = tuple(sorted(bn_reduction_sizes(config.arch, config.batch_size).items()))
    # no BatchNorm (vit): no statistic to bound, momentum 0
    momentum = getattr(arch_config(config.arch), "bn_momentum", 0.0)
    if dtype == "float64":
        return StepBounds("LOCKSTEP_FLOAT64", tol.LOCKSTEP_FLOAT64_LOSS_ATOL,
                          tol.LOCKSTEP_FLOAT64_LOSS_RTOL, tol.LOCKSTEP_ULPS,
                          tol.LOCKSTEP_FLOAT64_RTOL, tol.LOCKSTEP_FLOAT64_RTOL,
                          tol.LOCKSTEP_FLOAT64_RTOL, float(np.finfo(np.float64).eps), momentum,
                          reductions)
    return StepBounds("LOCKSTEP", tol.LOCKSTEP_LOSS_ATOL, tol.LOCKSTEP_LOSS_RTOL,
                      tol.LOCKSTEP_ULPS, tol.LOCKSTEP_UPDATE_RTOL, tol.LOCKSTEP_SLOT_RTOL,
                      tol.LOCKSTEP_BATCH_STATS_RTOL, float(np.finfo(np.float32).eps), momentum,
                      reductions)


@dataclass(frozen=True)
class Check:
    """One quantity of one step compared: how far apart, against which bound."""
    check: str          # "train_loss", "eval_loss", "tensor", "slot:<name>", "moved"
    key: str            # canonical key ("" for losses)
    diff: float         # largest |tf - torch| (of the change, for tensors)
    bound: float        # the bound at that element
    ratio: float        # largest diff / bound over the elements (> 1: outside)
    tf: float           # tf's value (losses) or largest |change| (tensors)
    torch: float

    @property
    def outside(self) -> bool:
        return self.ratio > 1.0

    def describe(self, follower: str = "tf") -> str:
        """One line; ``follower`` names the side compared with torch (the port check: keras)."""
        what = self.check if not self.key else f"{self.check} {self.key}"
        if self.check.endswith("loss"):
            return (f"{what}: {follower} {self.tf:.7g} vs torch {self.torch:.7g}, "
                    f"{self.diff:.3g} apart (bound {self.bound:.3g})")
        if self.check == "moved":
            return (f"{what}: moved on one side only (largest change: {follower} {self.tf:.3g}, "
                    f"torch {self.torch:.3g})")
        return (f"{what}: change differs by {self.diff:.3g} (bound {self.bound:.3g} there; "
                f"largest change {follower} {self.tf:.3g}, torch {self.torch:.3g})")


@dataclass
class LockstepEvent:
    """A step where a float32 check left its bound, and what float64 said about it."""
    step: int
    check: str           # the worst float32 check, described
    ratio: float         # its diff / bound in float32
    float64_ratio: float  # the same check in float64, against the float64 bounds
    semantic: bool       # float64 disagrees too: the frameworks compute different things
    tf_departure: float  # tf float32 vs tf float64, in units of the float32 bound
    torch_departure: float
    departs: str         # "tf", "torch" or "both": whose float32 is farther from its float64


@dataclass
class LockstepRecord:
    strategy: str
    arch: str
    dtype: str
    steps: int
    bounds: str
    expected_to_match: bool
    # largest one-step |tf - torch| of the losses, and the largest diff/bound of any check
    max_loss_diff: float = 0.0
    max_ratio: float = 0.0
    max_ratio_at: str = ""
    events: list[LockstepEvent] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def semantic_events(self) -> list[LockstepEvent]:
        return [e for e in self.events if e.semantic]

    @property
    def numerics_events(self) -> list[LockstepEvent]:
        return [e for e in self.events if not e.semantic]

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ok"] = self.ok
        return data


# --------------------------------------------------------------------------- #
# one step compared
# --------------------------------------------------------------------------- #
def ulp(scale: float, eps: float) -> float:
    """One unit in the last place at ``scale`` (``eps`` is the ulp of 1; at least the
    smallest normal's)."""
    return eps * 2.0 ** np.floor(np.log2(max(scale, np.finfo(np.float64).tiny)))


def loss_check(name: str, tf: float, torch: float, b: StepBounds) -> Check:
    bound = b.loss_atol + b.loss_rtol * abs(torch)
    diff = abs(tf - torch)
    ratio = diff / bound if bound > 0 else (np.inf if diff > 0 else 0.0)
    return Check(name, "", diff, bound, ratio, tf, torch)


def tensor_check(check: str, key: str, start: np.ndarray, tf: np.ndarray, torch: np.ndarray,
                  rtol: float, b: StepBounds, of_value: bool = False, extra=0.0) -> Check:
    """``rtol`` of the largest change in the step, or (``of_value``) of the largest value,
    plus ``extra`` (elementwise, e.g. Adam's sensitivity to a gradient's rounding)."""
    d_tf, d_torch = tf - start, torch - start
    scale = float(max(np.abs(start).max(initial=0.0), np.abs(torch).max(initial=0.0)))
    change = float(np.abs(d_torch).max(initial=0.0))
    bound = b.ulps * ulp(scale, b.eps) + rtol * (scale if of_value else change) + extra
    diff = np.abs(d_tf - d_torch)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratios = np.where(diff > 0, diff / bound, 0.0)
    i = int(np.argmax(ratios)) if ratios.size else 0
    at = np.broadcast_to(bound, diff.shape).ravel()[i] if diff.size else 0.0
    return Check(check, key, float(diff.ravel()[i]) if diff.size else 0.0, float(at),
                 float(ratios.ravel()[i]) if ratios.size else 0.0,
                 float(np.abs(d_tf).max(initial=0.0)), change)


def _adam_sensitivity(key: str, start: TrainingState, after: TrainingState,
                      rtol: float) -> np.ndarray | float:
    """How far one step's rounding of the gradient moves Adam's update of ``key``, elementwise.

    Adam divides by sqrt(v): where v is small (a gradient at rounding level, the first
    steps) a gradient's rounding ``dg`` moves the update by about
    ``lr_t (1 - beta_1) dg / (sqrt(v_hat) + eps)``, up to the learning rate itself, and
    both terms of the update (m, and v through m / sqrt(v)) carry it: twice that. ``dg``:
    ``rtol`` of the tensor's largest gradient, recovered from the moments,
    ``g = (m_new - beta_1 m) / (1 - beta_1)``.
    """
    if after.optimizer != "adam" or key not in after.slots.get("exp_avg", {}):
        return 0.0
    return adam_rounding(start.slots.get("exp_avg", {}).get(key, 0.0),
                         after.slots["exp_avg"][key], after.slots["exp_avg_sq"][key],
                         after.step, after.hyper, rtol)


def adam_rounding(m_old, m_new, v_new, step: int, hyper: dict, rtol: float):
    """:func:`_adam_sensitivity` from the moments themselves: before (``m_old``) and after
    the step (``m_new``, ``v_new``), the step count after it and Adam's hyperparameters."""
    b1, b2, eps, lr = hyper["beta_1"], hyper["beta_2"], hyper["epsilon"], hyper["learning_rate"]
    g = (m_new - b1 * m_old) / (1 - b1)
    dg = rtol * float(np.abs(g).max(initial=0.0))
    v_hat = v_new / (1 - b2 ** step)
    return 2.0 * lr / (1 - b1 ** step) * (1 - b1) * dg / (np.sqrt(v_hat) + eps)


def moved_check(key: str, start, tf, torch, b: StepBounds, rtol: float) -> Check | None:
    moved_tf, moved_torch = not np.array_equal(tf, start), not np.array_equal(torch, start)
    if moved_tf == moved_torch:
        return None
    c = tensor_check("moved", key, start, tf, torch, rtol, b)
    # a change within the bound on the side that moved is rounding of a zero update
    if max(c.tf, c.torch) <= b.ulps * ulp(float(np.abs(start).max(initial=0.0)), b.eps):
        return None
    return Check("moved", key, c.diff, c.bound, np.inf, c.tf, c.torch)


def _batch_statistics_keys(strategy: str, keys) -> set[str]:
    """Trainable tensors whose gradient runs through BatchNorm on batch statistics.

    BN's training-mode backward subtracts nearly equal terms (the batch mean of the
    upstream gradient, and its correlation with the normalised input), so float32
    rounding of those gradients is far above that of one forward pass. Under
    batch-statistics strategies that is every base tensor (the last block's BN
    included); the head sits after the last BN.
    """
    if get_strategy(strategy).bn_mode != "batch" or not bn_prefixes(keys):
        return set()  # no BatchNorm in the model (vit): no batch-statistics backward
    return {k for k in keys if k.startswith("base.")}


def compare_step(start: TrainingState, losses: dict[str, tuple[float, float]],
                 after: dict[str, TrainingState], strategy: str, b: StepBounds) -> list[Check]:
    """Every check of one step: ``losses[fw] = (train, eval)``, ``after[fw]`` the state."""
    tf, torch = after[FOLLOWER], after[REFERENCE]
    checks = [loss_check("train_loss", losses[FOLLOWER][0], losses[REFERENCE][0], b),
              loss_check("eval_loss", losses[FOLLOWER][1], losses[REFERENCE][1], b)]
    batchy = _batch_statistics_keys(strategy, start.tensors)
    stats = {f"{p}.{s}" for p in bn_prefixes(start.tensors) for s in ("running_mean", "running_var")}
    for key in sorted(start.tensors):
        args = (start.tensors[key], tf.tensors[key], torch.tensors[key])
        if key in stats:  # computed in the forward pass: a batch mean's rounding, times m
            rtol, of_value = b.stats_rtol(key), True
        else:
            rtol, of_value = (b.batch_stats_rtol if key in batchy else b.update_rtol), False
        extra = _adam_sensitivity(key, start, torch, rtol)
        moved = moved_check(key, *args, b, rtol)
        checks.append(moved or tensor_check("tensor", key, *args, rtol, b, of_value, extra))
    for name in sorted(set(tf.slots) | set(torch.slots)):
        for key in sorted(set(tf.slots.get(name, {})) | set(torch.slots.get(name, {}))):
            values = [s.slots.get(name, {}).get(key) for s in (start, tf, torch)]
            zero = np.zeros_like(next(v for v in values if v is not None))
            begin, a, c = (zero if v is None else v for v in values)
            rtol = b.batch_stats_rtol if key in batchy else b.slot_rtol
            checks.append(tensor_check(f"slot:{name}", key, begin, a, c, rtol, b, True))
    return checks


def _worst(checks: list[Check]) -> Check:
    return max(checks, key=lambda c: c.ratio)


# --------------------------------------------------------------------------- #
# the run
# --------------------------------------------------------------------------- #
class _Observer:
    """Told by the reference's ``train.run`` about each step; steps the follower alongside."""

    def __init__(self, config: RunConfig, record: LockstepRecord, follower=None,
                 timings: dict | None = None):
        self.config, self.record = config, record
        # seconds spent stepping the follower, comparing, deciding in float64 (bench)
        self.timings = timings if timings is not None else {}
        for name in ("follower_s", "compare_s", "float64_s"):
            self.timings.setdefault(name, 0.0)
        self.bounds = step_bounds(config.dtype, config)
        self.follower = follower or frameworks.load(FOLLOWER, "train").Stepper(config)
        self._exact: dict[str, object] | None = None  # float64 steppers, built on first need
        self._next_start: TrainingState | None = None  # the state after the last step

    def before_step(self, step: int, idx: np.ndarray, stepper) -> None:
        # between steps the reference only evaluates (held-out losses): its state is the one
        # the last step left
        self.follow(step, idx, self._next_start if self._next_start is not None
                    else stepper.state())

    def after_step(self, step: int, idx: np.ndarray, stepper, record) -> None:
        self._next_start = stepper.state()
        self.judge(step, idx, (record.train_loss, record.eval_loss), self._next_start)

    def follow(self, step: int, idx: np.ndarray, start: TrainingState) -> None:
        """The follower takes step ``step`` from the reference's state ``start``."""
        self.start = start
        began = time.perf_counter()
        self.follower.load(start, f"lockstep step {step}")
        self.follower_losses = self.follower.step(idx)
        self.follower_state = self.follower.state()
        self.timings["follower_s"] += time.perf_counter() - began

    def judge(self, step: int, idx: np.ndarray, reference_losses: tuple[float, float],
              reference_after: TrainingState) -> None:
        """Both sides' step ``step`` compared: the reference's losses and the state it left."""
        losses = {FOLLOWER: self.follower_losses, REFERENCE: reference_losses}
        began = time.perf_counter()
        after = {FOLLOWER: self.follower_state, REFERENCE: reference_after}
        checks = compare_step(self.start, losses, after, self.config.strategy, self.bounds)
        rec = self.record
        rec.max_loss_diff = max(rec.max_loss_diff, *(c.diff for c in checks[:2]))
        worst = _worst(checks)
        if worst.ratio > rec.max_ratio:
            rec.max_ratio, rec.max_ratio_at = worst.ratio, f"step {step}: {worst.describe()}"
        self.timings["compare_s"] += time.perf_counter() - began
        if worst.outside:
            began = time.perf_counter()
            rec.events.append(self._decide(step, idx, checks, losses, after))
            self.timings["float64_s"] += time.perf_counter() - began

    def _decide(self, step, idx, checks, losses32, after32) -> LockstepEvent:
        """Take the step again in float64 in both frameworks and judge there."""
        worst32 = _worst(checks)
        if worst32.check == "moved" or self.config.dtype == "float64":
            return LockstepEvent(step, worst32.describe(), worst32.ratio, worst32.ratio, True,
                                 0.0, 0.0, "both")
        if self._exact is None:
            config = RunConfig(**{**self.config.__dict__, "dtype": "float64"})
            self._exact = {fw: frameworks.load(fw, "train").Stepper(config)
                           for fw in (REFERENCE, FOLLOWER)}
        losses64, after64 = {}, {}
        for fw, stepper in self._exact.items():
            stepper.load(self.start, f"lockstep step {step} (float64)")
            losses64[fw] = stepper.step(idx)
            after64[fw] = stepper.state()
        b64 = step_bounds("float64", self.config)
        exact = {c.check + c.key: c for c in
                 compare_step(self.start, losses64, after64, self.config.strategy, b64)}
        outside = [c for c in checks if c.outside]
        semantic = [exact[c.check + c.key] for c in outside if exact[c.check + c.key].outside]
        decided = _worst(semantic) if semantic else worst32
        f64 = exact[decided.check + decided.key]
        departure = {}
        for fw in (FOLLOWER, REFERENCE):
            own = compare_step(self.start, {FOLLOWER: losses32[fw], REFERENCE: losses64[fw]},
                               {FOLLOWER: after32[fw], REFERENCE: after64[fw]},
                               self.config.strategy, self.bounds)
            departure[fw] = max(c.ratio for c in own if c.check + c.key == decided.check + decided.key)
        ratio = departure[FOLLOWER] / max(departure[REFERENCE], 1e-300)
        departs = "tf" if ratio > tol.LOCKSTEP_DEPARTS_RATIO else (
            "torch" if ratio < 1 / tol.LOCKSTEP_DEPARTS_RATIO else "both")
        described = (f"{decided.describe()}; in float64 {f64.diff:.3g} apart "
                     f"(bound {f64.bound:.3g})") if semantic else worst32.describe()
        return LockstepEvent(step, described, worst32.ratio, f64.ratio, bool(semantic),
                             departure[FOLLOWER], departure[REFERENCE], departs)


class ReferenceRun:
    """The reference framework's run of a config and its training state at every step
    boundary (``states[k]``: before step ``k``; ``states[-1]``: after the last), which is
    all a lockstep needs of it: :func:`lockstep` replays the follower's steps from them.
    Made by :func:`reference_run`, here or in another process (``shared.worker``)."""

    def __init__(self, record: RunRecord, states: list[TrainingState]):
        if len(states) != len(record.steps) + 1:
            raise ValueError(f"reference run of {record.strategy}: {len(states)} states for "
                             f"{len(record.steps)} steps (expected one more)")
        self.record, self.states = record, states


class _StateRecorder:
    """An observer of the reference's ``train.run`` that keeps its state at each boundary."""

    def __init__(self):
        self.states: list[TrainingState] = []

    def before_step(self, step: int, idx: np.ndarray, stepper) -> None:
        if not self.states:
            self.states.append(stepper.state())

    def after_step(self, step: int, idx: np.ndarray, stepper, record) -> None:
        self.states.append(stepper.state())


def reference_run(config: RunConfig) -> ReferenceRun:
    """The reference framework's ``train.run`` of ``config``, its states kept (float64,
    exact for any run)."""
    recorder = _StateRecorder()
    record = frameworks.load(REFERENCE, "train").run(config, observer=recorder)
    return ReferenceRun(record, recorder.states)


def lockstep(config: RunConfig, follower=None, timings: dict | None = None,
             reference: ReferenceRun | None = None) -> tuple[RunRecord, LockstepRecord]:
    """The reference framework's run (its record) and the lockstep record of the same run.

    ``follower``: the other framework's ``Stepper`` of ``config`` to step with (any state:
    every step loads the reference's), e.g. the one its own free run used. ``timings``: a
    dict to fill with the seconds spent stepping the follower, comparing and deciding in
    float64 (records carry no wall-clock time). ``reference``: the reference's run of
    ``config`` made already (:func:`reference_run`, e.g. by a worker process while this one
    ran the follower's free run); the follower replays it step by step, and the record is
    the same bit for bit as when the reference trains here alongside (None).
    """
    expected = expected_to_match(get_strategy(config.strategy).name, config.arch)
    record = LockstepRecord(config.strategy, config.arch, config.dtype, config.steps,
                            step_bounds(config.dtype, config).name, expected)
    observer = _Observer(config, record, follower, timings)
    if reference is None:
        ran = frameworks.load(REFERENCE, "train").run(config, observer=observer)
    else:
        ran = reference.record
        if len(ran.steps) != config.steps or ran.strategy != config.strategy:
            raise ValueError(f"lockstep of {config.strategy}: the reference run given is "
                             f"{ran.strategy}'s, {len(ran.steps)} steps (expected "
                             f"{config.steps})")
        for step, idx in enumerate(observer.follower.prepared.indices):
            observer.follow(step, idx, reference.states[step])
            observer.judge(step, idx, (ran.steps[step].train_loss, ran.steps[step].eval_loss),
                           reference.states[step + 1])
    semantic = record.semantic_events
    if expected and semantic:
        first = semantic[0]
        record.failures.append(
            f"{config.strategy}: lockstep step {first.step}: {first.check} "
            f"({len(semantic)} of {config.steps} steps differ in float64 too)")
    elif not expected and not semantic:
        record.failures.append(
            f"{config.strategy}: lockstep: tf and torch were expected to differ (different "
            f"classic mistakes) but every step agrees within {record.bounds}")
    return ran, record

