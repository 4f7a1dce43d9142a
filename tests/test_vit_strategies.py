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
