"""Every replica in one process: ``train.run`` under MirroredStrategy, and the worker.

``python -m tf_impl.distributed JOB OUT`` (built by :func:`shared.distributed.launch`)
splits the CPU into N logical devices, which TensorFlow allows only before it
initialises its devices (a process that has run anything already cannot: this
is why it is a subprocess), then runs every entry of the job under
``tf.distribute.MirroredStrategy`` with Keras ``fit`` and writes the results to
``OUT/rank0.json``. Mirrors ``torch_impl/distributed.py``, where each rank is a
process.

What MirroredStrategy does to freezing, in this module's terms: ``fit`` splits
each global batch into one contiguous slice per replica; BatchNorm's moving
statistics are mirrored variables that every replica assigns from its own
slice, so the copies drift apart, and a read (``get_weights``, ``numpy()``,
saving) returns replica 0's copy; ``synchronized=True`` all-reduces the batch
moments so every replica normalises with, and stores, the global batch's.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from shared import distributed as shared_dist
from shared.io import atomic_write_json
from shared.record import RunConfig
from shared.strategies import bn_prefixes
from tf_impl import train
from tf_impl.model import is_batch_norm, named_leaves
from tf_impl.weights import export_weights

__all__ = ["PROBES", "Replica", "bn_statistics", "configure_devices", "main", "run", "time_run"]


def configure_devices(replicas: int) -> list[str]:
    """Split the first CPU into ``replicas`` logical devices; their names."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)])
    except RuntimeError as exc:
        raise RuntimeError(f"configure_devices: TensorFlow has initialised its devices already "
                           f"({exc}); call it first thing in a fresh process") from None
    return [d.name for d in tf.config.list_logical_devices("CPU")][:replicas]


_STRATEGIES: dict[tuple[str, ...], tf.distribute.MirroredStrategy] = {}


def _strategy(devices: tuple[str, ...]) -> tf.distribute.MirroredStrategy:
    # One strategy per process and device set: a second MirroredStrategy over the same
    # devices reuses the first one's collective instance keys, and its first gradient
    # all-reduce aborts with "Shape mismatch in the collective instance 100".
    if devices not in _STRATEGIES:
        _STRATEGIES[devices] = tf.distribute.MirroredStrategy(list(devices))
    return _STRATEGIES[devices]


class _FailAt(keras.callbacks.Callback):
    def __init__(self, status: int, step: int):
        super().__init__()
        self.status, self.step = status, step

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.step:
            shared_dist.inject_failure(self.status)  # every replica's process dies (tests)


class Replica:
    """The replica context of a MirroredStrategy run (same methods as ``train._OneProcess``)."""

    def __init__(self, options: shared_dist.ReplicaOptions, devices: list[str]):
        self.options = options
        self.strategy = _strategy(tuple(devices[:options.replicas]))
        self.synchronized_bn = options.synchronized_bn
        self.fail = shared_dist.parse_failure_injection(os.environ.get(shared_dist.FAIL_ENV))
        self.model = None

    def scope(self):
        return self.strategy.scope()

    def callbacks(self) -> list:
        # one process holds every replica, so any injected rank takes the process down
        return [_FailAt(self.fail[1], self.fail[2])] if self.fail else []

    def attach(self, model) -> None:
        self.model = model


def bn_statistics(model) -> list[dict[str, list[float]]]:
    """Per replica: canonical BN statistic key -> that replica's copy of the values."""
    replicas = None
    out: list[dict[str, list[float]]] = []
    for name, layer in named_leaves(model):
        if not is_batch_norm(layer):
            continue
        for stat, variable in (("running_mean", layer.moving_mean),
                               ("running_var", layer.moving_variance)):
            copies = getattr(variable.value, "values", (variable.value,))
            replicas = replicas or len(copies)
            out += [{} for _ in range(replicas - len(out))]
            for i, copy in enumerate(copies):
                out[i][f"{name}.{stat}"] = np.asarray(copy.numpy(), np.float64).tolist()
    return out


def run(config: RunConfig, options: shared_dist.ReplicaOptions, devices: list[str]) -> dict:
    """``train.run`` under MirroredStrategy; the process's part of a ReplicaRecord."""
    replica = Replica(options, devices)
    record = train.run(config, replica=replica)
    weights = export_weights(replica.model, np.float64)  # what get_weights / saving read
    saved = {f"{p}.{s}": weights[f"{p}.{s}"].tolist()
             for p in sorted(bn_prefixes(weights)) for s in ("running_mean", "running_var")}
    return {"record": record.to_dict(), "options": asdict(options),
            "replica_bn": bn_statistics(replica.model), "saved_bn": saved,
            "extra": {"devices": list(devices[:options.replicas])}}


def time_run(config: RunConfig, options: shared_dist.ReplicaOptions | None,
             devices: list[str]) -> dict:
    """Wall seconds of one ``train.run``: under MirroredStrategy, or (``options`` None) plain."""
    start = time.perf_counter()
    train.run(config, replica=Replica(options, devices) if options is not None else None)
    return {"seconds": time.perf_counter() - start}


# --- probes: engine facts the tests pin -------------------------------------------------


def _probe_keras_data_parallel(devices: list[str]) -> dict:
    """``keras.distribution.DataParallel`` over the logical devices, then a normal run."""
    from shared.shipped import shipped_checkpoint

    config = RunConfig(strategy="full", steps=3, checkpoint=str(shipped_checkpoint("tinyconv")))
    plain = train.run(config)
    listed = keras.distribution.list_devices("cpu")
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=listed))
    try:
        replica = train._OneProcess()
        captured = {}
        replica.attach = lambda model: captured.setdefault("model", model)
        distributed = train.run(config, replica=replica)
        variable = captured["model"].base.block1.bn.moving_mean.value
    finally:
        keras.distribution.set_distribution(None)
    return {"devices": listed,
            "variable_type": type(variable).__name__,
            "max_loss_diff": max(abs(a - b) for a, b in
                                 zip(plain.train_losses + plain.eval_losses,
                                     distributed.train_losses + distributed.eval_losses)),
            "replicas_in_sync": tf.distribute.get_strategy().num_replicas_in_sync}


def _probe_audit_mirrored(devices: list[str]) -> dict:
    """Hazard codes of tf_impl.audit for models built under a 2-replica MirroredStrategy."""
    from tf_impl.audit import audit
    from tf_impl.freeze import apply_strategy
    from tf_impl.model import build_model

    codes = {}
    with _strategy(tuple(devices[:2])).scope():
        for key, strategy, synchronized in (("full", "full", False), ("frozen", "frozen", False),
                                            ("full_sync", "full", True)):
            model = build_model("tinyconv", 5, norm_layer=train.norm_layer_for(
                "tinyconv", strategy, synchronized=synchronized))
            apply_strategy(model, strategy)
            codes[key] = audit(model).codes()
    return codes


PROBES = {"keras_data_parallel": _probe_keras_data_parallel,
          "keras_audit_mirrored": _probe_audit_mirrored}


def main(argv: list[str] | None = None) -> int:
    job_path, out = (argv if argv is not None else sys.argv[1:])[:2]
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    devices = configure_devices(int(job["replicas"]))  # first: before anything touches TF
    results = []
    for entry in job["entries"]:
        if entry["kind"] == "run":
            results.append(run(RunConfig.from_dict(entry["config"]),
                               shared_dist.ReplicaOptions(**entry["options"]), devices))
        elif entry["kind"] == "time":
            options = entry["options"] and shared_dist.ReplicaOptions(**entry["options"])
            results.append(time_run(RunConfig.from_dict(entry["config"]), options, devices))
        else:
            results.append({"probe": PROBES[entry["key"]](devices)})
    atomic_write_json(Path(out) / "rank0.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
