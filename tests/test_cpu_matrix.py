"""The demo's verdicts do not depend on the CPU: the same compare under other summation orders.

oneDNN (inside TensorFlow, and inside torch for convolutions) picks its kernels by the
CPU's instruction set, capped by ``ONEDNN_MAX_CPU_ISA``; TensorFlow's oneDNN custom
operations are switched by ``TF_ENABLE_ONEDNN_OPTS``; torch's intra-op thread count
(``FREEZE_PARITY_TORCH_THREADS``) splits its sums. Each changes every float32 sum's order,
as another CPU does. Under each setting, in a fresh process (tests/cpu_matrix_driver.py),
``freeze-parity compare`` (the demo, 100 steps) must give the freezing-semantics verdicts
it gives anywhere, exit 0, and each seeded one-side difference must still fail it at its
strategy, step and check. The settings combine the three knobs so that three processes
cover each value of each.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shared.strategies import STRATEGIES

HERE = Path(__file__).resolve().parent
# name -> environment; together every knob takes each of its values
SETTINGS = {
    "default ISA, oneDNN custom ops on, torch 1 thread": {
        "TF_ENABLE_ONEDNN_OPTS": "1", "FREEZE_PARITY_TORCH_THREADS": "1"},
    "AVX2, oneDNN custom ops on, torch 2 threads": {
        "ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2", "TF_ENABLE_ONEDNN_OPTS": "1",
        "FREEZE_PARITY_TORCH_THREADS": "2"},
    "SSE41, oneDNN custom ops off, torch 1 thread": {
        "ONEDNN_MAX_CPU_ISA": "SSE41", "DNNL_MAX_CPU_ISA": "SSE41", "TF_ENABLE_ONEDNN_OPTS": "0",
        "FREEZE_PARITY_TORCH_THREADS": "1"},
}
# a process runs the demo (about 1 minute of CPU here), four short seeded compares and two
# seeded port checks
TIMEOUT_S = 900
FRAMEWORK_LOG = re.compile(r"WARNING:tensorflow|^I0000|absl::|oneDNN custom operations|"
                           r"cpu_feature_guard")
VERDICT = re.compile(r"^ok(; numerics: (tf|torch)(, (tf|torch))?)?$")


@pytest.fixture(scope="module", params=list(SETTINGS))
def setting(request, tmp_path_factory):
    env = {**os.environ, **SETTINGS[request.param], "FREEZE_PARITY_WORKERS": "0"}
    for knob in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        if knob not in SETTINGS[request.param]:
            env.pop(knob, None)
    out = tmp_path_factory.mktemp("cpu-matrix")
    try:
        proc = subprocess.run([sys.executable, str(HERE / "cpu_matrix_driver.py"), str(out)],
                              capture_output=True, text=True, env=env, timeout=TIMEOUT_S, check=False,
                              cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        pytest.fail(f"CPU matrix setting {request.param!r}: no result in {TIMEOUT_S} s")
    assert proc.returncode == 0, f"{request.param}: driver failed:\n{proc.stderr[-3000:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    summary["process_stderr"] = proc.stderr
    return request.param, summary


@pytest.mark.slow
def test_cpu_matrix_demo_exits_0_with_the_same_semantics_verdicts(setting):
    name, summary = setting
    demo = summary["demo"]
    assert demo["status"] == 0, f"{name}: {demo.get('failures')}\n{demo['stderr'][-2000:]}"
    verdicts = demo["verdicts"]
    assert list(verdicts) == list(STRATEGIES)
    assert verdicts.pop("naive") == "ok: differs as expected", name
    for strategy, verdict in verdicts.items():  # numerics findings may name either framework
        assert VERDICT.match(verdict), f"{name}: {strategy}: {verdict}"
    assert demo["failures"] == []
    # a whole compare builds dozens of Keras models: not one framework log line on stderr
    # (TensorFlow's start-up log, its "triggered tf.function retracing" warnings)
    logged = [line for line in summary["process_stderr"].splitlines()
              if FRAMEWORK_LOG.search(line)]
    assert not logged, f"{name}: {logged[:3]}"


@pytest.mark.slow
def test_cpu_matrix_seeded_differences_fail_at_strategy_step_and_check(setting):
    from test_lockstep import SEEDED

    name, summary = setting
    for seeded, (strategy, _, check) in SEEDED.items():
        result = summary["seeded"][seeded]
        assert result["status"] == 1, f"{name}: {seeded}: exit {result['status']}"
        first = result["failed"][0]
        assert first.startswith(f"FAILED: {strategy}: lockstep step "), (name, seeded, first)
        assert check in first and "differ in float64 too" in first, (name, seeded, first)


@pytest.mark.slow
def test_cpu_matrix_seeded_port_differences_exit_1_naming_layer_step_and_check(setting):
    name, summary = setting
    expected = {"port 3x learning rate under full": ("PORT_STEP_UPDATE", "update "),
                "port Keras BN momentum 0.85": ("PORT_STATS_DIVERGE", "stats bn <-> bn ")}
    for seeded, (code, check) in expected.items():
        result = summary["ports"][seeded]
        assert result["status"] == 1, f"{name}: {seeded}: exit {result['status']}"
        found = [f for f in result["findings"] if f[0] == code]
        assert found, f"{name}: {seeded}: {result['findings']}"
        _, layer, message = found[0]
        assert layer != "(model)" and f"at step 0, from the same state: {check}" in message, (
            name, seeded, found[0])
