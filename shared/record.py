"""RunConfig (what to run) and RunRecord (what happened), with a JSON round trip.

A record holds, per optimizer step, the training-mode loss that produced the
gradients and the inference-mode loss on the same batch at the same
pre-update weights; every ``eval_every`` steps the held-out target loss and
accuracy; and over the run, whether any tensor the strategy declares frozen
changed and whether BatchNorm statistics changed. Records carry no wall-clock
time, so the same run twice gives equal records.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from shared.archs import ARCHS, RUN_ARCHS, has_base_dropout, require_pipeline_arch
from shared.frameworks import check_framework
from shared.strategies import check_strategy_arch, get_strategy

__all__ = ["OPTIMIZERS", "HeldOut", "RunConfig", "RunRecord", "StepRecord"]

OPTIMIZERS = ("sgd", "adam")
# Steps and learning rates when a config leaves them None, per arch. tinyconv: the demo's,
# long enough that fine-tuning visibly learns (held-out target accuracy 0.48-0.92 by
# strategy), small enough that `full` stays stable (at SGD 0.03 the two frameworks' float32
# runs ended 0.34 apart, against 0.06 at 0.02). ResNet-18 learns the target in fewer steps
# (0.94 after 30) and costs ~10x more per step; at 100 steps of SGD 0.02 its `partial` runs
# drifted 6.8e-2 apart, at 30 steps of 0.01 every strategy agrees to 9.1e-7.
ARCH_DEFAULTS = {
    "tinyconv": {"steps": 100, "sgd": 0.02, "adam": 0.001},
    "resnet18": {"steps": 30, "sgd": 0.01, "adam": 0.001},
    # vit: measured in tests/test_vit_strategies.py and docs/models.md
    "vit": {"steps": 30, "sgd": 0.01, "adam": 0.001},
}
# 2: records carry `moved` (every tensor that changed over the run, not only declared-frozen ones)
RECORD_VERSION = 2


@dataclass(frozen=True)
class RunConfig:
    arch: str = "tinyconv"
    strategy: str = "frozen"
    steps: int | None = None  # None: ARCH_DEFAULTS[arch]["steps"]
    batch_size: int = 32
    # sgd: plain or with momentum; adam: see adam_epsilon
    optimizer: str = "sgd"
    # None = ARCH_DEFAULTS[arch][optimizer] (tinyconv: SGD 0.02, Adam 0.001)
    learning_rate: float | None = None
    momentum: float = 0.9  # sgd only; 0 = plain SGD
    # Keras adds epsilon to sqrt(v) *before* bias correction, torch after; no single
    # value makes them equal, so parity runs use an epsilon too small to matter.
    adam_epsilon: float = 1e-16
    # Keras takes the bias correction's beta ** t of float32 betas, torch of the betas
    # themselves: with the usual 0.9 and 0.999 (not float32 numbers) every Adam update
    # differs by 6.7e-6 of itself at step 1 (float64 lockstep; tests/test_train.py). Parity
    # runs use betas that float32 holds exactly, 7/8 and 1 - 2**-10, so the two compute the
    # same update; any betas can be given.
    adam_beta_1: float = 0.875
    adam_beta_2: float = 0.9990234375
    head_dropout: float = 0.0
    # batch order and head initialisation (numpy RNG only, shared by both frameworks)
    seed: int = 0
    # held-out target loss/accuracy after every `eval_every` updates (and at 0 and the end)
    eval_every: int = 10
    # update Keras's moving variance with the unbiased batch variance, as torch does
    reconcile_bn_variance: bool = True
    # float32 is what users run; float64 shows that cross-framework differences are
    # float32 rounding (amplified by batch-statistics backward), not different maths
    dtype: str = "float32"
    # canonical pretrained checkpoint; None = the shipped one (tinyconv, vit) or the cached one
    # (resnet18, pretrained on first use); "cache" = the cache's, pretrained here if absent
    checkpoint: str | None = None
    # None: the run as it is. A seed: a rerun whose float32 rounding differs from the run's
    # and nothing else, at the start and at every step: every starting tensor (base, head,
    # statistics) moves one unit in the last place up or down, and each batch takes its
    # samples in another order (the mean loss, the gradients and BatchNorm's batch
    # statistics do not depend on it; their float32 sums do), both drawn from the seed.
    # The reruns that measure the rounding envelope (shared/envelope.py).
    rounding_seed: int | None = None
    # True: the model as the arch defines it. False: built with ``verdict_config(arch)``
    # (vit: dropout, attention dropout and drop-path rates 0), the deterministic model the
    # compare matrix's lockstep, envelope and float64 runs of an arch with dropout in its
    # base step (shared/matrix.py); archs without (tinyconv, resnet18) take True only.
    base_dropout: bool = True

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of: {', '.join(ARCHS)}")
        require_pipeline_arch(self.arch, "run config", RUN_ARCHS)
        defaults = ARCH_DEFAULTS[self.arch]
        if self.steps is None:
            object.__setattr__(self, "steps", defaults["steps"])
        if self.learning_rate is None:
            object.__setattr__(self, "learning_rate", defaults.get(self.optimizer))
        check_strategy_arch(self.strategy, self.arch)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of: {', '.join(OPTIMIZERS)}")
        for name in ("steps", "batch_size", "eval_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (BatchNorm needs a batch variance)")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0
                and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if not 0 <= self.head_dropout < 1:
            raise ValueError(f"head_dropout must be in [0, 1), got {self.head_dropout}")
        if self.rounding_seed is not None and (not isinstance(self.rounding_seed, int)
                                               or self.rounding_seed < 0):
            raise ValueError(f"rounding_seed must be None or an int >= 0, got "
                             f"{self.rounding_seed!r}")
        if not isinstance(self.base_dropout, bool):
            raise ValueError(  # noqa: TRY004  (a config error: exit 2 like every other)
                f"base_dropout must be true or false, got {self.base_dropout!r}")
        if not self.base_dropout and not has_base_dropout(self.arch):
            raise ValueError(f"base_dropout=False: {self.arch}'s base has no dropout to switch "
                             f"off (only {', '.join(a for a in ARCHS if has_base_dropout(a))})")
        if self.rounding_seed is not None and self.base_dropout and has_base_dropout(self.arch):
            raise ValueError(f"rounding_seed needs base_dropout=False on {self.arch}: dropout's "
                             f"masks are drawn per sample, so reordering a batch moves them, "
                             f"which is not rounding")
        if self.rounding_seed is not None and self.head_dropout > 0:
            raise ValueError("rounding_seed needs head_dropout 0: reordering a batch would move "
                             "dropout's masks between samples, which is not rounding")

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"RunConfig: unknown field(s) {', '.join(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class StepRecord:
    step: int
    train_loss: float  # training-mode loss that produced this step's gradients
    eval_loss: float   # inference-mode loss, same batch, same pre-update weights


@dataclass(frozen=True)
class HeldOut:
    step: int  # number of updates applied before this evaluation
    loss: float
    accuracy: float


@dataclass
class RunRecord:
    framework: str
    strategy: str
    arch: str
    config: dict
    steps: list[StepRecord] = field(default_factory=list)
    heldout: list[HeldOut] = field(default_factory=list)
    frozen_unchanged: bool = True
    bn_stats_changed: bool = False
    # declared-frozen key -> largest absolute change (only keys that changed)
    frozen_changes: dict[str, float] = field(default_factory=dict)
    # largest absolute change of any BatchNorm running statistic over the run
    bn_stats_max_change: float = 0.0
    # every tensor of the model (base, head, statistics, counters) that changed over the
    # run -> its largest absolute change; what did train, to check against the strategy
    moved: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        check_framework(self.framework)
        get_strategy(self.strategy)

    @property
    def train_losses(self) -> list[float]:
        return [s.train_loss for s in self.steps]

    @property
    def eval_losses(self) -> list[float]:
        return [s.eval_loss for s in self.steps]

    @property
    def max_train_eval_gap(self) -> float:
        return max((abs(s.train_loss - s.eval_loss) for s in self.steps), default=0.0)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["version"] = RECORD_VERSION
        data["max_train_eval_gap"] = self.max_train_eval_gap
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict, where: str = "record") -> RunRecord:
        try:
            if data.get("version") != RECORD_VERSION:
                raise ValueError(f"version expected {RECORD_VERSION}, got {data.get('version')!r}")
            return cls(
                framework=data["framework"], strategy=data["strategy"], arch=data["arch"],
                config=dict(data["config"]),
                steps=[StepRecord(int(s["step"]), float(s["train_loss"]), float(s["eval_loss"]))
                       for s in data["steps"]],
                heldout=[HeldOut(int(h["step"]), float(h["loss"]), float(h["accuracy"]))
                         for h in data["heldout"]],
                frozen_unchanged=bool(data["frozen_unchanged"]),
                bn_stats_changed=bool(data["bn_stats_changed"]),
                frozen_changes={str(k): float(v) for k, v in data["frozen_changes"].items()},
                bn_stats_max_change=float(data["bn_stats_max_change"]),
                moved={str(k): float(v) for k, v in data["moved"].items()},
            )
        except KeyError as exc:
            raise ValueError(f"{where}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{where}: {exc}") from None

    @classmethod
    def from_json(cls, text: str, where: str = "record") -> RunRecord:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, dict):  # ValueError: the CLI reports it as one line
            raise ValueError(f"{where}: expected a JSON object")  # noqa: TRY004
        return cls.from_dict(data, where)

    @classmethod
    def load(cls, path: str | Path) -> RunRecord:
        path = Path(path)
        return cls.from_json(path.read_text(encoding="utf-8"), str(path))
