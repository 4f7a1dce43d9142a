"""One setting of the CPU matrix, in a fresh process: the demo's compare, then the seeded
one-side differences, all through ``shared.cli.main``; a JSON summary on stdout.

``python tests/cpu_matrix_driver.py OUT_DIR`` under the environment of one setting
(``ONEDNN_MAX_CPU_ISA``, ``TF_ENABLE_ONEDNN_OPTS``, ``FREEZE_PARITY_TORCH_THREADS``: read
when the frameworks start, so a setting needs its own process). tests/test_cpu_matrix.py
runs it and judges the summary; the seeded differences are tests/test_lockstep.py's.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# isort: off
import torch_impl  # noqa: E402,F401  (torch before TensorFlow)
import tf_impl  # noqa: E402,F401
# isort: on
from test_lockstep import SEEDED  # noqa: E402

from shared.cli import main  # noqa: E402

SEEDED_STEPS = "3"
# the seeded port differences (tests/test_port_seeded.py): name -> port CLI arguments
PAIRS = "tests.examples.port_pairs"
SEEDED_PORTS = {
    "port 3x learning rate under full": [f"{PAIRS}:tinyconv_full_keras",
                                         f"{PAIRS}:tinyconv_full_torch_lr3x"],
    "port Keras BN momentum 0.85": [f"{PAIRS}:bn_momentum_085_keras", f"{PAIRS}:good_torch"],
}


def _run(argv: list[str]) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return {"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()}


def run(out: Path) -> dict:
    demo = _run(["compare", "--quiet", "--json", "--out", str(out / "demo")])
    summary = {"demo": {"status": demo["status"], "stderr": demo["stderr"]}}
    if demo["status"] in (0, 1):
        report = json.loads(demo["stdout"])
        summary["demo"]["verdicts"] = {r["strategy"]: r["verdict"] for r in report["table"]["rows"]}
        summary["demo"]["failures"] = report["failures"]
        summary["demo"]["findings"] = report["findings"]
    summary["seeded"] = {}
    for name, (strategy, seed, _check) in SEEDED.items():
        with pytest.MonkeyPatch.context() as patch:
            seed(patch)
            result = _run(["compare", "--strategies", strategy, "--steps", SEEDED_STEPS,
                           "--quiet", "--out", str(out / name.replace(" ", "_"))])
        summary["seeded"][name] = {"status": result["status"],
                                   "failed": [line for line in result["stdout"].splitlines()
                                              if line.startswith("FAILED:")]}
    summary["ports"] = {}
    for name, targets in SEEDED_PORTS.items():
        result = _run(["port", *targets, "--transfer", "torch", "--steps", "2",
                       "--json", str(out / f"{name.replace(' ', '_')}.json")])
        report = json.loads((out / f"{name.replace(' ', '_')}.json").read_text()) \
            if result["status"] in (0, 1) else {"findings": []}
        summary["ports"][name] = {"status": result["status"],
                                  "findings": [(f["code"], f["keras_layer"], f["message"])
                                               for f in report["findings"]]}
    return summary


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1]))))
