"""``freeze-parity port`` and the ``assert_port_matches`` fixture on the example pairs.

Every run goes through ``shared.cli.main`` in this process (the frameworks are
already imported; the console script is that function, and tests/test_audit.py
runs it as a subprocess): bad input must come back as exit 2 and one stderr
line, so a traceback would fail the test as an uncaught exception.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from shared.cli import main
from shared.pytest_plugin import assert_port_matches
from tests.examples import port_pairs as pp

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]
PAIRS = "tests.examples.port_pairs"
SHAPE = ["--input-shape", f"{pp.SIZE},{pp.SIZE},3"]


def _port(*args):
    return main(["port", *args])


def test_port_command_broken_pair_exit_1_table_findings_json_and_figure(tmp_path, capsys):
    out, report = tmp_path / "out", tmp_path / "report.json"
    code = _port(f"{PAIRS}:bn_epsilon_keras", f"{PAIRS}:good_torch", *SHAPE, "--transfer",
                 "torch", "--steps", "1", "--out", str(out), "--json", str(report))
    printed = capsys.readouterr().out
    assert code == 1
    assert "PORT_BN_EPSILON at bn <-> bn" in printed and "fix: pass the same epsilon" in printed
    assert "first divergent layer bn <-> bn" in printed  # the table title
    data = json.loads(report.read_text())
    assert data["ok"] is False and data["first_divergent"]["inference"]["keras_layer"] == "bn"
    assert [f["code"] for f in data["findings"]][:1] == ["PORT_BN_EPSILON"]
    assert json.loads((out / "port.json").read_text()) == data
    assert (out / "port.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _weights_file(path: Path, shift: float) -> dict:
    """good_torch's state_dict with every float tensor moved by ``shift`` (BN variances stay
    positive), saved to ``path``: weights the factory alone never builds."""
    state = {k: (v + shift if v.is_floating_point() else v.clone())
             for k, v in pp.good_torch().state_dict().items()}
    torch.save(state, path)
    return state


def test_port_command_good_pair_with_torch_weights_file_exit_0_runs_on_the_files_weights(
        tmp_path, capsys, monkeypatch):
    """The model checked holds the file's values (not the factory's), and another file gives
    another run: a loader that checks the keys but ignores the values fails both."""
    import shared.port

    checked = []  # the torch model's state_dict as check_port receives it
    real_check = shared.port.check_port

    def check_port(keras_model, torch_model, **kwargs):
        checked.append({k: v.detach().clone() for k, v in torch_model.state_dict().items()})
        return real_check(keras_model, torch_model, **kwargs)

    monkeypatch.setattr(shared.port, "check_port", check_port)
    steps = {}
    for name, shift in (("a", 0.25), ("b", -0.125)):
        weights, report = tmp_path / f"{name}.pth", tmp_path / f"{name}.json"
        written = _weights_file(weights, shift)
        code = _port(f"{PAIRS}:good_keras", f"{PAIRS}:good_torch", *SHAPE, "--transfer", "torch",
                     "--steps", "1", "--torch-weights", str(weights), "--json", str(report))
        out = capsys.readouterr().out
        assert code == 0 and "0 findings" in out, out
        loaded = checked.pop()
        assert loaded.keys() == written.keys()
        differ = [k for k in written if not torch.equal(loaded[k], written[k])]
        assert differ == [], f"{weights.name}: the checked model does not hold the file's {differ}"
        steps[name] = json.loads(report.read_text())["steps"]
    assert steps["a"][0]["torch_train"] != steps["b"][0]["torch_train"]
    assert steps["a"][0]["keras_train"] != steps["b"][0]["keras_train"]  # transferred too


@pytest.mark.parametrize("keras_target, torch_target, extra, match", [
    (f"{PAIRS}:not_a_model", f"{PAIRS}:good_torch", [],
     f"{PAIRS}:not_a_model: got a builtins.str"),
    (f"{PAIRS}:good_keras", f"{PAIRS}:raises", [],
     (f"freeze-parity port: error: {PAIRS}:raises: the factory raised RuntimeError: the "
      "factory could not build its model")),
    (f"{PAIRS}:two_convs_keras", f"{PAIRS}:good_torch", [],
     "different weighted leaf counts: keras 4, torch 3"),
    (f"{PAIRS}:good_keras", f"{PAIRS}:dense_first_torch", [],
     "cannot pair keras layer conv (Conv2D"),
    (f"{PAIRS}:flatten_keras", f"{PAIRS}:flatten_torch", ["--input-shape", "20,20,3"],
     f"{PAIRS}:flatten_keras: the forward pass on input (H, W, C) (20, 20, 3) failed"),
    (f"{PAIRS}:good_keras", f"{PAIRS}:good_torch", ["--input-shape", "16,16"],
     "--input-shape '16,16': expected H,W,C"),
    (f"{PAIRS}:twin_branches_keras", f"{PAIRS}:twin_branches_torch", SHAPE,
     "pairing is ambiguous: keras layer shortcut (Conv2D"),
    (f"{PAIRS}:good_keras", f"{PAIRS}:class_token_torch", SHAPE,
     f"{PAIRS}:class_token_torch: torch module '(model)' (Net): parameter 'token'"),
])
def test_port_command_bad_input_exit_2_one_line(tmp_path, capsys, keras_target, torch_target,
                                                extra, match):
    out = tmp_path / "out"
    code = _port(keras_target, torch_target, *extra, "--steps", "0", "--out", str(out))
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and match in err, err
    assert not out.exists()


def test_port_command_bad_torch_weights_file_exit_2(tmp_path, capsys):
    weights = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, weights)
    code = _port(f"{PAIRS}:good_keras", f"{PAIRS}:good_torch", *SHAPE, "--torch-weights",
                 str(weights))
    err = capsys.readouterr().err
    assert code == 2 and f"--torch-weights {weights}: does not fit {PAIRS}:good_torch" in err


# --------------------------------------------------------------------------- #
# the pytest fixture
# --------------------------------------------------------------------------- #
def test_assert_port_matches_names_first_divergent_layer_and_findings():
    with pytest.raises(AssertionError) as info:
        assert_port_matches(pp.same_padding_keras(), pp.same_padding_torch(),
                            input_shape=(pp.SIZE, pp.SIZE, 3), transfer_from="torch", steps=0)
    message = str(info.value)
    assert "first divergent layer conv <-> conv" in message
    assert "PORT_SAME_PADDING_STRIDE2_EVEN at conv <-> conv" in message
    report = assert_port_matches(pp.good_keras(), pp.good_torch(),
                                 input_shape=(pp.SIZE, pp.SIZE, 3), transfer_from="torch",
                                 steps=0)
    assert report.ok and len(report.pairs) == 3


def test_assert_port_matches_fixture_in_a_user_suite(pytester):
    pytester.makepyfile(test_user_port="""
        from tests.examples import port_pairs as pp

        def test_good(assert_port_matches):
            assert_port_matches(pp.good_keras(), pp.good_torch(), input_shape=(16, 16, 3),
                                transfer_from="torch", steps=0)

        def test_dropout(assert_port_matches):
            assert_port_matches(pp.dropout_keras(), pp.dropout_torch(), input_shape=(16, 16, 3),
                                transfer_from="torch", steps=0)
    """)
    pytester.syspathinsert(REPO)
    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*PORT_DROPOUT_RATE at dropout <-> dropout*"])


def test_bench_port_times_the_check_and_reports_its_verdict():
    from shared.commands.bench import PORT_BENCH, bench_port

    result = bench_port({**PORT_BENCH, "arch": "tinyconv", "size": 32, "steps": 1})
    assert result["ok"] and result["pairs"] == 7 and result["findings"] == []
    assert 0 < result["check_s"] and result["met"] == (result["check_s"] <= result["goal_s"])


def test_bench_port_family_and_pairing_time_one_family_and_report_its_pairs():
    from shared.commands.bench import bench_pairing, bench_port_family

    result = bench_port_family("MobileNetV3Small", size=32, steps=0)
    assert result["pairs"] == 86 and "PORT_PREPROCESSING" in result["findings"]
    assert 0 < result["check_cpu_s"] and 0 < result["check_s"] and 0 < result["build_s"]
    pairing = bench_pairing("MobileNetV3Small", size=32)
    assert pairing["pairs"] == 86 and 0 < pairing["pair_s"]
    keras_records, torch_records = pairing["records"]
    assert keras_records > 86 and torch_records > 86  # activations, pads, ... around the pairs


def test_port_command_keras_application_against_torchvision_exit_1_findings(capsys):
    code = _port("tests.examples.applications:mobilenet_v3_small_keras",
                 "tests.examples.applications:mobilenet_v3_small_torch", "--transfer", "torch",
                 "--steps", "0")
    printed = capsys.readouterr().out
    assert code == 1 and "port check: 86 pairs" in printed
    assert re.search(r"PORT_PREPROCESSING at rescaling(_\d+)? <-> \(none\)", printed)
    assert "PORT_ACTIVATION" not in printed  # hard_silu is torch's Hardswish
