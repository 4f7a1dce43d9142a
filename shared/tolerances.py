"""Every numeric tolerance the project compares with, each with its reason.

Tests and comparisons import these names; no test body holds a tolerance
literal. Widening one is a reviewed change that updates its reason.
"""

from __future__ import annotations

# --- one framework against itself -----------------------------------------
# Same weights, same batch, same mode, same framework: only the order of a few
# float32 reductions can differ (e.g. a tf.function graph vs eager).
SAME_FRAMEWORK_ATOL = 1e-6

# --- cross-framework forward ----------------------------------------------
# TensorFlow (oneDNN) and ATen sum convolutions in different orders; on
# float32 nets of up to 128 channels the largest difference seen was 1e-5.
FORWARD_ATOL = 1e-5
FORWARD_RTOL = 1e-5

# --- cross-framework training ---------------------------------------------
# Per-step losses of the same run in both frameworks: forward rounding plus
# its propagation through a few dozen optimizer steps.
STEP_LOSS_ATOL = 1e-5
STEP_LOSS_RTOL = 1e-5

# --- data parallelism (shared/distributed.py) ---------------------------------
# 2 replicas x 16 against one process x 32, BN on stored statistics: the same
# maths, but each shard's mean loss and the gradient all-reduce add float32
# rounding in a different order (measured over 10 steps: see tests/test_distributed.py).
REPLICA_STEP_ATOL = 1e-5
# Keras `full`/`bn_adapt` under MirroredStrategy with BatchNormalization(synchronized=True)
# against one process: the all-reduced moments are summed per replica, then across, and
# BN's batch-statistics backward amplifies that float32 rounding as it does for
# FULL_FLOAT32_STEP: measured 5.7e-6 after 5 steps, 4.6e-4 after 30 (the size of the
# tf-vs-torch `full` drift); still 10x below the unsynchronised gap (3.5e-2).
REPLICA_SYNC_BN_STEP_ATOL = 3e-3

# --- traps -------------------------------------------------------------------
# A "must differ" assertion: the trap must be far above any rounding noise,
# at least 100x the forward tolerance, so it cannot pass by accident.
TRAP_MIN_GAP = 1e-3

# --- cross-framework optimizers ---------------------------------------------
# The same gradients fed to the same optimizer in both frameworks (or to a
# float64 numpy reference) for a few float32 steps: the update formulas
# associate differently (Adam's bias correction is folded into the step size
# in Keras, into the denominator in torch); the largest difference seen was
# 7e-7 (AdamW, parameters up to 2.3: 3 ulp).
OPTIMIZER_STEP_ATOL = 1e-6

# --- cross-framework forward, ResNet-18 ------------------------------------
# 20 conv+BN layers of up to 512 channels (4,608-term sums) compound the
# summation-order noise: up to 2.5e-5 abs measured on features of magnitude 2-9.
RESNET_FORWARD_ATOL = 1e-4
RESNET_FORWARD_RTOL = FORWARD_RTOL
# The same ResNet-18 comparison in float64 (4.7e-14 measured): proves the float32
# gap above is rounding; a real difference in the maths would show as > 1e-6.
RESNET_FORWARD_FLOAT64_ATOL = 1e-10

# --- named exceptions to STEP_LOSS_*, each shown by a test ------------------
# `full` trains every layer with BatchNorm in batch-statistics mode in float32:
# BN's backward subtracts nearly equal terms, so float32 rounding of the two
# frameworks' forward passes (1e-7 relative) becomes 1e-4 relative gradient
# differences that 30 steps grow to ~1e-3 in the loss (measured: SGD 1.0e-3,
# Adam 1.8e-3, largest over train, eval and held-out losses). In float64 the same runs
# agree to 1e-7 (SGD), proving it is rounding, not different maths
# (tests/test_train.py::test_cross_full_divergence_is_float32_rounding).
FULL_FLOAT32_STEP_ATOL = 1e-2
FULL_FLOAT32_STEP_RTOL = 1e-2
# Adam divides by sqrt(v): where a gradient component is near zero its rounding
# decides a step of about the learning rate, so `full` + Adam diverges ~1e-4 even
# in float64 (measured 7.9e-4; Keras also keeps the learning rate in a float32 variable).
FULL_ADAM_FLOAT64_STEP_ATOL = 1e-2
