"""shared.checkpoint: exact round trip, loud failures, atomic saves."""

from __future__ import annotations

import json
import os
import pickle
import re

import numpy as np
import pytest
import safetensors.numpy as st_numpy

from shared import checkpoint
from shared.checkpoint import (
    BN_MOMENTUM_CONVENTION,
    FORMAT_VERSION,
    CheckpointError,
    check_tensors,
    load_checkpoint,
    save_checkpoint,
)

CONV = "base.block1.conv.weight"
EXPECTED = {
    CONV: (16, 3, 3, 3),
    "base.block1.bn.weight": (16,),
    "base.block1.bn.bias": (16,),
    "base.block1.bn.running_mean": (16,),
    "base.block1.bn.running_var": (16,),
    "head.weight": (5, 16),
    "head.bias": (5,),
}
META = {"arch": "smallcnn", "made_by": "torch", "bn_epsilon": "0.001", "bn_momentum": "0.01"}


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {key: rng.standard_normal(shape).astype(np.float32) for key, shape in EXPECTED.items()}
    out["base.block1.bn.running_var"] = np.abs(out["base.block1.bn.running_var"]) + 0.1
    return out


@pytest.fixture
def saved(tmp_path):
    path = save_checkpoint(tmp_path / "a.safetensors", _tensors(), META)
    return path


def _raw_save(path, tensors, meta):
    """Write a safetensors file directly, bypassing save_checkpoint's validation."""
    path.write_bytes(st_numpy.save(tensors, metadata=meta))
    return path


def _full_meta(**changes):
    meta = {**META, "format_version": FORMAT_VERSION, **changes}
    return {k: v for k, v in meta.items() if v is not None}


def _leftovers(directory, keep):
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


# --------------------------------------------------------------------------- #
# round trip
# --------------------------------------------------------------------------- #
def test_checkpoint_roundtrip_bit_exact(saved):
    tensors, meta = load_checkpoint(saved, expected=EXPECTED)
    ref = _tensors()
    assert sorted(tensors) == sorted(ref)
    for key, value in ref.items():
        assert tensors[key].dtype == np.float32 and tensors[key].shape == value.shape
        assert tensors[key].tobytes() == value.tobytes(), key
        assert tensors[key].flags.writeable
    assert meta == {**META, "format_version": FORMAT_VERSION,
                    "bn_momentum_convention": BN_MOMENTUM_CONVENTION}


def test_checkpoint_roundtrip_keeps_special_floats_and_noncontiguous(tmp_path):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    tensors = {
        "t": base.T,  # non-contiguous view
        "tiny": np.array([np.finfo(np.float32).tiny / 2, -0.0, 3.4e38], np.float32),
        "scalar": np.array(1.5, np.float32),
    }
    path = save_checkpoint(tmp_path / "b.safetensors", tensors, {"arch": "x"})
    loaded, _ = load_checkpoint(path)
    np.testing.assert_array_equal(loaded["t"], base.T)
    assert loaded["tiny"].tobytes() == tensors["tiny"].tobytes()
    assert loaded["scalar"].shape == ()


def test_checkpoint_save_keeps_caller_convention_and_inputs(tmp_path):
    meta = {"arch": "x", "bn_momentum_convention": "keras"}
    save_checkpoint(tmp_path / "c.safetensors", _tensors(), meta)
    assert meta == {"arch": "x", "bn_momentum_convention": "keras"}  # caller's dict untouched
    _, loaded = load_checkpoint(tmp_path / "c.safetensors")
    assert loaded["bn_momentum_convention"] == "keras"


def test_checkpoint_save_overwrites_existing(saved):
    save_checkpoint(saved, _tensors(seed=1), META)
    tensors, _ = load_checkpoint(saved)
    assert tensors[CONV].tobytes() == _tensors(seed=1)[CONV].tobytes()
    assert _leftovers(saved.parent, {saved.name}) == []


def test_checkpoint_file_gets_umask_permissions_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "p.safetensors", _tensors(), META)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------- #
# load: every corruption names the file (and the key)
# --------------------------------------------------------------------------- #
def _assert_error(path, needles, **kwargs):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint {path}: ")
    for needle in needles:
        assert needle in message, message
    return message


def test_load_missing_file(tmp_path):
    _assert_error(tmp_path / "nope.safetensors", ["file not found"])


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1])
def test_load_truncated_file(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    _assert_error(saved, ["truncated or corrupt"])


def test_load_pickle_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({CONV: _tensors()[CONV]}))
    _assert_error(path, ["not a safetensors file"])


def test_load_random_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    _assert_error(path, ["not a safetensors file"])


def test_load_header_not_json(tmp_path):
    body = b"{not json}"
    path = tmp_path / "h.safetensors"
    path.write_bytes(len(body).to_bytes(8, "little") + body)
    _assert_error(path, ["header is not JSON"])


def test_load_metadata_not_strings(tmp_path):
    header = json.dumps({"__metadata__": {"arch": 3}}).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    _assert_error(path, ["meta must map strings to strings"])


@pytest.mark.parametrize(
    "meta, needles",
    [
        (_full_meta(format_version="2"), ["'format_version'", "expected '1', got '2'"]),
        (_full_meta(format_version=None), ["'format_version'", "missing"]),
        (_full_meta(arch=None), ["'arch'", "missing"]),
        (None, ["'format_version'", "missing"]),
    ],
)
def test_load_bad_meta(tmp_path, meta, needles):
    path = _raw_save(tmp_path / "v.safetensors", _tensors(), meta)
    _assert_error(path, needles)


def test_load_missing_key(saved):
    expected = {**EXPECTED, "head2.weight": (5, 16)}
    _assert_error(saved, ["missing key(s) 'head2.weight'"], expected=expected)


def test_load_unexpected_key(saved):
    expected = {k: v for k, v in EXPECTED.items() if k != "head.bias"}
    _assert_error(saved, ["unexpected key(s) 'head.bias'"], expected=expected)


def test_load_many_missing_keys_listed_on_one_line(saved):
    expected = {**EXPECTED, **{f"extra.{i}": (1,) for i in range(8)}}
    message = _assert_error(saved, ["'extra.0'", "and 3 more"], expected=expected)
    assert "'extra.7'" not in message


def test_load_wrong_shape(saved):
    expected = {**EXPECTED, CONV: (16, 3, 5, 5)}
    message = _assert_error(saved, [], expected=expected)
    want = f"checkpoint {saved}: key {CONV!r}: shape expected (16, 3, 5, 5), got (16, 3, 3, 3)"
    assert message == want


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int64])
def test_load_wrong_dtype(tmp_path, dtype):
    tensors = {**_tensors(), "head.bias": np.zeros(5, dtype)}
    path = _raw_save(tmp_path / "d.safetensors", tensors, _full_meta())
    _assert_error(path, ["'head.bias'", f"dtype expected float32, got {np.dtype(dtype)}"])
    _assert_error(path, ["'head.bias'", "dtype expected float32"], expected=EXPECTED)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_load_non_finite(tmp_path, bad):
    tensors = _tensors()
    tensors["base.block1.bn.running_var"][3] = bad
    path = _raw_save(tmp_path / "n.safetensors", tensors, _full_meta())
    for kwargs in ({}, {"expected": EXPECTED}):
        _assert_error(path, ["'base.block1.bn.running_var'", "1 non-finite", "index (3,)"],
                      **kwargs)


# --------------------------------------------------------------------------- #
# check_tensors, as weights importers use it
# --------------------------------------------------------------------------- #
def test_check_tensors_accepts_exact_match():
    check_tensors(_tensors(), EXPECTED, "import")


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"head.weight": np.zeros((16, 5), np.float32)},
         "import: key 'head.weight': shape expected (5, 16), got (16, 5)"),
        ({"head.weight": [[0.0] * 16] * 5}, "import: key 'head.weight': expected a numpy array"),
        ({"head.bias": np.zeros(5, np.float64)},
         "import: key 'head.bias': dtype expected float32, got float64"),
    ],
)
def test_check_tensors_rejects(change, needle):
    with pytest.raises(CheckpointError) as info:
        check_tensors({**_tensors(), **change}, EXPECTED, "import")
    assert str(info.value) == needle or str(info.value).startswith(needle)


# --------------------------------------------------------------------------- #
# save: validation and atomicity
# --------------------------------------------------------------------------- #
def _nan_tensors():
    tensors = _tensors()
    tensors[CONV][0, 0, 0, 0] = np.nan
    return tensors


@pytest.mark.parametrize(
    "tensors, meta, needles",
    [
        (_nan_tensors(), META, [f"key {CONV!r}", "non-finite"]),
        ({**_tensors(), "head.bias": np.zeros(5, np.float64)}, META,
         ["key 'head.bias'", "dtype expected float32, got float64"]),
        ({**_tensors(), "head.bias": np.zeros(5, np.int64)}, META, ["key 'head.bias'", "int64"]),
        ({**_tensors(), "": np.zeros(1, np.float32)}, META, ["key ''", "non-empty strings"]),
        ({**_tensors(), "__metadata__": np.zeros(1, np.float32)}, META, ["reserved"]),
        ({}, META, ["no tensors"]),
        (_tensors(), {**META, "bn_momentum": 0.01}, ["meta key 'bn_momentum'", "must be str"]),
        (_tensors(), {"made_by": "torch"}, ["meta key 'arch'", "required"]),
        (_tensors(), {**META, "format_version": "0"}, ["meta key 'format_version'"]),
    ],
)
def test_failed_save_leaves_existing_checkpoint_identical(saved, tensors, meta, needles):
    before = saved.read_bytes()
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(saved, tensors, meta)
    message = str(info.value)
    assert message.startswith(f"checkpoint {saved}: ")
    for needle in needles:
        assert needle in message, message
    assert saved.read_bytes() == before
    assert _leftovers(saved.parent, {saved.name}) == []


def test_failed_save_leaves_no_new_file(tmp_path):
    path = tmp_path / "new.safetensors"
    with pytest.raises(CheckpointError):
        save_checkpoint(path, _nan_tensors(), META)
    assert list(tmp_path.iterdir()) == []


def test_serialiser_failure_leaves_no_file(saved, monkeypatch):
    before = saved.read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("serialiser exploded")

    monkeypatch.setattr(st_numpy, "save", broken)
    with pytest.raises(CheckpointError, match="could not serialise: serialiser exploded"):
        save_checkpoint(saved, _tensors(seed=1), META)
    with pytest.raises(CheckpointError, match="serialiser exploded"):
        save_checkpoint(saved.parent / "other.safetensors", _tensors(seed=1), META)
    assert saved.read_bytes() == before
    assert _leftovers(saved.parent, {saved.name}) == []


@pytest.mark.parametrize("stage", ["fsync", "replace"])
def test_write_failure_after_temp_file_written_cleans_up(saved, monkeypatch, stage):
    """The temp file exists (fully or partly written) when the failure hits."""
    before = saved.read_bytes()
    seen = []

    def broken(*args, **kwargs):
        seen.append(_leftovers(saved.parent, {saved.name}))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, stage, broken)
    with pytest.raises(CheckpointError, match="could not write: .*No space left on device"):
        save_checkpoint(saved, _tensors(seed=1), META)
    assert len(seen[0]) == 1 and seen[0][0].endswith(".tmp")  # the failure was mid-save
    assert saved.read_bytes() == before
    assert _leftovers(saved.parent, {saved.name}) == []


def test_interrupt_during_write_cleans_up_and_propagates(saved, monkeypatch):
    before = saved.read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(saved, _tensors(seed=1), META)
    assert saved.read_bytes() == before
    assert _leftovers(saved.parent, {saved.name}) == []


def test_save_into_missing_directory(tmp_path):
    path = tmp_path / "missing" / "a.safetensors"
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {path}: could not write")):
        save_checkpoint(path, _tensors(), META)
    assert list(tmp_path.iterdir()) == []
