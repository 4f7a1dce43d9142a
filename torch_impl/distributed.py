"""One DDP rank: ``train.run`` on this rank's shard, and the worker torchrun starts.

``python -m torch.distributed.run --nproc-per-node=2 ... -m torch_impl.distributed
JOB OUT`` (built by :func:`shared.distributed.launch`) starts this module once per
rank; each rank joins the gloo group on 127.0.0.1, runs every entry of the job
and writes its results to ``OUT/rank<r>.json``. Mirrors ``tf_impl/distributed.py``,
where one process holds every replica.

What DDP does to freezing, in this module's terms: parameters with
``requires_grad=False`` are not registered with the reducer (so a frozen base
needs no ``find_unused_parameters``), a module with no trainable parameter is
refused, and by default every forward of the wrapped module first copies rank
0's buffers, BatchNorm statistics included, to every rank
(``forward_sync_buffers=True``; the ``broadcast_buffers=True`` that torch 2.14
deprecates does the same, see :data:`BUFFER_SYNC_FLAG`).
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from shared import distributed as shared_dist
from shared.io import atomic_write_json
from shared.record import RunConfig
from shared.strategies import bn_prefixes
from torch_impl import train
from torch_impl.freeze import apply_strategy
from torch_impl.model import build_model
from torch_impl.weights import export_weights

__all__ = ["BUFFER_SYNC_FLAG", "PROBES", "Replica", "bn_statistics", "main", "run", "time_run"]

# DDP's keyword for "copy rank 0's buffers to every rank at the start of every forward", on
# the installed torch. torch 2.14 deprecates broadcast_buffers (a FutureWarning, whatever its
# value) for forward_sync_buffers; the two differ at initialisation only: DDP copies rank 0's
# buffers when it wraps the module under forward_sync_buffers=False, not under
# broadcast_buffers=False (measured: tests/test_distributed.py, docs/PORTING.md). The runs
# here start every rank from the same checkpoint, so that copy changes nothing in them.
BUFFER_SYNC_FLAG = ("forward_sync_buffers"
                    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                    else "broadcast_buffers")


class Replica:
    """The replica context of one DDP rank (same methods as ``train._OneProcess``)."""

    def __init__(self, options: shared_dist.ReplicaOptions, rank: int, replicas: int):
        self.options, self.rank, self.replicas = options, rank, replicas
        self.fail = shared_dist.parse_failure_injection(os.environ.get(shared_dist.FAIL_ENV))
        self.wrapped: DistributedDataParallel | None = None
        self.model: nn.Module | None = None
        self.bn_at_wrap: dict[str, list[float]] = {}

    def shard(self, idx: np.ndarray) -> np.ndarray:
        return shared_dist.shard(idx, self.rank, self.replicas)

    def wrap(self, trainee: nn.Module, model: nn.Module) -> nn.Module:
        self.model = model
        self.bn_at_wrap = bn_statistics(model)  # what this rank starts from, before DDP's copy
        self.wrapped = DistributedDataParallel(
            trainee, **{BUFFER_SYNC_FLAG: self.options.broadcast_buffers},
            find_unused_parameters=self.options.find_unused_parameters)
        return self.wrapped

    def mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t[0]) / self.replicas

    def on_step(self, step: int) -> None:
        if self.fail and self.fail[0] == self.rank and self.fail[2] == step:
            shared_dist.inject_failure(self.fail[1])  # a rank dying or hanging mid-run (tests)


def bn_statistics(model: nn.Module) -> dict[str, list[float]]:
    """Canonical BN statistic key -> values, as this process's model holds them."""
    weights = export_weights(model, np.float64)
    keys = [f"{p}.{s}" for p in sorted(bn_prefixes(weights)) for s in ("running_mean", "running_var")]
    return {k: weights[k].tolist() for k in keys}


def run(config: RunConfig, options: shared_dist.ReplicaOptions, rank: int, replicas: int) -> dict:
    """``train.run`` as rank ``rank``; this rank's part of a ReplicaRecord."""
    replica = Replica(options, rank, replicas)
    record = train.run(config, replica=replica)
    own = bn_statistics(replica.model)
    extra = {"ddp_buffer_sync": f"{BUFFER_SYNC_FLAG}={options.broadcast_buffers}",
             "bn_at_wrap": replica.bn_at_wrap}
    if replica.wrapped.module is replica.model and own:
        # One more forward of the wrapped model, in eval mode and without gradients:
        # syncing buffers at every forward, it still copies rank 0's statistics here.
        replica.wrapped.eval()
        image = next(replica.model.parameters()).new_zeros((2, 3, *_image_size(config)))
        with torch.no_grad():
            replica.wrapped(image)
        extra["bn_after_one_more_forward"] = bn_statistics(replica.model)
    return {"record": record.to_dict(), "options": asdict(options), "replica_bn": [own],
            # what `if rank == 0: torch.save(model.state_dict(), ...)` saves
            "saved_bn": own, "extra": extra}


def time_run(config: RunConfig, options: shared_dist.ReplicaOptions | None, rank: int,
             replicas: int) -> dict:
    """Wall seconds of one ``train.run``: data-parallel on every rank, or (``options`` None)
    single-process on rank 0 while the other ranks wait, so it has the cores to itself."""
    dist.barrier()
    start = time.perf_counter()
    if options is not None:
        train.run(config, replica=Replica(options, rank, replicas))
    elif rank == 0:
        train.run(config)
    seconds = time.perf_counter() - start
    dist.barrier()
    return {"seconds": seconds if options is not None or rank == 0 else None}


def _image_size(config: RunConfig) -> tuple[int, int]:
    from shared.archs import arch_config

    size = arch_config(config.arch).image_size
    return size, size


# --- probes: engine facts the tests pin, measured in the real process group ------------


def _probe_no_trainable(rank: int, replicas: int) -> dict:
    model = apply_strategy(build_model("tinyconv", 5), "frozen")
    try:
        DistributedDataParallel(model.base)
        base_error = None
    except RuntimeError as exc:
        base_error = str(exc)
    DistributedDataParallel(model)  # the head trains: accepted
    return {"base_error": base_error, "whole_model_accepted": True}


class _TwoHeads(nn.Module):
    def __init__(self, unused_requires_grad: bool):
        super().__init__()
        self.used = nn.Linear(4, 2)
        self.unused = nn.Linear(4, 2)
        self.unused.requires_grad_(unused_requires_grad)

    def forward(self, x):
        return self.used(x)


def _steps_until_error(module: nn.Module, find_unused: bool, steps: int = 3) -> dict:
    wrapped = DistributedDataParallel(module, find_unused_parameters=find_unused)
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    for step in range(steps):
        try:
            loss = wrapped(torch.ones(2, 4)).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        except RuntimeError as exc:
            return {"error_at_step": step, "error": str(exc).splitlines()[0]}
    return {"error_at_step": None, "error": None}


def _probe_unused_parameters(rank: int, replicas: int) -> dict:
    torch.manual_seed(0)
    return {
        "frozen_unused": _steps_until_error(_TwoHeads(False), find_unused=False),
        "trainable_unused": _steps_until_error(_TwoHeads(True), find_unused=False),
        "trainable_unused_find": _steps_until_error(_TwoHeads(True), find_unused=True),
    }


def _probe_sync_batchnorm(rank: int, replicas: int) -> dict:
    model = nn.SyncBatchNorm.convert_sync_batchnorm(build_model("tinyconv", 5))
    found = {"error": None, "forward_error": None}
    try:
        DistributedDataParallel(model)
    except ValueError as exc:
        found["error"] = str(exc)
    try:
        model.train()(torch.ones(2, 3, 32, 32))  # in the process group, without DDP
    except ValueError as exc:
        found["forward_error"] = str(exc)
    return found


def _bn_stats(module: nn.Module) -> list[float]:
    bn = module[1]
    return torch.cat([bn.running_mean, bn.running_var]).tolist()


def _rank_local_forward(module: nn.Module, rank: int, seed: int) -> None:
    """A training-mode forward of the module itself (not DDP) on this rank's own data: its
    BN statistics move to values of this rank alone."""
    g = torch.Generator().manual_seed(seed + rank)
    with torch.no_grad():
        module.train()(torch.randn(8, 3, 4, 4, generator=g) * (1 + rank) + rank)


def _probe_buffer_flags(rank: int, replicas: int) -> dict:
    """Each way of passing DDP's buffer flag: this rank's BN statistics before the wrap (its
    own), right after it, after another rank-local update, and after one more forward of the
    wrapped model (eval mode, no_grad); and the FutureWarnings the wrap raised."""
    settings = {"default": {}, "broadcast_buffers=True": {"broadcast_buffers": True},
                "broadcast_buffers=False": {"broadcast_buffers": False}}
    if BUFFER_SYNC_FLAG == "forward_sync_buffers":
        settings.update({"forward_sync_buffers=True": {"forward_sync_buffers": True},
                         "forward_sync_buffers=False": {"forward_sync_buffers": False}})
    found = {}
    for name, kwargs in settings.items():
        torch.manual_seed(0)  # the same parameters on every rank; DDP copies them anyway
        module = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        _rank_local_forward(module, rank, seed=10)
        stages = {"before_wrap": _bn_stats(module)}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # measured here, not shown: the deprecated flag
            wrapped = DistributedDataParallel(module, **kwargs)
        stages["after_wrap"] = _bn_stats(module)
        _rank_local_forward(module, rank, seed=20)
        stages["after_local_update"] = _bn_stats(module)
        wrapped.eval()
        with torch.no_grad():
            wrapped(torch.zeros(2, 3, 4, 4))
        stages["after_forward"] = _bn_stats(module)
        stages["future_warnings"] = [str(w.message) for w in caught
                                     if issubclass(w.category, FutureWarning)]
        found[name] = stages
    return found


PROBES = {
    "ddp_no_trainable": _probe_no_trainable,
    "ddp_unused_parameters": _probe_unused_parameters,
    "ddp_sync_batchnorm_cpu": _probe_sync_batchnorm,
    "ddp_buffer_flags": _probe_buffer_flags,
}


def main(argv: list[str] | None = None) -> int:
    job_path, out = (argv if argv is not None else sys.argv[1:])[:2]
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    rank, replicas = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=replicas)  # env://: torchrun's address
    try:
        results = []
        for entry in job["entries"]:
            if entry["kind"] == "run":
                results.append(run(RunConfig.from_dict(entry["config"]),
                                   shared_dist.ReplicaOptions(**entry["options"]), rank, replicas))
            elif entry["kind"] == "time":
                options = entry["options"] and shared_dist.ReplicaOptions(**entry["options"])
                results.append(time_run(RunConfig.from_dict(entry["config"]), options, rank,
                                        replicas))
            else:
                results.append({"probe": PROBES[entry["key"]](rank, replicas)})
            dist.barrier()
        atomic_write_json(Path(out) / f"rank{rank}.json", results)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
