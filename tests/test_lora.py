"""LoRA on the ViT's attention projections: PEFT (torch) and Keras's enable_lora compute
the same update when paired faithfully.

PEFT on timm's fused ``qkv`` is one rank-r adapter with one A shared by q, k and v;
Keras's MultiHeadAttention has separate query/key/value layers, each its own adapter.
``torch_impl.lora`` splits timm's attention into q, k, v Linears so PEFT targets them
like Keras. Keras's query/key/value adapter is per head (A (width, heads, r), one B
(r, head_dim)): a rank-r adapter of the width -> width map only at heads == 1, so the
cross tests use a one-head ViT (pinned below). Adapters travel through the canonical
form (``base.blocks.0.attn.q.lora_A`` (r, in), ``.lora_B`` (out, r)).
"""

from __future__ import annotations

import dataclasses

import keras  # noqa: E402  (after torch: docs/PORTING.md)
import numpy as np
import pytest
import tensorflow as tf  # noqa: E402
import torch
from safetensors.numpy import load_file, save_file

from shared.archs import ViTConfig
from shared.init import canonical_init
from shared.tolerances import (
    FLOAT64_RUN_ATOL,
    FORWARD_ATOL,
    FORWARD_RTOL,
    LOCKSTEP_ULPS,
    LOCKSTEP_UPDATE_RTOL,
)
from tf_impl import lora as tf_lora
from tf_impl import vit as tf_vit
from tf_impl import weights as tf_weights
from torch_impl import lora as torch_lora
from torch_impl import vit as torch_vit
from torch_impl import weights as torch_weights

# one head: Keras's q/k/v adapters are then rank-r adapters of width -> width (see above);
# every dropout and drop-path off, so a step is deterministic in train mode
CONFIG = ViTConfig(width=16, depth=4, heads=1, mlp_dim=32, attention_dropout=0.0, dropout=0.0,
                   drop_path=0.0)
RANK, ALPHA = 2, 4.0
LR = 0.5
BATCH, CLASSES = 4, 3
# written by hand for depth 4, targets q, k, v
QKV_KEYS = sorted(
    ["base.blocks.0.attn.q.lora_A", "base.blocks.0.attn.q.lora_B",
     "base.blocks.0.attn.k.lora_A", "base.blocks.0.attn.k.lora_B",
     "base.blocks.0.attn.v.lora_A", "base.blocks.0.attn.v.lora_B",
     "base.blocks.1.attn.q.lora_A", "base.blocks.1.attn.q.lora_B",
     "base.blocks.1.attn.k.lora_A", "base.blocks.1.attn.k.lora_B",
     "base.blocks.1.attn.v.lora_A", "base.blocks.1.attn.v.lora_B",
     "base.blocks.2.attn.q.lora_A", "base.blocks.2.attn.q.lora_B",
     "base.blocks.2.attn.k.lora_A", "base.blocks.2.attn.k.lora_B",
     "base.blocks.2.attn.v.lora_A", "base.blocks.2.attn.v.lora_B",
     "base.blocks.3.attn.q.lora_A", "base.blocks.3.attn.q.lora_B",
     "base.blocks.3.attn.k.lora_A", "base.blocks.3.attn.k.lora_B",
     "base.blocks.3.attn.v.lora_A", "base.blocks.3.attn.v.lora_B"])


@pytest.fixture(scope="module")
def weights():
    """Canonical base weights, seed 0 (timm's keys, without ``base.``)."""
    return canonical_init(torch_weights.canonical_shapes(torch_vit.vit_base(CONFIG)), seed=0)


def _batch(dtype=np.float32):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(BATCH, 3, CONFIG.image_size, CONFIG.image_size)).astype(dtype)
    readout = rng.normal(0.0, 0.5, size=(CLASSES, CONFIG.width)).astype(dtype)
    return x, readout, np.array([0, 2, 1, 2])


def _torch_base(weights, dtype="float32", config=CONFIG):
    base = torch_vit.vit_base(config)
    if dtype == "float64":
        base = base.double()
    torch_weights.import_weights(base, weights)
    return base


def _keras_base(weights, dtype="float32", config=CONFIG):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype)
    try:
        base = tf_vit.vit_base(config)
        base(np.zeros((1, config.image_size, config.image_size, 3), dtype))
    finally:
        keras.config.set_dtype_policy(previous)
    tf_weights.import_weights(base, weights)
    return base


def _start_tensors(keys, seed=5, dtype=np.float32):
    """Adapters to start from: A random, B random too (a zero B gives A no gradient)."""
    rng = np.random.default_rng(seed)
    shapes = {"lora_A": (RANK, CONFIG.width), "lora_B": (CONFIG.width, RANK)}
    return {k: rng.normal(0.0, 0.3, shapes[k.rsplit(".", 1)[1]]).astype(dtype) for k in keys}


def _torch_step(base, x, readout, labels, steps=1):
    base.train()  # every rate is 0: train mode matters only for a LoRA dropout
    params = [p for p in base.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LR)
    r = torch.from_numpy(readout)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(base(torch.from_numpy(x)) @ r.T,
                                                 torch.from_numpy(labels))
        loss.backward()
        optimizer.step()


def _keras_step(base, x, readout, labels, steps=1):
    optimizer = keras.optimizers.SGD(learning_rate=LR)
    x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    # the loss's own dtype, else Keras computes it in floatx (float32) in a float64 model
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=str(x.dtype))
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, keras.ops.matmul(base(x_nhwc, training=True), readout.T))
        grads = tape.gradient(loss, base.trainable_weights)
        optimizer.apply(grads, base.trainable_weights)


def _step_gap(start, a, b, keys, dtype=np.float32):
    """Largest |change_a - change_b| over its bound: LOCKSTEP_ULPS ulps of the tensor's
    largest value + LOCKSTEP_UPDATE_RTOL of its largest change (float32; the same
    one-step bound as shared/lockstep.py: the gradient's rounding passed on by SGD), or
    FLOAT64_RUN_ATOL in float64. Returns (worst ratio, its key, its gap)."""
    worst = (0.0, "", 0.0)
    for key in keys:
        d_a, d_b = a[key].astype(np.float64) - start[key], b[key].astype(np.float64) - start[key]
        gap = float(np.abs(d_a - d_b).max())
        if dtype == np.float64:
            bound = FLOAT64_RUN_ATOL
        else:
            scale = float(max(np.abs(start[key]).max(), np.abs(b[key]).max()))
            ulp = np.finfo(np.float32).eps * 2.0 ** np.floor(np.log2(scale))
            bound = LOCKSTEP_ULPS * ulp + LOCKSTEP_UPDATE_RTOL * float(np.abs(d_b).max())
        worst = max(worst, (gap / bound, key, gap))
    return worst


# --------------------------------------------------------------------------- #
# the split attention is timm's
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_split_attention_equals_timm_attention(dtype, weights):
    base = _torch_base(weights, dtype).eval()
    x = torch.from_numpy(_batch(np.float64 if dtype == "float64" else np.float32)[0])
    with torch.no_grad():
        y_timm = base(x).numpy()
        y_split = torch_lora.split_qkv(base)(x).numpy()
    assert isinstance(base.blocks[0].attn, torch_lora.SplitAttention)
    gap = float(np.abs(y_split - y_timm).max())
    if dtype == "float64":  # q, k, v as three matmuls instead of one: summation order only
        assert gap <= FLOAT64_RUN_ATOL, gap
    else:
        np.testing.assert_allclose(y_split, y_timm, rtol=FORWARD_RTOL, atol=FORWARD_ATOL)


def test_keras_query_lora_is_per_head_trap(weights):
    """Keras's enable_lora on a (width, heads, head_dim) query kernel: A (width, heads, r),
    one B (r, head_dim) for every head; no canonical rank-r form at heads > 1."""
    config = dataclasses.replace(CONFIG, heads=4)
    base = _keras_base(weights, config=config)
    tf_lora.add_lora(base, RANK, ALPHA)
    query = base.blocks.blocks[0].attn.query_dense
    assert tuple(query.lora_kernel_a.shape) == (config.width, config.heads, RANK)
    assert tuple(query.lora_kernel_b.shape) == (RANK, config.head_dim)
    with pytest.raises(ValueError, match="per-head adapter"):
        tf_lora.lora_tensors(base)


def test_keras_lora_kernels_float32_in_float64_model_trap(weights):
    """Keras's enable_lora creates lora_kernel_a/b as float32 whatever the layer's dtype (a
    float64 model's A @ B would be a float32 product); add_lora makes them float64."""
    bare = keras.layers.EinsumDense("abc,cde->abde", (None, 1, CONFIG.width), dtype="float64")
    bare.build((None, None, CONFIG.width))
    bare.enable_lora(RANK)
    assert bare.lora_kernel_a.dtype == "float32"
    base = tf_lora.add_lora(_keras_base(weights, "float64"), RANK, ALPHA)
    query = base.blocks.blocks[0].attn.query_dense
    assert query.lora_kernel_a.dtype == "float64" and query.lora_kernel_b.dtype == "float64"
    assert len(base.trainable_weights) == len(QKV_KEYS)


def test_keras_lora_dropout_refused(weights):
    with pytest.raises(ValueError, match="no LoRA dropout"):
        tf_lora.add_lora(_keras_base(weights), RANK, ALPHA, dropout=0.1)


# --------------------------------------------------------------------------- #
# which tensors train
# --------------------------------------------------------------------------- #
def _trainable_keys(framework, base):
    if framework == "torch":
        names = [n for n, p in base.named_parameters() if p.requires_grad]
        return sorted(f"base.{n.replace('.lora_A.default.weight', '.lora_A')}"
                      .replace(".lora_B.default.weight", ".lora_B") for n in names)
    paths = [v.path for v in base.trainable_weights]
    sub = {"query": "q", "key": "k", "value": "v", "attention_output": "proj"}
    out = []
    for path in paths:  # base/blocks/0/attn/query/lora_kernel_a
        parts = path.split("/")
        out.append(f"base.blocks.{parts[2]}.attn.{sub[parts[4]]}."
                   + {"lora_kernel_a": "lora_A", "lora_kernel_b": "lora_B"}[parts[5]])
    return sorted(out)


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_lora_trains_exactly_the_adapters(framework, weights):
    make, module = ((_torch_base, torch_lora) if framework == "torch"
                    else (_keras_base, tf_lora))
    base = module.add_lora(make(weights), RANK, ALPHA)
    assert _trainable_keys(framework, base) == QKV_KEYS
    assert sorted(module.lora_tensors(base)) == QKV_KEYS


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_lora_base_bit_identical_after_3_steps_adapters_move(framework, weights):
    x, readout, labels = _batch()
    if framework == "torch":
        base = torch_lora.add_lora(_torch_base(weights), RANK, ALPHA)
        before = {k: v for k, v in torch_weights.export_weights(base).items() if "lora_" not in k}
        start = torch_lora.lora_tensors(base)
        _torch_step(base, x, readout, labels, steps=3)
        after = torch_weights.export_weights(base)
        moved = torch_lora.lora_tensors(base)
        # the split q/k/v weights are the fused qkv's rows: compare them as they are now
        changed = [k for k in before if not np.array_equal(after[k], before[k])]
    else:
        base = tf_lora.add_lora(_keras_base(weights), RANK, ALPHA)
        before = tf_weights.export_weights(base)
        start = tf_lora.lora_tensors(base)
        _keras_step(base, x, readout, labels, steps=3)
        after = tf_weights.export_weights(base)
        moved = tf_lora.lora_tensors(base)
        changed = [k for k in before if not np.array_equal(after[k], before[k])]
    assert changed == [], f"{framework}: frozen tensors moved: {changed[:5]}"
    b_keys = [k for k in start if k.endswith("lora_B")]
    assert all(not start[k].any() for k in b_keys), "B must start at zero"
    assert all(moved[k].any() for k in b_keys), f"{framework}: some B still zero after 3 steps"


# --------------------------------------------------------------------------- #
# adapters in and out
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_lora_tensors_roundtrip_exact(framework, weights):
    make, module = ((_torch_base, torch_lora) if framework == "torch"
                    else (_keras_base, tf_lora))
    base = module.add_lora(make(weights), RANK, ALPHA, targets=("q", "k", "v", "proj"))
    tensors = _start_tensors(module.lora_tensors(base))
    module.set_lora_tensors(base, tensors)
    back = module.lora_tensors(base)
    assert back.keys() == tensors.keys()
    assert [k for k in tensors if not np.array_equal(back[k], tensors[k])] == []


def test_cross_lora_initial_tensors_agree(weights):
    torch_base = torch_lora.add_lora(_torch_base(weights), RANK, ALPHA)
    keras_base = tf_lora.add_lora(_keras_base(weights), RANK, ALPHA)
    tf_lora.set_lora_tensors(keras_base, torch_lora.lora_tensors(torch_base))
    via_tf, via_torch = tf_lora.lora_tensors(keras_base), torch_lora.lora_tensors(torch_base)
    assert [k for k in via_torch if not np.array_equal(via_tf[k], via_torch[k])] == []


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_lora_merge_equals_unmerged(framework, weights):
    x, _, _ = _batch()
    make, module = ((_torch_base, torch_lora) if framework == "torch"
                    else (_keras_base, tf_lora))
    base = module.add_lora(make(weights), RANK, ALPHA, targets=("q", "k", "v", "proj"))
    module.set_lora_tensors(base, _start_tensors(module.lora_tensors(base)))
    if framework == "torch":
        base.eval()
        with torch.no_grad():
            y = base(torch.from_numpy(x)).numpy()
            y_merged = module.merge(base)(torch.from_numpy(x)).numpy()
        assert not any("lora" in n for n, _ in base.named_modules())
    else:
        x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        y = np.asarray(base(x_nhwc))
        y_merged = np.asarray(module.merge(base)(x_nhwc))
        assert module.lora_tensors(base) == {}
    assert np.abs(y - y_merged).max() > 0 or framework == "tf"  # tf: same einsum either way
    np.testing.assert_allclose(y_merged, y, rtol=FORWARD_RTOL, atol=FORWARD_ATOL)


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_lora_save_reload_reproduces_outputs_exactly(framework, weights, tmp_path):
    x, _, _ = _batch()
    make, module = ((_torch_base, torch_lora) if framework == "torch"
                    else (_keras_base, tf_lora))
    trained = module.add_lora(make(weights), RANK, ALPHA)
    module.set_lora_tensors(trained, _start_tensors(module.lora_tensors(trained)))
    save_file(module.lora_tensors(trained), tmp_path / "adapters.safetensors")
    fresh = module.add_lora(make(weights), RANK, ALPHA)
    module.set_lora_tensors(fresh, load_file(tmp_path / "adapters.safetensors"))
    if framework == "torch":
        with torch.no_grad():
            y, y_back = (m.eval()(torch.from_numpy(x)).numpy() for m in (trained, fresh))
    else:
        x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        y, y_back = np.asarray(trained(x_nhwc)), np.asarray(fresh(x_nhwc))
    assert np.array_equal(y, y_back)


# --------------------------------------------------------------------------- #
# one step agrees across frameworks; seeded differences do not
# --------------------------------------------------------------------------- #
def _cross_step(weights, dtype="float32", torch_kw=None, keras_kw=None, start=None):
    """One SGD step on each side from the same base and adapters; the adapters before and
    after on each side (canonical)."""
    np_dtype = np.float64 if dtype == "float64" else np.float32
    x, readout, labels = _batch(np_dtype)
    torch_base = torch_lora.add_lora(_torch_base(weights, dtype), RANK, ALPHA,
                                     **(torch_kw or {}))
    keras_base = tf_lora.add_lora(_keras_base(weights, dtype), RANK,
                                  **({"alpha": ALPHA} | (keras_kw or {})))
    start_torch = start or _start_tensors(torch_lora.lora_tensors(torch_base), dtype=np_dtype)
    torch_lora.set_lora_tensors(torch_base, start_torch)
    keras_start = {k: v for k, v in start_torch.items() if k in tf_lora.lora_tensors(keras_base)}
    tf_lora.set_lora_tensors(keras_base, keras_start)
    torch.manual_seed(0)
    _torch_step(torch_base, x, readout, labels)
    _keras_step(keras_base, x, readout, labels)
    return start_torch, torch_lora.lora_tensors(torch_base), tf_lora.lora_tensors(keras_base)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cross_lora_step_agrees(dtype, weights):
    np_dtype = np.float64 if dtype == "float64" else np.float32
    start, after_torch, after_tf = _cross_step(weights, dtype)
    ratio, key, gap = _step_gap(start, after_tf, after_torch, QKV_KEYS, np_dtype)
    assert ratio <= 1.0, f"{key}: tf vs torch change differs by {gap:.3g} ({ratio:.3g}x bound)"


SEEDED = {
    # Keras scaling alpha instead of alpha / r: lora_alpha = alpha * r
    "scaling_alpha": ({}, {"alpha": ALPHA * RANK}),
    "targets_qkv_vs_qv": ({}, {"targets": ("q", "v")}),
    "dropout_torch_only": ({"dropout": 0.5}, {}),
}


@pytest.mark.parametrize("name", sorted(SEEDED))
def test_cross_lora_step_seeded_difference_fails(name, weights):
    torch_kw, keras_kw = SEEDED[name]
    start, after_torch, after_tf = _cross_step(weights, torch_kw=torch_kw, keras_kw=keras_kw)
    keys = sorted(after_tf)  # q, v only for targets_qkv_vs_qv
    ratio, key, gap = _step_gap(start, after_tf, after_torch, keys)
    assert ratio > 1.0, f"{name}: seeded difference passed the step check ({key}: {gap:.3g})"


def test_cross_lora_fused_qkv_differs_from_separate(weights):
    """PEFT on timm's fused qkv (one A for q, k, v) against Keras's three adapters, from the
    same function: Keras's q/k/v A start as the fused A, their B as its row blocks."""
    x, readout, labels = _batch()
    fused = torch_lora.add_lora(_torch_base(weights), RANK, ALPHA, targets=("qkv",))
    rng = np.random.default_rng(5)
    a = rng.normal(0.0, 0.3, (RANK, CONFIG.width)).astype(np.float32)
    b = rng.normal(0.0, 0.3, (3 * CONFIG.width, RANK)).astype(np.float32)
    start_fused = {f"base.blocks.{i}.attn.qkv.{s}": v for i in range(CONFIG.depth)
                   for s, v in (("lora_A", a), ("lora_B", b))}
    torch_lora.set_lora_tensors(fused, start_fused)
    keras_base = tf_lora.add_lora(_keras_base(weights), RANK, ALPHA)
    w = CONFIG.width
    start = {f"base.blocks.{i}.attn.{t}.{s}": (a if s == "lora_A" else b[j * w:(j + 1) * w])
             for i in range(CONFIG.depth) for j, t in enumerate("qkv")
             for s in ("lora_A", "lora_B")}
    tf_lora.set_lora_tensors(keras_base, start)
    _torch_step(fused, x, readout, labels)
    _keras_step(keras_base, x, readout, labels)
    after_fused, after_tf = torch_lora.lora_tensors(fused), tf_lora.lora_tensors(keras_base)
    # the fused adapters as three: the shared A for each of q, k, v, B's row blocks
    as_three = {f"base.blocks.{i}.attn.{t}.{s}": (
        after_fused[f"base.blocks.{i}.attn.qkv.lora_A"] if s == "lora_A"
        else after_fused[f"base.blocks.{i}.attn.qkv.lora_B"][j * w:(j + 1) * w])
        for i in range(CONFIG.depth) for j, t in enumerate("qkv") for s in ("lora_A", "lora_B")}
    ratio, key, gap = _step_gap(start, after_tf, as_three, QKV_KEYS)
    assert ratio > 1.0, f"fused qkv passed the step check ({key}: {gap:.3g})"
    # reachable update: Keras's [B_q A_q; B_k A_k; B_v A_v] has rank 3r after the step,
    # the fused B A at most r
    k = "base.blocks.0.attn"
    stacked = np.concatenate([after_tf[f"{k}.{t}.lora_B"].astype(np.float64)
                              @ after_tf[f"{k}.{t}.lora_A"] for t in "qkv"])
    assert np.linalg.matrix_rank(stacked) == 3 * RANK
