"""The pretrained tinyconv checkpoint that ships in the package: hash, recipe, use."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict

import numpy as np
import pytest
from cli_inprocess import cli

from shared import data, shipped
from shared.checkpoint import CheckpointError, load_checkpoint
from shared.pretrain import MIN_SOURCE_ACCURACY, PretrainConfig
from shared.shipped import SHIPPED_DIR, recipe_path, shipped_checkpoint

# The budget for a file inside the package: "a few hundred KB" (it is 62 KB).
MAX_SHIPPED_BYTES = 1 << 20


def _recipe() -> dict:
    return json.loads(recipe_path("tinyconv").read_text())


def test_shipped_checkpoint_hash_matches_its_recipe():
    recipe = _recipe()
    path = SHIPPED_DIR / recipe["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == recipe["sha256"]
    assert shipped_checkpoint("tinyconv") == path
    assert recipe["size_bytes"] == path.stat().st_size <= MAX_SHIPPED_BYTES


def test_shipped_checkpoint_recipe_is_the_default_pretraining():
    recipe = _recipe()
    # remaking it with `freeze-parity pretrain --ship` uses exactly these settings
    assert recipe["pretrain_config"] == asdict(PretrainConfig(arch="tinyconv"))
    assert {"torch", "keras", "numpy"} <= set(recipe["versions"])
    _, meta = load_checkpoint(shipped_checkpoint("tinyconv"))
    assert json.loads(meta["pretrain_config"]) == recipe["pretrain_config"]
    assert meta["arch"] == "tinyconv"


def test_shipped_checkpoint_learned_the_source_task():
    """Measured here, not read from the recipe: held-out source accuracy in torch."""
    from torch_impl import model as torch_model
    from torch_impl import train as torch_train
    from torch_impl import weights as torch_weights

    tensors, _ = load_checkpoint(shipped_checkpoint("tinyconv"))
    x_torch = torch_model.build_model("tinyconv", len(data.SOURCE_CLASSES))
    torch_weights.import_weights(x_torch, tensors)
    loss, accuracy = torch_train.evaluate(x_torch, data.load_domains().source_test)
    assert accuracy >= MIN_SOURCE_ACCURACY
    one_image = 1 / len(data.load_domains().source_test)  # the recipe rounds; a run may differ by one
    assert accuracy == pytest.approx(_recipe()["source_test_accuracy"], abs=one_image)
    assert np.isfinite(loss)


def _altered_copy(tmp_path):
    for name in (_recipe()["file"], recipe_path("tinyconv").name):
        shutil.copy(SHIPPED_DIR / name, tmp_path / name)
    path = tmp_path / _recipe()["file"]
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # one bit of the last tensor byte
    path.write_bytes(bytes(raw))
    return path


def test_shipped_checkpoint_altered_byte_is_refused(tmp_path):
    path = _altered_copy(tmp_path)
    with pytest.raises(CheckpointError) as err:
        shipped_checkpoint("tinyconv", directory=tmp_path)
    message = str(err.value)
    assert str(path) in message and _recipe()["sha256"] in message and "\n" not in message


def test_shipped_checkpoint_missing_recipe_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="recipe .*missing"):
        shipped_checkpoint("tinyconv", directory=tmp_path)


def test_cli_altered_shipped_checkpoint_exit_2_one_line(tmp_path, monkeypatch):
    """Through shared.cli.main (tests/cli_inprocess.py), the package's files replaced by the copy."""
    path = _altered_copy(tmp_path)
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path)
    out = tmp_path / "reports"
    proc = cli("compare", "--steps", "1", "--quiet", "--out", str(out))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and _recipe()["sha256"] in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not out.exists() or list(out.iterdir()) == []
