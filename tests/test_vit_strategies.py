"""Every vit strategy, a few steps in each framework from the shipped checkpoint, against the
hand-written oracle (tests/strategy_oracle.py): frozen tensors bit-identical, every listed
tensor moved, the declared expectations hold; LoRA's adapters pair with PEFT's at 4 heads.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from strategy_oracle import HEAD, VIT_LORA, vit_base_keys, vit_moved_by_run

from shared import tolerances as tol
from shared.compare import expectation_failures
from shared.record import RunConfig
from shared.strategies import strategies_for
from shared.tolerances import FORWARD_ATOL, FORWARD_RTOL

FRAMEWORKS = ["tf", "torch"]
STRATEGIES = strategies_for("vit")
STEPS, BATCH = 3, 8


@functools.cache
def _record(framework: str, strategy: str):
    from shared import frameworks

    config = RunConfig(arch="vit", strategy=strategy, steps=STEPS, batch_size=BATCH,
                       eval_every=STEPS)
    return frameworks.load(framework, "train").run(config)


def test_vit_strategies_are_the_catalogue_less_bn_adapt_plus_lora():
    assert STRATEGIES == ["frozen", "feature_extraction", "partial", "full", "naive", "lora"]


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_vit_run_moves_exactly_the_hand_listed_tensors(framework, strategy):
    record = _record(framework, strategy)
    everything = set(HEAD + vit_base_keys() + (VIT_LORA if strategy == "lora" else []))
    moved, expected = set(record.moved), vit_moved_by_run(strategy)
    label = f"{strategy}[{framework}]"
    assert moved <= everything, f"{label}: unknown tensors {sorted(moved - everything)}"
    # lora: B starts at zero and A gets no gradient at step 0; after 3 steps every one moves
    assert not expected - moved, f"{label}: declared trainable but never moved {sorted(expected - moved)[:5]}"
    assert not moved - expected, f"{label}: must stay bit-identical but moved {sorted(moved - expected)[:5]}"


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_vit_run_meets_declared_expectations(framework, strategy):
    record = _record(framework, strategy)
    assert not record.bn_stats_changed
    assert expectation_failures(record) == []


def test_vit_heldout_loss_falls_for_some_strategy():
    falls = [(s, fw) for s in STRATEGIES for fw in FRAMEWORKS
             if _record(fw, s).heldout[-1].loss < _record(fw, s).heldout[0].loss]
    assert falls, "no vit strategy lowered the held-out loss in 3 steps"


def test_vit_lora_trains_a_hand_counted_fraction_of_full():
    from torch_impl.freeze import apply_strategy
    from torch_impl.model import build_model

    counts = {}
    for strategy in ("lora", "full"):
        model = apply_strategy(build_model("vit", 10), strategy)
        counts[strategy] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = 64 * 10 + 10
    # per block, rank 4: proj 4 * (64 + 64), fc1 4 * (64 + 128), fc2 4 * (128 + 64)
    lora = 4 * (4 * (64 + 64) + 4 * (64 + 128) + 4 * (128 + 64)) + head
    block = 2 * 64 + (192 * 64 + 192) + (64 * 64 + 64) + 2 * 64 + (128 * 64 + 128) + (64 * 128 + 64)
    full = 64 + 65 * 64 + (64 * 3 * 4 * 4 + 64) + 4 * block + 2 * 64 + head
    assert counts == {"lora": lora, "full": full} == {"lora": 8842, "full": 142026}


def test_cross_lora_pipeline_targets_forward_agree():
    """Keras's output-projection (A (heads, head_dim, r)) and Dense adapters equal PEFT's on
    timm's attn.proj / mlp.fc1 / mlp.fc2 at 4 heads: same base, same non-zero adapters."""
    from shared.checkpoint import load_checkpoint
    from shared.init import head_init
    from shared.shipped import shipped_checkpoint
    from tf_impl import freeze as tf_freeze
    from tf_impl import lora as tf_lora
    from tf_impl import model as tf_model
    from tf_impl import weights as tf_weights
    from torch_impl import freeze as torch_freeze
    from torch_impl import lora as torch_lora
    from torch_impl import model as torch_model
    from torch_impl import weights as torch_weights

    tensors, _ = load_checkpoint(shipped_checkpoint("vit"))
    start = {**{k: v for k, v in tensors.items() if k.startswith("base.")}, **head_init(64, 10, 0)}
    t = torch_model.build_model("vit", 10)
    torch_weights.import_weights(t, start)
    torch_freeze.apply_strategy(t, "lora")
    k = tf_model.build_model("vit", 10)
    tf_weights.import_weights(k, start)
    tf_freeze.apply_strategy(k, "lora")
    rng = np.random.default_rng(7)
    adapters = {key: rng.normal(0.0, 0.2, v.shape).astype(np.float32)
                for key, v in torch_lora.lora_tensors(t).items()}
    torch_lora.set_lora_tensors(t, adapters)
    tf_lora.set_lora_tensors(k, adapters)
    x = rng.normal(size=(4, 3, 32, 32)).astype(np.float32)
    t.eval()
    with torch.no_grad():
        y_torch = t(torch.from_numpy(x)).numpy()
        t_plain = torch_model.build_model("vit", 10)
        torch_weights.import_weights(t_plain, start)
        y_plain = t_plain.eval()(torch.from_numpy(x)).numpy()
    y_tf = np.asarray(k(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), training=False))
    assert np.abs(y_torch - y_plain).max() > 1e-2, "the adapters changed nothing"
    np.testing.assert_allclose(y_tf, y_torch, rtol=FORWARD_RTOL, atol=FORWARD_ATOL)


# the lora verdict run (dropout at 0) the training-state tests start from
LORA_STATE_CONFIG = RunConfig(arch="vit", strategy="lora", steps=2, batch_size=BATCH,
                              base_dropout=False)


@pytest.fixture(scope="module")
def lora_stepped():
    """A torch lora stepper after 2 SGD steps (momentum buffers exist; read only)."""
    from torch_impl import train as torch_train

    stepper = torch_train.Stepper(LORA_STATE_CONFIG)
    for idx in stepper.prepared.indices[:LORA_STATE_CONFIG.steps]:
        stepper.step(idx)
    return stepper


def test_cross_lora_training_state_carries_the_adapters_both_ways(lora_stepped):
    """The compare matrix's lockstep moves a training state between the frameworks: for
    lora it holds the adapters (canonical ``<layer>.lora_A`` (r, in), ``.lora_B`` (out, r))
    and their momentum, and the optimizer's parameters are exactly the head and the
    adapters (hand-listed). torch -> Keras -> canonical again is bit-identical, and Keras's
    adapters then read back through tf_impl.lora's own converter as torch's."""
    from tf_impl import lora as tf_lora
    from tf_impl import train as tf_train
    from tf_impl import weights as tf_weights
    from torch_impl import weights as torch_weights

    config, t = LORA_STATE_CONFIG, lora_stepped
    state = torch_weights.export_training_state(t.model, t.optimizer)
    assert sorted(state.parameters) == sorted(HEAD + VIT_LORA)
    assert sorted(state.slots["momentum_buffer"]) == sorted(HEAD + VIT_LORA)
    assert state.tensors["base.blocks.0.attn.proj.lora_A"].shape == (4, 64)
    assert state.tensors["base.blocks.0.mlp.fc1.lora_B"].shape == (128, 4)
    assert np.abs(state.tensors["base.blocks.3.mlp.fc2.lora_B"]).max() > 0  # trained: moved

    k = tf_train.Stepper(config)
    tf_weights.import_training_state(k.model, k.trainee.optimizer, state)
    back = tf_weights.export_training_state(k.model, k.trainee.optimizer)
    assert back.tensors.keys() == state.tensors.keys() and back.parameters != []
    for key, value in state.tensors.items():
        np.testing.assert_array_equal(back.tensors[key], value, err_msg=key)
    # Keras holds the velocity v = -lr * b in float32: b -> v rounds once
    # (TRAINING_STATE_FLOAT32_VELOCITY_ULPS)
    ulps = tol.TRAINING_STATE_FLOAT32_VELOCITY_ULPS * np.finfo(np.float32).eps
    for key, value in state.slots["momentum_buffer"].items():
        gap = np.abs(back.slots["momentum_buffer"][key] - value)
        assert (gap <= ulps * np.abs(value)).all(), (key, float(gap.max()))
    for key, value in tf_lora.lora_tensors(k.model).items():
        np.testing.assert_array_equal(value, state.tensors[key].astype(np.float32), err_msg=key)


def test_keras_training_state_refuses_per_head_query_lora():
    """Keras's query/key/value LoRA is per head: no canonical rank-r form at 4 heads."""
    import keras

    from tf_impl import lora as tf_lora
    from tf_impl import model as tf_model
    from tf_impl import weights as tf_weights

    model = tf_model.build_model("vit", 10)
    tf_lora.add_lora(model, 4, 8.0, targets=("q", "proj"))
    with pytest.raises(ValueError, match=r"base\.blocks\.0\.attn: LoRA on MultiHeadAttention's "
                                         r"query/key/value is per head"):
        tf_weights.export_training_state(model, keras.optimizers.SGD(0.1))
    assert "base.blocks.0.attn.proj.lora_A" not in tf_weights.export_weights(model)


def test_torch_lora_training_file_resumes_exactly_and_loads_in_plain_torch(tmp_path,
                                                                          lora_stepped):
    """torch's training file of a PEFT model: read back into a fresh lora model, the state
    is bit-identical; its model entry (and that of a file written from the canonical state)
    loads into the PEFT model with load_state_dict(strict=True), as plain torch resumes."""
    import torch as th

    from torch_impl import train as torch_train
    from torch_impl import weights as torch_weights

    config, t = LORA_STATE_CONFIG, lora_stepped
    want = torch_weights.export_training_state(t.model, t.optimizer)
    saved = torch_weights.save_training_file(tmp_path / "lora.pt", t.model, t.optimizer)
    written = torch_weights.write_training_file(tmp_path / "canonical.pt", want, {"arch": "vit"})
    for path in (saved, written):
        fresh = torch_train.Stepper(config)  # adapters at their start, no momentum yet
        torch_weights.load_training_file(path, fresh.model, fresh.optimizer)
        got = torch_weights.export_training_state(fresh.model, fresh.optimizer)
        assert got.parameters == want.parameters
        for key, value in want.tensors.items():
            np.testing.assert_array_equal(got.tensors[key], value, err_msg=f"{path.name} {key}")
        for key, value in want.slots["momentum_buffer"].items():
            np.testing.assert_array_equal(got.slots["momentum_buffer"][key], value, err_msg=key)
        plain = torch_train.Stepper(config).model
        plain.load_state_dict(th.load(path, weights_only=True)["model"], strict=True)
        assert "base.blocks.0.attn.proj.lora_A.default.weight" in plain.state_dict()
