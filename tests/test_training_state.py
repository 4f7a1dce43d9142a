"""Training states across the frameworks (shared/training_state.py, each weights.py).

A training state is what a run needs to continue: model tensors, optimizer slots, step.
These tests pin that it moves

* exactly within a framework (export -> import, in memory and through each file form):
  the framework's own variables come back bit for bit;
* correctly between the frameworks, against a reference written here from the definitions
  (Keras's SGD velocity is -lr x torch's momentum buffer; Adam's moments are the same), not
  through the project's conversion code (the Keras variable of a canonical key is found by
  walking the model's attributes and by Keras's own slot names);
* usefully: a training started in one framework and resumed in the other takes the same
  next steps as the original run continuing, and resuming without the optimizer state
  does not (must match / must differ);

and that bad input is refused with one line naming what and where, changing nothing.

The ``trained`` steppers are shared by the module: tests only read them (export, save);
a test that steps or loads builds its own.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

import numpy as np
import pytest
import torch  # before keras/TensorFlow: see tests/test_import_order.py
from cli_inprocess import cli

from shared import tolerances as tol
from shared.record import RunConfig
from shared.training_state import (
    NotATrainingFile,
    TrainingState,
    is_training_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from tf_impl import keras  # tf_impl imports torch_impl before TensorFlow
from tf_impl import train as tf_train
from tf_impl import weights as tf_weights
from torch_impl import train as torch_train
from torch_impl import weights as torch_weights

ROOT = Path(__file__).resolve().parents[1]
K = 3  # steps taken before a state moves
M = 3  # steps taken after it (float64 resumes)
TRAIN = {"tf": tf_train, "torch": torch_train}
WEIGHTS = {"tf": tf_weights, "torch": torch_weights}
OTHER = {"tf": "torch", "torch": "tf"}
SUFFIX = {"tf": ".safetensors", "torch": ".pt"}  # each framework's own training file
BOOKKEEPING = "num_batches_tracked"


def _config(checkpoint, optimizer="sgd", dtype="float32", strategy="full") -> RunConfig:
    return RunConfig(strategy=strategy, optimizer=optimizer, dtype=dtype, steps=K + M,
                     checkpoint=str(checkpoint))


def _trained(framework: str, config: RunConfig, steps: int = K):
    stepper = TRAIN[framework].Stepper(config)
    for idx in stepper.prepared.indices[:steps]:
        stepper.step(idx)
    return stepper


def _optimizer(stepper):
    return stepper.optimizer if hasattr(stepper, "optimizer") else stepper.trainee.optimizer


@pytest.fixture(scope="module")
def trained(tinyconv_checkpoint):
    """``trained(framework, optimizer, dtype, strategy)``: a stepper after K steps (read only)."""
    cache = {}

    def get(framework, optimizer="sgd", dtype="float32", strategy="full"):
        key = (framework, optimizer, dtype, strategy)
        if key not in cache:
            cache[key] = _trained(framework, _config(tinyconv_checkpoint, optimizer, dtype, strategy))
        return cache[key]

    return get


# --------------------------------------------------------------------------- #
# each framework's own variables, read without the project's conversion code
# --------------------------------------------------------------------------- #
def _torch_raw(stepper) -> tuple[dict, dict]:
    """torch's model state_dict and optimizer state (per parameter name), copied."""
    names = {id(p): k for k, p in stepper.model.named_parameters()}
    slots = {names[id(p)]: {k: v.clone() for k, v in held.items()}
             for p, held in stepper.optimizer.state.items()}
    return {k: v.clone() for k, v in stepper.model.state_dict().items()}, slots


def _keras_raw(stepper) -> list[np.ndarray]:
    """Every optimizer variable (iterations, learning rate, slots) and every model weight, in
    Keras's own order."""
    variables = list(stepper.trainee.optimizer.variables) + list(stepper.model.weights)
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


def _keras_names(stepper) -> list[str]:
    return [v.name for v in list(stepper.trainee.optimizer.variables) + list(stepper.model.weights)]


_KERAS_LEAF = {"weight": ("kernel", "gamma"), "bias": ("bias", "beta"),
               "running_mean": ("-", "moving_mean"), "running_var": ("-", "moving_variance")}


def _keras_variable(model, key: str):
    """The Keras variable of a canonical key: the model's attributes, by name."""
    *path, leaf = key.split(".")
    layer = functools.reduce(getattr, path, model)
    return getattr(layer, _KERAS_LEAF[leaf][isinstance(layer, keras.layers.BatchNormalization)])


def _keras_slot(optimizer, variable, suffix: str) -> np.ndarray:
    """Keras's slot of ``variable``, by the name Keras gives it ("<path>_momentum", ...)."""
    name = variable.path.replace("/", "_") + "_" + suffix
    [slot] = [v for v in optimizer.variables if v.name == name]
    return np.array(keras.ops.convert_to_numpy(slot))


def _to_keras_layout(canonical: np.ndarray) -> np.ndarray:
    """torch conv (O, I, kh, kw) -> Keras (kh, kw, I, O); linear (out, in) -> (in, out)."""
    axes = {4: (2, 3, 1, 0), 2: (1, 0)}.get(canonical.ndim)
    return canonical if axes is None else canonical.transpose(axes)


def _assert_torch_equal(got: dict, want: dict, what: str, skip: tuple[str, ...] = ()) -> None:
    got = {k: v for k, v in got.items() if not k.endswith(skip)} if skip else got
    want = {k: v for k, v in want.items() if not k.endswith(skip)} if skip else want
    assert got.keys() == want.keys(), what
    for key in want:
        if isinstance(want[key], dict):
            _assert_torch_equal(got[key], want[key], f"{what} {key}")
            continue
        assert got[key].dtype == want[key].dtype, f"{what} {key}: {got[key].dtype} vs {want[key].dtype}"
        assert torch.equal(got[key], want[key]), (
            f"{what} {key}: {float((got[key].double() - want[key].double()).abs().max()):.3g} apart")


def _assert_states_equal(got: TrainingState, want: TrainingState) -> None:
    assert (got.optimizer, got.step, got.parameters) == (want.optimizer, want.step, want.parameters)
    for mine, theirs, what in [(got.tensors, want.tensors, "tensor")] + [
            (got.slots.get(n, {}), want.slots[n], f"slot {n}") for n in want.slots]:
        assert mine.keys() == theirs.keys(), what
        for key in theirs:
            assert mine[key].dtype == theirs[key].dtype and np.array_equal(mine[key], theirs[key]), (
                f"{what} {key}: {float(np.abs(mine[key] - theirs[key]).max()):.3g} apart")


def _move(origin, target, framework: str, route: str, tmp_path: Path) -> None:
    """``origin``'s training state into ``target`` (same framework) by ``route``."""
    if route == "memory":
        target.load(origin.state())
    elif route == "canonical_file":
        path = save_training_checkpoint(tmp_path / "state.safetensors", origin.state(),
                                        {"arch": "tinyconv"})
        target.load(load_training_checkpoint(path)[0])
    else:  # the framework's own training file
        path = tmp_path / f"run{SUFFIX[framework]}"
        WEIGHTS[framework].save_training_file(path, origin.model, _optimizer(origin))
        WEIGHTS[framework].load_training_file(path, target.model, _optimizer(target))


ROUTES = ["memory", "canonical_file", "framework_file"]


# --------------------------------------------------------------------------- #
# (a) round trips: exact
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_torch_training_state_roundtrip_bit_identical(trained, tinyconv_checkpoint, tmp_path,
                                                      optimizer, dtype, route):
    """K torch steps, the state into a fresh run: model tensors, every slot and Adam's step
    are torch's own bit for bit (num_batches_tracked too, through torch's file)."""
    origin = trained("torch", optimizer, dtype)
    target = torch_train.Stepper(_config(tinyconv_checkpoint, optimizer, dtype))
    _move(origin, target, "torch", route, tmp_path)
    (model, slots), (model_want, slots_want) = _torch_raw(target), _torch_raw(origin)
    skip = () if route == "framework_file" else (BOOKKEEPING,)  # not in the canonical form
    _assert_torch_equal(model, model_want, "model", skip)
    _assert_torch_equal(slots, slots_want, "optimizer state")
    assert len(slots_want) == len(origin.state().parameters) > 0
    _assert_states_equal(target.state(), origin.state())


def _keras_cases():
    for optimizer in ("sgd", "adam"):
        for dtype in ("float32", "float64"):
            if (optimizer, dtype) != ("sgd", "float64"):  # its own test below
                for route in ROUTES:
                    yield optimizer, dtype, route


@pytest.mark.parametrize("optimizer, dtype, route", list(_keras_cases()))
def test_keras_training_state_roundtrip_every_optimizer_variable_bit_identical(
        trained, tinyconv_checkpoint, tmp_path, optimizer, dtype, route):
    """K Keras steps, the state into a fresh run: every optimizer variable (iterations, SGD
    velocities through torch's form b = v / -lr, Adam moments) and every model weight bit
    for bit."""
    origin = trained("tf", optimizer, dtype)
    target = tf_train.Stepper(_config(tinyconv_checkpoint, optimizer, dtype))
    _move(origin, target, "tf", route, tmp_path)
    got, want = _keras_raw(target), _keras_raw(origin)
    assert len(got) == len(want)
    for name, a, b in zip(_keras_names(origin), got, want):
        assert a.dtype == b.dtype and np.array_equal(a, b), (
            f"{name}: {float(np.abs(a.astype(np.float64) - b).max()):.3g} apart")
    assert int(keras.ops.convert_to_numpy(target.trainee.optimizer.iterations)) == K
    _assert_states_equal(target.state(), origin.state())


@pytest.mark.parametrize("route", ROUTES)
def test_keras_float64_sgd_velocity_roundtrip_within_one_ulp(trained, tinyconv_checkpoint,
                                                             tmp_path, route):
    """A float64 Keras model's SGD velocity v goes to b = v / -lr and back to -lr * b, each
    rounded to float64: a float64 b cannot hold every v / -lr (lr is a float32, not a power
    of 2), so v comes back within TRAINING_STATE_FLOAT64_VELOCITY_ULPS; everything else
    (model weights, iterations) bit for bit."""
    origin = trained("tf", "sgd", "float64")
    target = tf_train.Stepper(_config(tinyconv_checkpoint, "sgd", "float64"))
    _move(origin, target, "tf", route, tmp_path)
    got, want = _keras_raw(target), _keras_raw(origin)
    assert len(got) == len(want)
    for name, a, b in zip(_keras_names(origin), got, want):
        assert a.dtype == b.dtype, name
        if name.endswith("_momentum"):
            np.testing.assert_array_max_ulp(a, b, maxulp=tol.TRAINING_STATE_FLOAT64_VELOCITY_ULPS)
        else:
            assert np.array_equal(a, b), name


def test_training_checkpoint_file_keeps_float32_and_float64_arrays_exactly(tmp_path):
    """A hand-made state: float32 and float64 arrays, step, hyperparameters and parameters
    come back from the file as they went in (values, dtypes, order)."""
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.normal(size=(3, 2)).astype(np.float32),
               "a.bias": rng.normal(size=3),  # float64
               "b.running_mean": np.zeros(3, np.float32)}
    slots = {"momentum_buffer": {"a.weight": rng.normal(size=(3, 2)) / 3.0,
                                 "a.bias": rng.normal(size=3).astype(np.float32)}}
    state = TrainingState(tensors, "sgd", slots, 7, {"learning_rate": 0.1, "momentum": 0.9},
                          ["a.bias", "a.weight"])
    path = save_training_checkpoint(tmp_path / "s.safetensors", state, {"arch": "hand-made"})
    assert is_training_checkpoint(path)
    back, meta = load_training_checkpoint(path)
    _assert_states_equal(back, state)
    assert back.hyper == state.hyper and meta["arch"] == "hand-made"


# --------------------------------------------------------------------------- #
# (b) the conversion against a reference written from the definitions
# --------------------------------------------------------------------------- #
def test_cross_keras_sgd_velocity_is_minus_lr_times_torch_momentum_buffer(trained,
                                                                          tinyconv_checkpoint):
    """After K torch SGD steps, each Keras velocity is -lr x torch's buffer (float64, then
    Keras's float32), in Keras's layout; torch's SGD keeps no step count, so iterations is 0."""
    origin = trained("torch", "sgd")
    k = tf_train.Stepper(_config(tinyconv_checkpoint, "sgd"))
    k.load(origin.state())
    optimizer = k.trainee.optimizer
    lr = np.float64(keras.ops.convert_to_numpy(optimizer.learning_rate))  # Keras's, a float32
    checked = 0
    for key, p in origin.model.named_parameters():
        b_torch = origin.optimizer.state[p]["momentum_buffer"].numpy().astype(np.float64)
        v_ref = _to_keras_layout(-lr * b_torch).astype(np.float32)
        v_tf = _keras_slot(optimizer, _keras_variable(k.model, key), "momentum")
        assert np.array_equal(v_tf, v_ref), f"{key}: {float(np.abs(v_tf - v_ref).max()):.3g} apart"
        checked += 1
    assert checked == len(list(origin.model.parameters())) == 11
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 0


def test_cross_torch_momentum_buffer_is_keras_velocity_over_minus_lr(trained, tinyconv_checkpoint):
    """After K Keras SGD steps, torch's buffer is v / -lr (float64, then torch's float32), in
    torch's layout."""
    origin = trained("tf", "sgd")
    t = torch_train.Stepper(_config(tinyconv_checkpoint, "sgd"))
    t.load(origin.state())
    lr = np.float64(keras.ops.convert_to_numpy(origin.trainee.optimizer.learning_rate))
    for key, p in t.model.named_parameters():
        v_tf = _keras_slot(origin.trainee.optimizer, _keras_variable(origin.model, key), "momentum")
        b_ref = (_to_keras_layout_inverse(v_tf.astype(np.float64), p.ndim) / -lr).astype(np.float32)
        b_torch = t.optimizer.state[p]["momentum_buffer"].numpy()
        assert np.array_equal(b_torch, b_ref), f"{key}: {float(np.abs(b_torch - b_ref).max()):.3g} apart"


def _to_keras_layout_inverse(keras_value: np.ndarray, ndim: int) -> np.ndarray:
    """Keras (kh, kw, I, O) -> torch (O, I, kh, kw); (in, out) -> (out, in)."""
    axes = {4: (3, 2, 0, 1), 2: (1, 0)}.get(ndim)
    return keras_value if axes is None else keras_value.transpose(axes)


@pytest.mark.parametrize("origin", ["torch", "tf"])
def test_cross_adam_moments_and_step_are_the_same_numbers(trained, tinyconv_checkpoint, origin):
    """Adam's moments are one quantity in both frameworks (torch exp_avg / exp_avg_sq, Keras
    momentum / velocity): moved either way they are equal bit for bit, and the step count
    is K on the other side (torch: every parameter's ``step``; Keras: ``iterations``)."""
    source = trained(origin, "adam")
    target = TRAIN[OTHER[origin]].Stepper(_config(tinyconv_checkpoint, "adam"))
    target.load(source.state())
    t, k = (target, source) if origin == "tf" else (source, target)
    optimizer = k.trainee.optimizer
    for key, p in t.model.named_parameters():
        held = t.optimizer.state[p]
        variable = _keras_variable(k.model, key)
        for torch_name, keras_name in (("exp_avg", "momentum"), ("exp_avg_sq", "velocity")):
            want = _to_keras_layout(held[torch_name].numpy())
            got = _keras_slot(optimizer, variable, keras_name)
            assert np.array_equal(got, want), f"{key} {torch_name}"
        assert float(held["step"]) == K
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == K


# --------------------------------------------------------------------------- #
# (c) resuming in the other framework
# --------------------------------------------------------------------------- #
def _resume(tinyconv_checkpoint, origin: str, optimizer: str, dtype: str, strategy: str,
            steps: int):
    """K steps in ``origin``; its state into the other framework (``resumed``) and, weights
    only, into a fresh optimizer there (``dropped``); then ``steps`` more steps in all three on
    the same batches. Per step losses and the states after."""
    config = _config(tinyconv_checkpoint, optimizer, dtype, strategy)
    original = _trained(origin, config)
    state = original.state()
    other = OTHER[origin]
    resumed = TRAIN[other].Stepper(config)
    resumed.load(state, "resume")
    dropped = TRAIN[other].Stepper(config)
    WEIGHTS[other].import_weights(dropped.model, state.tensors, "weights only")
    runs = {"original": original, "resumed": resumed, "dropped": dropped}
    losses = {name: [] for name in runs}
    for idx in original.prepared.indices[K:K + steps]:
        for name, stepper in runs.items():
            losses[name].append(stepper.step(idx))
    return losses, {name: stepper.state() for name, stepper in runs.items()}


def _largest(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, str]:
    return max((float(np.abs(a[k] - b[k]).max()), k) for k in b)


def _assert_within(got: dict, want: dict, atol: float, rtol: float, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key, value in want.items():
        assert np.allclose(got[key], value, atol=atol, rtol=rtol), (
            f"{what} {key}: {float(np.abs(got[key] - value).max()):.3g} apart")


def _judged(state: TrainingState) -> list[tuple[str, dict]]:
    """What a step from the same state must reproduce: SGD's tensors and buffers; Adam's
    moments (its parameter step is lr x m / sqrt(v): where a gradient rounds to about 0,
    its rounding decides a step of about lr: shared.lockstep's Adam sensitivity)."""
    if state.optimizer == "sgd":
        return [("tensor", state.tensors), ("momentum_buffer", state.slots["momentum_buffer"])]
    return [(name, state.slots[name]) for name in ("exp_avg", "exp_avg_sq")]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("origin", ["tf", "torch"])
def test_cross_resume_in_other_framework_takes_the_same_next_step(tinyconv_checkpoint, origin,
                                                                   optimizer):
    """float32 `partial` (BatchNorm on stored statistics): K steps in one framework, then one
    step in the other from its state and one more in the original, on the same batch. The
    losses come from one forward pass of the same state, and the step moves each tensor
    and slot by a gradient or lr x a gradient, so everything stays within the forward bound
    (FORWARD_ATOL/RTOL). Without the optimizer state (weights only, a fresh optimizer) the
    same quantities differ by more than TRAP_MIN_GAP. (Under `full`, BatchNorm's batch-statistics
    backward amplifies float32 rounding beyond that bound: `full` is judged in float64.)"""
    losses, after = _resume(tinyconv_checkpoint, origin, optimizer, "float32", "partial", 1)
    what = f"{origin} -> {OTHER[origin]} {optimizer}"
    (train_o, eval_o), (train_r, eval_r) = losses["original"][0], losses["resumed"][0]
    for name, got, want in (("train", train_r, train_o), ("eval", eval_r, eval_o)):
        assert abs(got - want) <= tol.FORWARD_ATOL + tol.FORWARD_RTOL * abs(want), (
            f"{what}: {name} loss {got:.7g} vs {want:.7g}")
    for (name, want), (_, got) in zip(_judged(after["original"]), _judged(after["resumed"])):
        _assert_within(got, want, tol.FORWARD_ATOL, tol.FORWARD_RTOL, f"{what}: {name}")
    gap, key = max(_largest(dropped, original) for (_, original), (_, dropped)
                   in zip(_judged(after["original"]), _judged(after["dropped"])))
    assert gap > tol.TRAP_MIN_GAP, (
        f"{what}: resuming without the optimizer state should differ; largest gap {gap:.3g} ({key})")


@pytest.mark.parametrize("origin", ["tf", "torch"])
def test_cross_resume_float64_adam_next_moments_within_float64_noise(tinyconv_checkpoint, origin):
    """float64 Adam, `full`: K steps in one framework, one in the other from its state and
    one in the original: losses and both moments within FLOAT64_NOISE; a fresh optimizer's
    first moments differ by more than TRAP_MIN_GAP."""
    losses, after = _resume(tinyconv_checkpoint, origin, "adam", "float64", "full", 1)
    got, want = losses["resumed"][0], losses["original"][0]
    assert max(abs(g - w) for g, w in zip(got, want)) <= tol.FLOAT64_NOISE, f"{got} vs {want}"
    for (name, want), (_, got) in zip(_judged(after["original"]), _judged(after["resumed"])):
        _assert_within(got, want, tol.FLOAT64_NOISE, 0.0, f"{origin}: {name}")
    gap, key = _largest(after["dropped"].slots["exp_avg"], after["original"].slots["exp_avg"])
    assert gap > tol.TRAP_MIN_GAP, f"a fresh optimizer's moments should differ: {gap:.3g} ({key})"


@pytest.mark.parametrize("strategy", ["full", "partial"])
@pytest.mark.parametrize("origin", ["tf", "torch"])
def test_cross_resume_float64_sgd_continues_as_the_original_within_float64_noise(
        tinyconv_checkpoint, origin, strategy):
    """float64 SGD: K steps in one framework, M more in the other from its state, against the
    original run's own M more: every loss, tensor and momentum buffer within FLOAT64_NOISE
    (exact arithmetic: any error in the conversion, its sign, lr or layout, shows far above
    it). With a fresh optimizer the run differs by more than TRAP_MIN_GAP."""
    losses, after = _resume(tinyconv_checkpoint, origin, "sgd", "float64", strategy, M)
    for step, (got, want) in enumerate(zip(losses["resumed"], losses["original"]), start=K):
        assert max(abs(g - w) for g, w in zip(got, want)) <= tol.FLOAT64_NOISE, (
            f"{origin} -> {OTHER[origin]} {strategy}: step {step} losses {got} vs {want}")
    original, resumed = after["original"], after["resumed"]
    gap, key = _largest(resumed.tensors, original.tensors)
    assert gap <= tol.FLOAT64_NOISE, f"{strategy}: {key} {gap:.3g} apart after {M} steps"
    assert resumed.slots.keys() == original.slots.keys() == {"momentum_buffer"}
    assert resumed.parameters == original.parameters
    gap, key = _largest(resumed.slots["momentum_buffer"], original.slots["momentum_buffer"])
    assert gap <= tol.FLOAT64_NOISE, f"{strategy}: buffer {key} {gap:.3g} apart after {M} steps"
    gap, key = _largest(after["dropped"].tensors, original.tensors)
    assert gap > tol.TRAP_MIN_GAP, f"{strategy}: a fresh optimizer should differ; {gap:.3g} ({key})"


@pytest.mark.parametrize("origin", ["tf", "torch"])
def test_cross_training_file_resumes_in_other_framework_through_convert(trained,
                                                                        tinyconv_checkpoint,
                                                                        tmp_path, origin):
    """One framework's training file -> ``freeze-parity convert`` -> the other framework's
    file -> its ``load_training_file``: model tensors bit for bit, SGD buffers and
    velocities related by -lr as written here (float64, then float32)."""
    source = trained(origin, "sgd")
    src = tmp_path / f"run{SUFFIX[origin]}"
    dst = tmp_path / f"run{SUFFIX[OTHER[origin]]}"
    WEIGHTS[origin].save_training_file(src, source.model, _optimizer(source))
    done = cli("convert", src, dst)
    assert done.returncode == 0, done.stderr
    target = TRAIN[OTHER[origin]].Stepper(_config(tinyconv_checkpoint, "sgd"))
    state = WEIGHTS[OTHER[origin]].load_training_file(dst, target.model, _optimizer(target))
    assert state.step == source.state().step and state.parameters == source.state().parameters
    t, k = (target, source) if origin == "tf" else (source, target)
    lr = np.float64(keras.ops.convert_to_numpy(k.trainee.optimizer.learning_rate))
    for key, p in t.model.named_parameters():
        variable = _keras_variable(k.model, key)
        assert np.array_equal(_to_keras_layout(p.detach().numpy()),
                              np.array(keras.ops.convert_to_numpy(variable))), key
        v_tf = _keras_slot(k.trainee.optimizer, variable, "momentum")
        b_torch = t.optimizer.state[p]["momentum_buffer"].numpy()
        if origin == "tf":
            want = (_to_keras_layout_inverse(v_tf.astype(np.float64), p.ndim) / -lr).astype(np.float32)
            assert np.array_equal(b_torch, want), key
        else:
            want = _to_keras_layout(-lr * b_torch.astype(np.float64)).astype(np.float32)
            assert np.array_equal(v_tf, want), key


# --------------------------------------------------------------------------- #
# SGD's two momentum forms under a learning-rate schedule (docs/PORTING.md)
# --------------------------------------------------------------------------- #
SCHEDULE = (0.1, 0.1, 0.01, 0.01)  # lr of updates 0..3: the change after update 1
MOMENTUM = 0.9


def _gradients() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.normal(size=4).astype(np.float32) for _ in SCHEDULE]


def test_cross_sgd_momentum_forms_differ_once_the_learning_rate_changes():
    """Keras keeps v (v = m v - lr_t g; p += v), torch b (b = m b + g; p -= lr_t b): with a
    constant lr the same optimizer (v = -lr b), but after a change Keras's velocity still
    carries the old rate: Keras steps by -m lr_{t-1} b - lr_t g, torch by -lr_t (m b + g).
    Each matches its float64 reference (written here) within OPTIMIZER_STEP_ATOL; they agree
    while the rate is constant and differ by more than TRAP_MIN_GAP after it changes."""
    lrs = [float(np.float32(lr)) for lr in SCHEDULE]  # Keras keeps rates in float32
    p0 = np.array([0.5, -1.0, 2.0, 0.25], np.float32)
    var = keras.Variable(p0)
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([1], [SCHEDULE[0], SCHEDULE[2]])
    k_opt = keras.optimizers.SGD(schedule, momentum=MOMENTUM)
    p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    t_opt = torch.optim.SGD([p], lr=lrs[0], momentum=float(np.float32(MOMENTUM)))
    v_ref, b_ref = np.zeros(4), np.zeros(4)
    p_keras_ref, p_torch_ref = p0.astype(np.float64), p0.astype(np.float64)
    m = np.float64(np.float32(MOMENTUM))
    gaps = []
    for lr, g in zip(lrs, _gradients()):
        k_opt.apply_gradients([(keras.ops.convert_to_tensor(g), var)])
        t_opt.param_groups[0]["lr"] = lr
        p.grad = torch.from_numpy(g.copy())
        t_opt.step()
        v_ref = m * v_ref - lr * g
        p_keras_ref = p_keras_ref + v_ref
        b_ref = m * b_ref + g
        p_torch_ref = p_torch_ref - lr * b_ref
        p_keras, p_torch = np.array(keras.ops.convert_to_numpy(var)), p.detach().numpy()
        assert np.abs(p_keras - p_keras_ref).max() <= tol.OPTIMIZER_STEP_ATOL
        assert np.abs(p_torch - p_torch_ref).max() <= tol.OPTIMIZER_STEP_ATOL
        gaps.append(float(np.abs(p_keras.astype(np.float64) - p_torch).max()))
    assert max(gaps[:2]) <= tol.OPTIMIZER_STEP_ATOL, f"constant rate: {gaps[:2]}"
    assert min(gaps[2:]) > tol.TRAP_MIN_GAP, f"after the change: {gaps[2:]}"


def test_keras_sgd_state_under_a_schedule_converts_with_the_current_learning_rate(
        tinyconv_checkpoint):
    """A Keras SGD on a schedule (0.1 for two updates, then 0.01), exported after three: the
    buffers are v / -0.01 (the rate of the next update, Keras's current one), not v / -0.1."""
    stepper = tf_train.Stepper(_config(tinyconv_checkpoint, "sgd"))
    model = stepper.model
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([1], [SCHEDULE[0], SCHEDULE[2]])
    model.compile(optimizer=keras.optimizers.SGD(schedule, momentum=MOMENTUM),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    for idx in stepper.prepared.indices[:K]:
        model.train_on_batch(stepper.prepared.train.images[idx], stepper.prepared.train.labels[idx])
    state = tf_weights.export_training_state(model)
    current = np.float64(np.float32(SCHEDULE[K]))
    assert state.hyper["learning_rate"] == current
    for key in state.parameters:
        v_tf = _keras_slot(model.optimizer, _keras_variable(model, key), "momentum")
        b_ref = _to_keras_layout_inverse(v_tf.astype(np.float64), v_tf.ndim) / -current
        assert np.array_equal(state.slots["momentum_buffer"][key], b_ref), key


# --------------------------------------------------------------------------- #
# (d) bad input: one line naming what and where; nothing changed
# --------------------------------------------------------------------------- #
HEAD = "head.fc.weight"
WHERE = "resume.safetensors"


@pytest.fixture(scope="module")
def targets(tinyconv_checkpoint):
    """Fresh steppers (framework, optimizer, strategy) that only ever refuse a state."""
    cache = {}

    def get(framework, optimizer="sgd", strategy="full"):
        key = (framework, optimizer, strategy)
        if key not in cache:
            stepper = TRAIN[framework].Stepper(_config(tinyconv_checkpoint, optimizer,
                                                       strategy=strategy))
            if framework == "tf":  # built now: a load builds it, which is no refusal's change
                stepper.trainee.optimizer.build(stepper.trainee.trainable_variables)
            cache[key] = stepper
        return cache[key]

    return get


def _without(state: TrainingState, key: str, *slots: str) -> TrainingState:
    held = {n: {k: v for k, v in vals.items() if not (k == key and n in slots)}
            for n, vals in state.slots.items()}
    return dataclasses.replace(state, slots=held)


def _shorter_head_bias(state: TrainingState) -> TrainingState:
    cut = {k: (v[:-1] if k == "head.fc.bias" else v) for k, v in state.tensors.items()}
    held = {n: {k: (v[:-1] if k == "head.fc.bias" else v) for k, v in vals.items()}
            for n, vals in state.slots.items()}
    return dataclasses.replace(state, tensors=cut, slots=held)


def _unholdable(state: TrainingState) -> TrainingState:
    tensors = dict(state.tensors)
    tensors["head.fc.bias"] = tensors["head.fc.bias"].astype(np.float64) + 2.0 ** -40
    return dataclasses.replace(state, tensors=tensors)


BAD_STATES = {
    # case: (state's optimizer, target's optimizer, target's strategy, change, words)
    "wrong_optimizer": ("adam", "sgd", "full", None, ["holds adam state, the optimizer is sgd"]),
    "frozen_parameter": ("sgd", "sgd", "frozen", None,
                         ["slot for 'base.block1.bn.bias'", "does not update"]),
    "missing_adam_slots": ("adam", "adam", "full",
                           lambda s: _without(s, HEAD, "exp_avg", "exp_avg_sq"),
                           [f"key '{HEAD}'", f"no adam slots at step {K}"]),
    "one_adam_slot": ("adam", "adam", "full", lambda s: _without(s, HEAD, "exp_avg"),
                      [f"key '{HEAD}'", "has ['exp_avg_sq'] but not every adam slot"]),
    "wrong_shape": ("sgd", "sgd", "full", _shorter_head_bias,
                    ["key 'head.fc.bias'", "shape expected (10,), got (9,)"]),
    "float64_unholdable": ("sgd", "sgd", "full", _unholdable,
                           ["key 'head.fc.bias'", "float64 values that a float32 model cannot hold"]),
}


@pytest.mark.parametrize("case", list(BAD_STATES))
@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_import_training_state_refuses_bad_state_one_line_and_changes_nothing(
        trained, targets, framework, case):
    optimizer, target_optimizer, strategy, change, words = BAD_STATES[case]
    state = trained("torch", optimizer).state(np.float32)
    state = change(state) if change else state
    target = targets(framework, target_optimizer, strategy)
    before = _keras_raw(target) if framework == "tf" else _torch_raw(target)
    with pytest.raises(ValueError) as info:
        target.load(state, WHERE)
    message = str(info.value)
    assert "\n" not in message and message.startswith(WHERE), message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    after = _keras_raw(target) if framework == "tf" else _torch_raw(target)
    if framework == "tf":
        assert len(after) == len(before)
        assert all(np.array_equal(a, b) for a, b in zip(after, before)), "a refused state changed it"
    else:
        _assert_torch_equal(after[0], before[0], "model")
        _assert_torch_equal(after[1], before[1], "optimizer state")


@pytest.mark.parametrize("change, words", [
    (lambda s: dataclasses.replace(s, slots={"momentum_buffer": {
        **s.slots["momentum_buffer"], HEAD: s.slots["momentum_buffer"][HEAD][:, :-1]}}),
     ["slot 'momentum_buffer'", f"key '{HEAD}'", "shape expected (10, 32), got (10, 31)"]),
    (lambda s: dataclasses.replace(s, parameters=[*s.parameters, "head.fc.gamma"]),
     ["parameter 'head.fc.gamma' is not a model tensor"]),
    (lambda s: dataclasses.replace(s, parameters=[p for p in s.parameters if p != HEAD]),
     [f"key '{HEAD}' is not one of the optimizer's parameters"]),
    (lambda s: dataclasses.replace(s, optimizer="rmsprop"), ["unknown optimizer 'rmsprop'"]),
], ids=["slot_shape", "unknown_parameter", "slot_of_no_parameter", "unknown_optimizer"])
def test_training_state_refuses_inconsistent_parts_one_line(trained, change, words):
    state = trained("torch", "sgd").state(np.float32)
    with pytest.raises(ValueError) as info:
        change(state)
    message = str(info.value)
    assert "\n" not in message and message.startswith("training state:")
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_load_training_checkpoint_refuses_a_weights_checkpoint(tinyconv_checkpoint):
    """The shipped (weights) checkpoint is not a training checkpoint: NotATrainingFile naming it,
    from the shared reader and from Keras's training-file reader."""
    for read in (load_training_checkpoint, tf_weights.read_training_file):
        with pytest.raises(NotATrainingFile) as info:
            read(tinyconv_checkpoint)
        message = str(info.value)
        assert "\n" not in message and str(tinyconv_checkpoint) in message
        assert "not a training checkpoint (meta 'kind' is None, expected 'training')" in message
    assert not is_training_checkpoint(tinyconv_checkpoint)
    assert not tf_weights.is_training_file(tinyconv_checkpoint)


def test_torch_load_training_file_refuses_a_state_dict(trained, targets, tmp_path):
    """A plain state_dict ``.pt`` (what ``torch.save(model.state_dict())`` writes) is not torch's
    training file: NotATrainingFile naming the file; the target is unchanged."""
    path = tmp_path / "weights.pt"
    torch.save(trained("torch", "sgd").model.state_dict(), path)
    target = targets("torch")
    before = _torch_raw(target)
    with pytest.raises(NotATrainingFile) as info:
        torch_weights.load_training_file(path, target.model, target.optimizer)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "not a freeze-parity training file" in message
    assert not torch_weights.is_training_file(path)
    _assert_torch_equal(_torch_raw(target)[0], before[0], "model")


# --------------------------------------------------------------------------- #
# docs/setup.md's example, run as it is printed
# --------------------------------------------------------------------------- #
README_EXAMPLE = re.compile(r"### Resume a training in the other framework\n.*?```python\n(.*?)```",
                            re.DOTALL)


def test_docs_resume_example_runs_and_torch_holds_the_keras_state(tmp_path, monkeypatch):
    """docs/setup.md's "resume in the other framework" block, extracted and run in a fresh
    directory: torch's model then holds Keras's weights bit for bit, and its buffers are
    Keras's velocities / -lr (float64, then float32)."""
    [code] = README_EXAMPLE.findall((ROOT / "docs" / "setup.md").read_text())
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "docs/setup.md (resume example)", "exec"), namespace)  # noqa: S102
    k, t, sgd = namespace["k"], namespace["t"], namespace["sgd"]
    assert (tmp_path / "run.safetensors").is_file() and is_training_checkpoint("run.safetensors")
    lr = np.float64(keras.ops.convert_to_numpy(k.optimizer.learning_rate))
    assert int(keras.ops.convert_to_numpy(k.optimizer.iterations)) == 2  # 64 images, batch 32
    for key, p in t.named_parameters():
        variable = _keras_variable(k, key)
        assert np.array_equal(_to_keras_layout(p.detach().numpy()),
                              np.array(keras.ops.convert_to_numpy(variable))), key
        v_tf = _keras_slot(k.optimizer, variable, "momentum")
        want = (_to_keras_layout_inverse(v_tf.astype(np.float64), p.ndim) / -lr).astype(np.float32)
        assert np.array_equal(sgd.state[p]["momentum_buffer"].numpy(), want), key
