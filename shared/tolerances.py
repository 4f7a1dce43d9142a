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

# --- traps -------------------------------------------------------------------
# A "must differ" assertion: the trap must be far above any rounding noise,
# at least 100x the forward tolerance, so it cannot pass by accident.
TRAP_MIN_GAP = 1e-3
