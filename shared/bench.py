"""``freeze-parity bench``: what the harness costs and what each strategy costs, side by side.

For one architecture, per framework, on the same model, weights and batches:

* the project's training path, ``train.run`` (what ``freeze-parity run`` and
  ``compare`` call), against a bare idiomatic loop written in
  ``<framework>_impl/bench.py`` (torch: a plain eager loop; Keras: a stock
  ``compile`` + ``fit`` with no metrics or callbacks), for ``frozen`` and
  ``feature_extraction``;
* probes that time one part of the project's step alone: the per-step
  inference-mode loss it records, one held-out evaluation, caching the features;
* pretraining (``shared.pretrain.pretrain`` with ``pretrain_epochs`` epochs);
* the peak resident memory of each configuration.

Figures (every one a median over repeats; ratios are formed per repeat, then
their median taken, so each ratio compares measurements made moments apart)::

    run per step     T_run(N) / N            the whole path as users run it: load the
                                             checkpoint and data, build, freeze, trace (tf),
                                             train N steps with recording, held-out evals
    loop per step    (T_run(L) - T_run(N)) / (L - N), L = long_factor * N
                                             the training loop alone, recording included:
                                             every fixed cost cancels in the difference
    bare per step    (T_bare(L) - T_bare(N)) / (L - N), and T_bare(N) / N for the whole script
    recording        the probe's per-step inference loss; held-out: one evaluation / eval_every
    remainder        loop - bare - recording - held-out share (what no probe explains)
    per epoch        per-step loop cost * (train items // batch size), i.e. after caching
    tf / torch       per repeat, the tf figure over the torch figure

Process isolation. *Timing* runs in one long-lived worker process per
framework, so every timed configuration of a framework shares its imports and
warm-up. The parent drives the workers in lock step: one task in one framework
at a time while the other worker waits, blocked on its pipe, so the two never
compete for the cores, and a task's repeat runs at nearly the same moment in
both frameworks (paired tf/torch ratios). Every task runs ``warmup`` times
untimed first (first-call allocations, kernel selection, lazy imports); the
timed repeats rotate the task order so drift in the machine's load spreads
over all tasks. ``train.run`` still builds a fresh model per call, so in Keras
each call retraces its ``fit`` step: that is part of the whole-path figure,
as it is for users, and cancels in the loop figure. *Memory* needs a fresh
process per configuration: each runs the configuration once and reports its
own peak resident set size, ``VmHWM`` from ``/proc/self/status`` (the
lifetime peak, interpreter and framework imports included; ``ru_maxrss`` of
``getrusage(RUSAGE_SELF)`` where /proc is missing). ``idle`` is the same
process with nothing run (framework imported, data and checkpoint loaded);
the tf process also holds torch, which ``tf_impl`` imports first.

Threads. By default each framework keeps its own thread pools, as users get
them, except that every timed task, bare loop and probes included, runs under
the thread setting of the project's ``train.run`` (``run_threads``: one
intra-op thread in torch, TensorFlow's process-wide pools), so the loop/bare
ratio compares like with like; ``--threads`` changes both paths together. On a small shared machine torch's OpenMP pool (one thread per core)
stalls whenever another process holds a core: an op waits for a descheduled
peer thread, so torch timings swing by up to 10x between repeats (a tinyconv
forward measured 8.7 ms on one thread, 140 ms on two, with a load average of
3 on 2 cores). ``threads=1`` pins both frameworks to one intra- and one
inter-op thread for comparisons that hold still; the machine record says
which was used and the load average before and after.

``quick`` is a smoke test, not a measurement: one repeat, no warm-up, tiny
runs, one thread, and the frameworks and memory processes run at the same
time. This module imports no framework: the workers reach them through
:func:`shared.frameworks.load`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from shared import frameworks
from shared.archs import ARCHS, require_pipeline_arch

__all__ = [
    "BENCH_VERSION",
    "DEFAULT_REPEATS",
    "DEFAULT_STEPS",
    "FEATURE_SPEEDUP_GOAL",
    "FRAMEWORK_ORDER",
    "LONG_FACTOR",
    "LOOP_OVERHEAD_GOAL",
    "TIMED_STRATEGIES",
    "BenchConfig",
    "BenchError",
    "check_goals",
    "measure",
    "memory_tasks",
    "peak_rss_kib",
    "render",
    "summarise",
    "timed_tasks",
    "worker_main",
]

BENCH_VERSION = 1
TIMED_STRATEGIES = ("frozen", "feature_extraction")
# torch first: its set-up may have to pretrain the cached checkpoint the tf worker then reads
FRAMEWORK_ORDER = ("torch", "tf")
# N per arch: runs are timed at N and L = LONG_FACTOR * N steps. tinyconv: RunConfig's default.
DEFAULT_STEPS = {"tinyconv": 30, "resnet18": 10}
# Large enough that the L - N extra steps outweigh the noise of a run's fixed costs (a Keras
# run's build and tracing, about a second, varies by a tenth of a second here).
LONG_FACTOR = 6
DEFAULT_REPEATS = 5
# The project's training path may cost at most 10% more per step than the bare loop.
LOOP_OVERHEAD_GOAL = 1.10
# After caching, a feature_extraction epoch should be at least 3x faster than a frozen one.
FEATURE_SPEEDUP_GOAL = 3.0
# Memory processes at once: memory does not depend on the load, wall time does.
MEMORY_JOBS = 2


class BenchError(RuntimeError):
    """A benchmark worker failed: the message names the worker, the task and its log's end."""


@dataclass(frozen=True)
class BenchConfig:
    arch: str = "tinyconv"
    repeats: int = DEFAULT_REPEATS
    # N: train.run and the bare loops are timed at N and long_factor * N steps;
    # None = DEFAULT_STEPS[arch]
    steps: int | None = None
    long_factor: int = LONG_FACTOR
    # untimed runs of every task before the timed repeats
    warmup: int = 1
    # epochs of the timed pretraining (the shipped checkpoint took PretrainConfig's 20)
    pretrain_epochs: int = 1
    pretrain: bool = True
    memory: bool = True
    # memory configurations to measure; None = all of memory_tasks()
    memory_only: tuple[str, ...] | None = None
    frameworks: tuple[str, ...] = FRAMEWORK_ORDER
    # canonical pretrained checkpoint; None = the shipped one for tinyconv (as `freeze-parity run` does)
    checkpoint: str | None = None
    # intra- and inter-op threads in both frameworks; None = each framework's default
    threads: int | None = None
    # smoke-test settings: the figures mean nothing
    quick: bool = False

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"bench: unknown arch {self.arch!r}; expected one of: {', '.join(ARCHS)}")
        require_pipeline_arch(self.arch, "bench")
        if self.steps is None:
            object.__setattr__(self, "steps", DEFAULT_STEPS[self.arch])
        for name, minimum in (("repeats", 1), ("steps", 1), ("long_factor", 2), ("warmup", 0),
                              ("pretrain_epochs", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"bench: {name} must be an integer >= {minimum}, got {value!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"bench: threads must be an integer >= 1, got {self.threads!r}")
        if not self.frameworks:
            raise ValueError("bench: no framework to measure")
        for fw in self.frameworks:
            frameworks.check_framework(fw)
        # always torch first (see FRAMEWORK_ORDER), each once
        object.__setattr__(self, "frameworks",
                           tuple(fw for fw in FRAMEWORK_ORDER if fw in self.frameworks))
        if self.memory_only is not None:
            known = memory_tasks(replace(self, memory_only=None))
            unknown = [t for t in self.memory_only if t not in known]
            if unknown:
                raise ValueError(f"bench: unknown memory configuration(s) {', '.join(unknown)}; "
                                 f"expected some of: {', '.join(known)}")

    @property
    def long_steps(self) -> int:
        return self.steps * self.long_factor


def timed_tasks(config: BenchConfig) -> list[str]:
    """Every timed task, as ``kind/strategy/steps`` or a probe name."""
    n = config.steps
    tasks = []
    for strategy in TIMED_STRATEGIES:
        for kind in ("run", "bare"):
            tasks += [f"{kind}/{strategy}/{n}", f"{kind}/{strategy}/{config.long_steps}"]
        tasks.append(f"record/{strategy}/{n}")
    tasks += ["heldout", "cache"]
    if config.pretrain:
        tasks.append("pretrain")
    return tasks


def memory_tasks(config: BenchConfig) -> list[str]:
    """Configurations whose peak memory is measured, each in a fresh process."""
    if config.memory_only is not None:
        return list(config.memory_only)
    n = config.steps
    tasks = ["idle"] + [f"{kind}/{strategy}/{n}" for kind in ("run", "bare")
                        for strategy in TIMED_STRATEGIES]
    return tasks + (["pretrain"] if config.pretrain else [])


# --------------------------------------------------------------------------- #
# the worker process (one framework)
# --------------------------------------------------------------------------- #
def peak_rss_kib() -> tuple[int, str]:
    """This process's peak resident set size in KiB, and where it was read."""
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]), "VmHWM"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak // 1024 if sys.platform == "darwin" else peak), "ru_maxrss"  # macOS: bytes


class _Session:
    """A worker's framework, data and lazily built tasks."""

    def __init__(self, framework: str, spec: dict):
        self.framework, self.spec = framework, spec
        self.train = frameworks.load(framework, "train")
        self.impl = frameworks.load(framework, "bench")
        if spec["threads"] is not None:
            self.impl.set_threads(spec["threads"])
        self._tasks: dict[str, Callable[[], object]] = {}
        self._prepared = None

    @property
    def prepared(self):
        if self._prepared is None:
            from shared.finetune import prepare
            from shared.record import RunConfig

            config = RunConfig(arch=self.spec["arch"], steps=self.spec["long_steps"],
                               checkpoint=self.spec["checkpoint"])
            self._prepared = prepare(config)
        return self._prepared

    def setup(self) -> dict:
        prepared = self.prepared
        return {"framework": self.framework, **self.impl.info(),
                "train_items": len(prepared.train), "heldout_items": len(prepared.heldout),
                "batch_size": prepared.config.batch_size, "eval_every": prepared.config.eval_every,
                "optimizer": prepared.config.optimizer,
                "learning_rate": prepared.config.learning_rate,
                "checkpoint": prepared.checkpoint}

    def task(self, name: str) -> Callable[[], object]:
        if name not in self._tasks:
            self._tasks[name] = self._make(name)
        return self._tasks[name]

    def _make(self, name: str) -> Callable[[], object]:
        from shared.record import RunConfig

        kind, _, rest = name.partition("/")
        if kind in ("run", "bare", "record"):
            strategy, _, steps = rest.partition("/")
            steps = int(steps)
            if kind == "run":
                # checkpoint as the user gave it (None: the shipped one, looked up per run)
                config = RunConfig(arch=self.spec["arch"], strategy=strategy, steps=steps,
                                   checkpoint=self.spec["checkpoint"])
                return lambda: self.train.run(config)
            factory = self.impl.bare_train if kind == "bare" else self.impl.record_probe
            work = factory(self.prepared, strategy)
            return lambda: work(steps)
        if name == "heldout":
            return self.impl.heldout_probe(self.prepared, "frozen")
        if name == "cache":
            return self.impl.cache_probe(self.prepared)
        if name == "pretrain":
            return self._pretrain
        if name == "idle":
            return lambda: None
        raise ValueError(f"bench worker: unknown task {name!r}")

    def _pretrain(self) -> None:
        from shared.pretrain import PretrainConfig, pretrain

        config = PretrainConfig(arch=self.spec["arch"], framework=self.framework,
                                epochs=self.spec["pretrain_epochs"])
        with tempfile.TemporaryDirectory(prefix="freeze-parity-bench-") as tmp:
            pretrain(config, Path(tmp) / "pretrained.safetensors")

    def time(self, name: str) -> float:
        work = self.task(name)  # set-up (model building, tracing probes) is not timed
        gc.collect()
        # every task under the thread setting train.run uses (torch: RUN_THREADS intra-op
        # threads), so the bare loop and the probes are compared with the project path like
        # with like
        with self.train.run_threads():
            start = time.perf_counter()
            work()
            self.impl.synchronize()
            return time.perf_counter() - start


def _reply(channel, message: dict) -> None:
    channel.write(json.dumps(message) + "\n")
    channel.flush()


def worker_main(argv: list[str] | None = None) -> int:
    """Entry point of a worker: ``<framework> <spec JSON>``; JSON lines in, JSON lines out."""
    framework, spec = (sys.argv[1:] if argv is None else argv)
    spec = json.loads(spec)
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # anything else written to stdout (libraries, C code) goes to the log
    try:
        session = _Session(framework, spec)
    except Exception as exc:  # noqa: BLE001  (reported to the parent, which raises)
        traceback.print_exc()
        _reply(channel, {"error": f"{type(exc).__name__}: {exc}"})
        return 1
    _reply(channel, {"ready": True})
    for line in sys.stdin:
        message = json.loads(line)
        op = message.get("op")
        try:
            if op == "quit":
                _reply(channel, {"bye": True})
                return 0
            if op == "setup":
                _reply(channel, session.setup())
            elif op == "time":
                _reply(channel, {"seconds": session.time(message["task"])})
            elif op == "peak":
                kib, source = peak_rss_kib()
                _reply(channel, {"peak_rss_kib": kib, "source": source})
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as exc:  # noqa: BLE001  (reported to the parent, which raises)
            traceback.print_exc()
            _reply(channel, {"error": f"{type(exc).__name__}: {exc}"})
    return 0


_WORKER = "import sys; from shared.bench import worker_main; sys.exit(worker_main())"


class _Worker:
    """The parent's handle on one worker process."""

    def __init__(self, framework: str, spec: dict, log_dir: str):
        self.framework = framework
        fd, self.log_path = tempfile.mkstemp(prefix=f"{framework}-", suffix=".log", dir=log_dir)
        self._log = os.fdopen(fd, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER, framework, json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, encoding="utf-8")
        self._ready = False

    def _read(self, what: str) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            status = self.proc.wait()
            raise BenchError(f"bench: {self.framework} worker exited with status {status} during "
                             f"{what}; {self._log_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise BenchError(f"bench: {self.framework} worker, {what}: {reply['error']}; "
                             f"{self._log_tail()}")
        return reply

    def _log_tail(self) -> str:
        self._log.flush()
        lines = [ln for ln in Path(self.log_path).read_text(errors="replace").splitlines()
                 if ln.strip()]
        return "log ends: " + (" | ".join(lines[-3:]) if lines else "(empty)")

    def call(self, op: str, **fields) -> dict:
        what = fields.get("task", op)
        if not self._ready:
            self._read("start-up")
            self._ready = True
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        return self._read(what)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self.proc.poll() is None:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdout.close()
        self._log.close()


# --------------------------------------------------------------------------- #
# the parent: orchestration
# --------------------------------------------------------------------------- #
def _spec(config: BenchConfig) -> dict:
    return {"arch": config.arch, "steps": config.steps, "checkpoint": config.checkpoint,
            "pretrain_epochs": config.pretrain_epochs, "threads": config.threads,
            "long_steps": config.long_steps}


def _machine() -> dict:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_kib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_count": os.cpu_count(), "usable_cpus": usable, "cpu_model": model,
            "memory_kib": memory_kib, "platform": platform.platform(),
            "python": platform.python_version(), "gpu": "none used (CPU only)"}


def _loadavg() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def _time_all(config: BenchConfig, log_dir: str, progress,
              after_setup: Callable[[], None] = lambda: None) -> tuple[dict, dict, dict]:
    tasks = timed_tasks(config)
    fws = config.frameworks
    # The schedule, in lock-step order: (timed?, round, task, framework).
    schedule = [(False, w, task, fw) for w in range(config.warmup) for task in tasks for fw in fws]
    for r in range(config.repeats):
        shift = r % len(tasks)  # rotate the task order; alternate which framework goes first
        schedule += [(True, r, task, fw) for task in tasks[shift:] + tasks[:shift]
                     for fw in (fws if r % 2 == 0 else fws[::-1])]
    warm: dict = {fw: {t: [] for t in tasks} for fw in fws}
    raw: dict = {fw: {t: [] for t in tasks} for fw in fws}
    workers: dict[str, _Worker] = {}

    def execute(items) -> None:
        last = None
        for timed, round_, task, fw in items:
            if (timed, round_) != last and not config.quick:
                progress(f"{'repeat' if timed else 'warm-up'} {round_ + 1}/"
                         f"{config.repeats if timed else config.warmup}")
                last = (timed, round_)
            seconds = workers[fw].call("time", task=task)["seconds"]
            (raw if timed else warm)[fw][task].append(seconds)

    try:
        for fw in fws:  # started together, so their imports overlap
            workers[fw] = _Worker(fw, _spec(config), log_dir)
        infos = {}
        for fw in fws:  # in order: torch's set-up may pretrain the checkpoint tf then reads
            progress(f"{fw}: importing, loading data and checkpoint")
            infos[fw] = workers[fw].call("setup")
        after_setup()
        if config.quick:  # smoke test: the frameworks run at the same time
            progress("timing, frameworks concurrently (quick)")
            with ThreadPoolExecutor(max_workers=len(fws)) as pool:
                list(pool.map(lambda fw: execute([i for i in schedule if i[3] == fw]), fws))
        else:
            execute(schedule)
        return infos, warm, raw
    finally:
        for worker in workers.values():
            worker.close()


def _memory_one(config: BenchConfig, log_dir: str, framework: str, task: str) -> dict:
    worker = _Worker(framework, _spec(config), log_dir)
    try:
        worker.call("setup")
        if task != "idle":
            worker.call("time", task=task)
        return worker.call("peak")
    finally:
        worker.close()


def _memory_all(config: BenchConfig, log_dir: str, progress) -> dict:
    jobs = [(fw, task) for fw in config.frameworks for task in memory_tasks(config)]
    progress(f"peak memory: {len(jobs)} fresh processes, {MEMORY_JOBS} at a time")
    with ThreadPoolExecutor(max_workers=MEMORY_JOBS) as pool:
        replies = list(pool.map(lambda job: _memory_one(config, log_dir, *job), jobs))
    sources = sorted({reply["source"] for reply in replies})
    out: dict = {"source": "/".join(sources), "unit": "KiB",
                 "peak_rss_kib": {fw: {} for fw in config.frameworks}}
    for (fw, task), reply in zip(jobs, replies):
        out["peak_rss_kib"][fw][task] = reply["peak_rss_kib"]
    return out


def measure(config: BenchConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark; the full result (machine, config, raw timings, figures, goals)."""
    progress = progress or (lambda message: None)
    started = time.time()
    load_before = _loadavg()
    with (tempfile.TemporaryDirectory(prefix="freeze-parity-bench-logs-") as log_dir,
          ThreadPoolExecutor(max_workers=1) as background):
        pending = []

        def start_memory() -> None:
            # quick (smoke test) only: the memory processes run beside the timing, once the
            # checkpoint exists; otherwise they run after it, on a machine the timing left idle
            if config.memory and config.quick:
                pending.append(background.submit(_memory_all, config, log_dir, progress))

        infos, warm, raw = _time_all(config, log_dir, progress, after_setup=start_memory)
        progress("timing done")
        if pending:
            memory = pending[0].result()
        else:
            memory = _memory_all(config, log_dir, progress) if config.memory else None
    progress("done")
    machine = {**_machine(), "load_average_before": load_before, "load_average_after": _loadavg(),
               "frameworks": infos}
    first = infos[config.frameworks[0]]
    result = {
        "version": BENCH_VERSION,
        "started_unix": round(started, 3),
        "seconds": round(time.time() - started, 3),
        "machine": machine,
        "config": {**asdict(config), "steps_short": config.steps, "steps_long": config.long_steps,
                   "batch_size": first["batch_size"], "eval_every": first["eval_every"],
                   "optimizer": first["optimizer"], "learning_rate": first["learning_rate"],
                   "train_items": first["train_items"],
                   "steps_per_epoch": first["train_items"] // first["batch_size"],
                   "timed_tasks": timed_tasks(config),
                   "memory_tasks": memory_tasks(config) if config.memory else []},
        "units": {"timings": "seconds (wall clock, time.perf_counter)",
                  "memory": "KiB (peak resident set size)"},
        "warmup_seconds": warm,
        "raw_seconds": raw,
        "memory": memory,
    }
    result["figures"] = summarise(raw, result["config"])
    result["goals"] = check_goals(result["figures"], config.frameworks)
    return result


# --------------------------------------------------------------------------- #
# figures
# --------------------------------------------------------------------------- #
def _stat(values: list[float | None]) -> dict:
    valid = [v for v in values if v is not None]
    return {"median": statistics.median(valid) if valid else None, "repeats": list(values)}


def _ratio(a: list[float], b: list[float]) -> list[float | None]:
    # a marginal can come out <= 0 when the machine's noise exceeds it: no ratio then
    return [x / y if x is not None and y is not None and x > 0 and y > 0 else None
            for x, y in zip(a, b)]


def _framework_figures(raw: dict, config: dict) -> dict:
    n, long, per_epoch = config["steps_short"], config["steps_long"], config["steps_per_epoch"]
    heldout_share = [t / config["eval_every"] for t in raw["heldout"]]
    out: dict = {}
    loops, bares = {}, {}
    for strategy in TIMED_STRATEGIES:
        run_n, run_l = raw[f"run/{strategy}/{n}"], raw[f"run/{strategy}/{long}"]
        bare_n, bare_l = raw[f"bare/{strategy}/{n}"], raw[f"bare/{strategy}/{long}"]
        run = [t / n for t in run_n]
        loop = [(b - a) / (long - n) for a, b in zip(run_n, run_l)]
        bare_full = [t / n for t in bare_n]
        bare = [(b - a) / (long - n) for a, b in zip(bare_n, bare_l)]
        record = [t / n for t in raw[f"record/{strategy}/{n}"]]
        remainder = [lp - bp - rc - ho for lp, bp, rc, ho in zip(loop, bare, record, heldout_share)]
        loops[strategy], bares[strategy] = loop, bare
        out[strategy] = {
            "run_per_step_s": _stat(run),
            "loop_per_step_s": _stat(loop),
            "bare_full_per_step_s": _stat(bare_full),
            "bare_per_step_s": _stat(bare),
            "loop_vs_bare": _stat(_ratio(loop, bare)),
            "run_vs_bare": _stat(_ratio(run, bare_full)),
            "record_per_step_s": _stat(record),
            "heldout_per_step_s": _stat(heldout_share),
            "remainder_per_step_s": _stat(remainder),
            "loop_epoch_s": _stat([t * per_epoch for t in loop]),
            "bare_epoch_s": _stat([t * per_epoch for t in bare]),
        }
    out["feature_speedup"] = {
        "project": _stat(_ratio(loops["frozen"], loops["feature_extraction"])),
        "bare": _stat(_ratio(bares["frozen"], bares["feature_extraction"])),
    }
    out["feature_cache_s"] = _stat(raw["cache"])
    out["heldout_eval_s"] = _stat(raw["heldout"])
    if "pretrain" in raw:
        out["pretrain_s"] = _stat(raw["pretrain"])
    return out


def summarise(raw: dict, config: dict) -> dict:
    """Figures from raw timings: per framework, and tf over torch where both ran."""
    figures = {fw: _framework_figures(raw[fw], config) for fw in raw}
    if {"torch", "tf"} <= set(raw):
        cross = {}
        for strategy in TIMED_STRATEGIES:
            tf_fig, torch_fig = figures["tf"][strategy], figures["torch"][strategy]
            cross[strategy] = {
                what: _stat(_ratio(tf_fig[key]["repeats"], torch_fig[key]["repeats"]))
                for what, key in (("run", "run_per_step_s"), ("loop", "loop_per_step_s"),
                                  ("bare", "bare_per_step_s"))}
        if "pretrain_s" in figures["tf"]:
            cross["pretrain"] = _stat(_ratio(figures["tf"]["pretrain_s"]["repeats"],
                                             figures["torch"]["pretrain_s"]["repeats"]))
        figures["tf_vs_torch"] = cross
    return figures


def check_goals(figures: dict, fws) -> list[dict]:
    """The issue's goals against the measured medians: met or not, never hidden."""
    goals = []

    def add(goal, fw, strategy, measured, target, met):
        goals.append({"goal": goal, "framework": fw, "strategy": strategy, "target": target,
                      "measured": measured, "met": bool(measured is not None and met(measured))})

    for fw in fws:
        for strategy in TIMED_STRATEGIES:
            for what in ("loop_vs_bare", "run_vs_bare"):
                add(what, fw, strategy, figures[fw][strategy][what]["median"],
                    f"<= {LOOP_OVERHEAD_GOAL}", lambda v: v <= LOOP_OVERHEAD_GOAL)
        add("feature_speedup", fw, "feature_extraction",
            figures[fw]["feature_speedup"]["project"]["median"], f">= {FEATURE_SPEEDUP_GOAL}",
            lambda v: v >= FEATURE_SPEEDUP_GOAL)
    return goals


# --------------------------------------------------------------------------- #
# the table
# --------------------------------------------------------------------------- #
def _ms(value) -> str:
    if value is None:
        return "-"
    ms = value * 1e3
    return f"{ms:,.0f}" if abs(ms) >= 100 else f"{ms:.2f}" if abs(ms) < 10 else f"{ms:.1f}"


def _s(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _x(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _median(figure: dict | None):
    return None if figure is None else figure["median"]


def render(result: dict) -> list:
    """Rich renderables: timings, memory and goals tables."""
    from rich.table import Table

    config, figures, machine = result["config"], result["figures"], result["machine"]
    fws = [fw for fw in FRAMEWORK_ORDER if fw in figures]
    cross = figures.get("tf_vs_torch", {})
    n, per_epoch = config["steps_short"], config["steps_per_epoch"]
    versions = []
    for fw in fws:
        info = machine["frameworks"][fw]
        versions.append(f"torch {info['torch']}" if fw == "torch"
                        else f"tensorflow {info['tensorflow']} / keras {info['keras']}")
    threads = config["threads"] or "framework default"
    caption = (f"{machine['cpu_count']} CPUs ({machine['cpu_model']}), no GPU; threads: {threads}; "
               f"Python {machine['python']}; {'; '.join(versions)}; load average "
               f"{machine['load_average_before']} -> {machine['load_average_after']}")
    quick = " [QUICK: smoke-test settings, figures meaningless]" if config["quick"] else ""
    table = Table(title=f"freeze-parity bench: {config['arch']}, batch {config['batch_size']}, "
                        f"{config['optimizer']}; medians of {config['repeats']} repeats after "
                        f"{config['warmup']} warm-up{quick}", caption=caption)
    table.add_column("per training step (ms) unless stated", no_wrap=True)
    for fw in fws:
        table.add_column(fw, justify="right")
    if cross:
        table.add_column("tf / torch", justify="right")

    def row(label, get, fmt=_ms, cross_value=None):
        cells = [fmt(_median(get(figures[fw]))) for fw in fws]
        if cross:
            cells.append(_x(_median(cross_value)))
        table.add_row(label, *cells)

    every = config["eval_every"]
    for strategy in TIMED_STRATEGIES:
        c = cross.get(strategy, {})
        row(f"{strategy}: train.run, whole path ({n} steps)",
            lambda f, s=strategy: f[s]["run_per_step_s"], cross_value=c.get("run"))
        row(f"  loop alone (marginal, {n} -> {config['steps_long']} steps)",
            lambda f, s=strategy: f[s]["loop_per_step_s"], cross_value=c.get("loop"))
        row("    recording: inference loss per step", lambda f, s=strategy: f[s]["record_per_step_s"])
        row(f"    recording: held-out eval / {every}", lambda f, s=strategy: f[s]["heldout_per_step_s"])
        row("    remainder beyond bare + recording",
            lambda f, s=strategy: f[s]["remainder_per_step_s"])
        row("  bare loop (marginal)", lambda f, s=strategy: f[s]["bare_per_step_s"],
            cross_value=c.get("bare"))
        row(f"  bare, whole script ({n} steps)", lambda f, s=strategy: f[s]["bare_full_per_step_s"])
        row("  loop / bare", lambda f, s=strategy: f[s]["loop_vs_bare"], _x)
        row("  whole run / whole bare", lambda f, s=strategy: f[s]["run_vs_bare"], _x)
        table.add_section()
    row(f"epoch ({per_epoch} steps), frozen, train.run loop",
        lambda f: f["frozen"]["loop_epoch_s"])
    row("epoch, feature_extraction, train.run loop",
        lambda f: f["feature_extraction"]["loop_epoch_s"])
    row("  frozen / feature_extraction, train.run", lambda f: f["feature_speedup"]["project"], _x)
    row("  frozen / feature_extraction, bare", lambda f: f["feature_speedup"]["bare"], _x)
    row("feature cache, one-time", lambda f: f["feature_cache_s"])
    row("held-out evaluation, one", lambda f: f["heldout_eval_s"])
    if config["pretrain"]:
        row(f"pretraining, {config['pretrain_epochs']} epoch(s) (s)", lambda f: f["pretrain_s"], _s,
            cross_value=cross.get("pretrain"))
    out = [table]

    memory = result.get("memory")
    if memory:
        peaks = memory["peak_rss_kib"]
        mem = Table(title=f"peak resident memory, MiB ({memory['source']} of a fresh process "
                          f"per configuration; + over idle)")
        mem.add_column("configuration", no_wrap=True)
        for fw in fws:
            mem.add_column(fw, justify="right")
        for task in config["memory_tasks"]:
            cells = []
            for fw in fws:
                kib, idle = peaks[fw].get(task), peaks[fw].get("idle")
                if kib is None:
                    cells.append("-")
                elif idle is None or task == "idle":
                    cells.append(f"{kib / 1024:,.0f}")
                else:
                    cells.append(f"{kib / 1024:,.0f} (+{(kib - idle) / 1024:,.0f})")
            mem.add_row(task, *cells)
        out.append(mem)

    goals = Table(title="goals")
    for column in ("goal", "framework", "strategy", "target", "measured", "met"):
        goals.add_column(column, justify="right" if column == "measured" else "left")
    for goal in result["goals"]:
        goals.add_row(goal["goal"], goal["framework"], goal["strategy"], goal["target"],
                      _x(goal["measured"]), "yes" if goal["met"] else "[bold red]no[/]")
    out.append(goals)
    return out

