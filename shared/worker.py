"""A worker process for torch-only runs, so that a second core works while this one does not.

``compare`` needs, besides the lockstep and Keras runs, torch reruns (the
rounding envelope) and float64 runs that depend on nothing else: a
:class:`TorchWorker` runs them in a fresh interpreter (``python -m
shared.worker``) that imports torch only. Jobs go in as JSON lines on its
stdin (a :class:`~shared.record.RunConfig`); each result is written
atomically to a file of a temporary directory, and its job id comes back on
stdout. Jobs run one at a time, in the order given, so they come back in
order. The worker ends when its stdin closes; :meth:`TorchWorker.close`
makes sure it did (and kills it if it did not), so no process outlives the
call. A run's record is the same bit for bit here or in the worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from shared.io import atomic_write_json
from shared.record import RunConfig, RunRecord
from shared.training_state import TrainingState

__all__ = ["CLOSE_TIMEOUT_S", "TorchWorker", "WorkerError", "main"]

CLOSE_TIMEOUT_S = 10.0  # after stdin closes, the worker finishes its current line and exits


class WorkerError(RuntimeError):
    """The worker failed or died: one line naming the job."""


class TorchWorker:
    """``submit`` configs, ``result`` their records, in any order of asking."""

    def __init__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="freeze-parity-worker-")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "shared.worker", self._dir.name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._next = 0
        self._jobs: dict[int, RunConfig] = {}
        self._done: set[int] = set()

    def submit(self, config: RunConfig, states: bool = False) -> int:
        """Queue ``config``'s torch run (``states``: a lockstep reference run, see
        :meth:`reference`); its job id."""
        job = self._next
        self._next += 1
        self._jobs[job] = config
        request = {"job": job, "config": config.__dict__, "states": states}
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        return job

    def reference(self, job: int):
        """A ``submit(config, states=True)`` job's :class:`~shared.lockstep.ReferenceRun`."""
        from shared.lockstep import ReferenceRun

        record = self.result(job)
        path = Path(self._dir.name) / f"{job}.npz"
        if not path.exists():
            raise WorkerError(f"torch worker, job {job} ({self._jobs[job].strategy}): "
                              f"submitted without states")
        meta = json.loads((Path(self._dir.name) / f"{job}.states.json").read_text(encoding="utf-8"))
        with np.load(path) as arrays:
            states = _states_from_arrays(arrays, meta)
        return ReferenceRun(record, states)

    def result(self, job: int) -> RunRecord:
        while job not in self._done:
            line = self._proc.stdout.readline()
            if not line:
                status = self._proc.wait()
                raise WorkerError(f"torch worker exited with status {status} before job {job} "
                                  f"({self._jobs[job].strategy}) finished")
            self._done.add(int(line))
        data = json.loads((Path(self._dir.name) / f"{job}.json").read_text(encoding="utf-8"))
        if "error" in data:
            raise WorkerError(f"torch worker, job {job} ({self._jobs[job].strategy}): "
                              f"{data['error']}")
        return RunRecord.from_dict(data, f"torch worker job {job}")

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        with contextlib.suppress(OSError, ValueError):
            self._proc.stdout.close()
        self._dir.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """The worker: read jobs from stdin, write records to ``argv[0]``, job ids to stdout."""
    from shared import frameworks
    from shared.lockstep import reference_run

    out = Path((argv if argv is not None else sys.argv[1:])[0])
    train = frameworks.load("torch", "train")
    for line in sys.stdin:
        request = json.loads(line)
        job = request["job"]
        try:
            config = RunConfig.from_dict(request["config"])
            if request.get("states"):
                ran = reference_run(config)
                arrays, meta = _states_to_arrays(ran.states)
                _atomic_npz(out / f"{job}.npz", arrays)
                atomic_write_json(out / f"{job}.states.json", meta)
                result = ran.record.to_dict()
            else:
                result = train.run(config).to_dict()
        except Exception as exc:  # noqa: BLE001 - reported to the parent, one line
            result = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}
        atomic_write_json(out / f"{job}.json", result)
        print(request["job"], flush=True)
    return 0


def _states_to_arrays(states: list[TrainingState]) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Every state's arrays under ``"<n>/t/<key>"`` and ``"<n>/s/<slot>/<key>"`` (dtypes
    kept: exact), and what else each state holds."""
    arrays, meta = {}, []
    for n, state in enumerate(states):
        arrays.update({f"{n}/t/{k}": v for k, v in state.tensors.items()})
        arrays.update({f"{n}/s/{slot}/{k}": v for slot, vals in state.slots.items()
                       for k, v in vals.items()})
        meta.append({"tensors": list(state.tensors), "optimizer": state.optimizer,
                     "slots": {slot: list(vals) for slot, vals in state.slots.items()},
                     "step": state.step, "hyper": state.hyper, "parameters": state.parameters})
    return arrays, meta


def _states_from_arrays(arrays, meta: list[dict]) -> list[TrainingState]:
    return [TrainingState({k: arrays[f"{n}/t/{k}"] for k in m["tensors"]}, m["optimizer"],
                          {slot: {k: arrays[f"{n}/s/{slot}/{k}"] for k in keys}
                           for slot, keys in m["slots"].items()},
                          m["step"], m["hyper"], m["parameters"])
            for n, m in enumerate(meta)]


def _atomic_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
