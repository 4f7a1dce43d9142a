"""The pretrained tinyconv checkpoint that ships in the package: hash, recipe, use, remaking it."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict

import numpy as np
import pytest
from cli_inprocess import cli

from shared import data, pretrain, shipped
from shared.checkpoint import CheckpointError, load_checkpoint
from shared.pretrain import MIN_SOURCE_ACCURACY, PretrainConfig, stack_versions
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


# --- remaking it: ship() and `freeze-parity pretrain --ship`, into a temporary directory ---------

# every field of a recipe, by hand (shared/shipped.py's docstring: config, command, versions,
# held-out source accuracy, the file's sha256)
RECIPE_FIELDS = {"file", "sha256", "size_bytes", "arch", "made_by", "pretrain_config",
                 "versions", "source_test_accuracy", "source_test_loss"}
SHORT_EPOCHS = 1  # the default recipe, one epoch instead of twenty: a second, not a minute


@pytest.fixture
def short_recipe(monkeypatch):
    """The default tinyconv pretraining shortened to SHORT_EPOCHS; the package's shipped files
    must be byte-identical afterwards."""
    monkeypatch.setitem(pretrain.DEFAULT_EPOCHS, "tinyconv", SHORT_EPOCHS)
    package = {p.name: p.read_bytes() for p in SHIPPED_DIR.iterdir()}
    yield
    assert {p.name: p.read_bytes() for p in SHIPPED_DIR.iterdir()} == package


def _check_shipped_pair(directory, recipe: dict) -> None:
    """The checkpoint and its JSON recipe in ``directory`` agree with each other and with a
    measurement; the loader accepts the file, and refuses it after one byte changes."""
    from torch_impl import model as torch_model
    from torch_impl import train as torch_train
    from torch_impl import weights as torch_weights

    assert sorted(p.name for p in directory.iterdir()) == ["tinyconv-source.json",
                                                           "tinyconv-source.safetensors"]
    assert json.loads((directory / "tinyconv-source.json").read_text()) == recipe
    assert set(recipe) == RECIPE_FIELDS
    path = directory / "tinyconv-source.safetensors"
    assert recipe["file"] == path.name and recipe["arch"] == "tinyconv"
    assert recipe["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert recipe["size_bytes"] == path.stat().st_size
    assert recipe["made_by"] == "freeze-parity pretrain --ship --framework torch"
    assert recipe["pretrain_config"]["epochs"] == SHORT_EPOCHS
    assert recipe["pretrain_config"] == asdict(PretrainConfig(arch="tinyconv",
                                                              epochs=SHORT_EPOCHS))
    assert recipe["versions"] == stack_versions() and {"torch", "keras", "numpy"} <= set(
        recipe["versions"])
    tensors, meta = load_checkpoint(path)
    assert meta["arch"] == "tinyconv"
    assert json.loads(meta["pretrain_config"]) == recipe["pretrain_config"]
    # measured again from the file: the recipe's held-out source scores are this checkpoint's
    x_torch = torch_model.build_model("tinyconv", len(data.SOURCE_CLASSES))
    torch_weights.import_weights(x_torch, tensors)
    loss, accuracy = torch_train.evaluate(x_torch, data.load_domains().source_test)
    assert (recipe["source_test_accuracy"], recipe["source_test_loss"]) == (
        round(accuracy, 6), round(loss, 6))
    assert shipped_checkpoint("tinyconv", directory=directory) == path
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit inside the tensor data
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"sha256 .* does not match the expected "
                                              f"{recipe['sha256']}"):
        shipped_checkpoint("tinyconv", directory=directory)


def test_ship_writes_checkpoint_and_recipe_that_agree_and_load(tmp_path, short_recipe):
    directory = tmp_path / "pretrained"
    recipe = shipped.ship("tinyconv", directory=directory)
    _check_shipped_pair(directory, recipe)


def test_cli_pretrain_ship_writes_into_the_ship_directory_and_prints_it(tmp_path, short_recipe,
                                                                        monkeypatch):
    """``freeze-parity pretrain --ship`` through shared.cli.main, the ship directory pointed at
    a temporary one."""
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path)
    done = cli("pretrain", "--ship")
    assert done.returncode == 0, done.stdout + done.stderr
    recipe = json.loads((tmp_path / "tinyconv-source.json").read_text())
    assert done.stdout == (f"shipped tinyconv: {tmp_path / 'tinyconv-source.safetensors'} sha256 "
                           f"{recipe['sha256']}, held-out source accuracy "
                           f"{recipe['source_test_accuracy']:.4f}\n")
    _check_shipped_pair(tmp_path, recipe)


@pytest.mark.parametrize("extra", [["--epochs", "1"], ["--out", "x.safetensors"]])
def test_cli_pretrain_ship_with_epochs_or_out_exit_2_one_line(tmp_path, extra, monkeypatch):
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path)
    done = cli("pretrain", "--ship", *extra)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("freeze-parity pretrain: error: --ship uses the default recipe and "
                           "location: no --epochs or --out\n")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- #
# the shipped vit
# --------------------------------------------------------------------------- #
def test_shipped_vit_hash_recipe_and_source_accuracy():
    """sha256 and recipe as tinyconv's; loads into both frameworks with equal inference
    outputs; held-out source accuracy measured here in torch."""
    import torch  # noqa: F401  (before TensorFlow)

    from tf_impl import model as tf_model
    from tf_impl import weights as tf_weights
    from torch_impl import model as torch_model
    from torch_impl import train as torch_train
    from torch_impl import weights as torch_weights

    recipe = json.loads(recipe_path("vit").read_text())
    path = SHIPPED_DIR / recipe["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == recipe["sha256"]
    assert shipped_checkpoint("vit") == path
    assert recipe["size_bytes"] == path.stat().st_size <= MAX_SHIPPED_BYTES
    assert recipe["pretrain_config"] == asdict(PretrainConfig(arch="vit"))
    tensors, meta = load_checkpoint(path)
    assert meta["arch"] == "vit"
    x_torch = torch_model.build_model("vit", len(data.SOURCE_CLASSES))
    torch_weights.import_weights(x_torch, tensors)
    x_tf = tf_model.build_model("vit", len(data.SOURCE_CLASSES))
    tf_weights.import_weights(x_tf, tensors)
    source = data.load_domains().source_test
    _loss, accuracy = torch_train.evaluate(x_torch, source)
    assert accuracy >= MIN_SOURCE_ACCURACY
    assert accuracy == pytest.approx(recipe["source_test_accuracy"], abs=1 / len(source))
    from tf_impl import train as tf_train

    tf_loss, tf_accuracy = tf_train.evaluate(x_tf, source)
    assert abs(tf_accuracy - accuracy) <= 1 / len(source) and np.isfinite(tf_loss)
