"""The framework-neutral checkpoint: one safetensors file, never pickle.

Tensors are float32 numpy arrays under canonical key names in canonical
(PyTorch) layouts: conv weight ``(O, I, kh, kw)``, linear weight
``(out, in)``, BatchNorm ``weight``, ``bias``, ``running_mean``,
``running_var``. Each framework's ``weights.py`` converts to and from these
layouts; this module knows no framework and no layout, only names, shapes,
dtype and finiteness.

String metadata travels in the safetensors header. The caller supplies at
least ``arch`` (and typically ``made_by``, ``bn_epsilon``, ``bn_momentum``);
:func:`save_checkpoint` adds ``format_version`` and, unless given,
``bn_momentum_convention`` (momentum is stored in the torch convention).

Saving is atomic: everything is validated and serialised in memory first,
then written to a temporary file in the destination directory, fsynced and
moved over the destination with ``os.replace``. A failed save leaves no
partial file and an existing checkpoint at the path untouched.

Every error is a :class:`CheckpointError`: one line naming the file and,
where there is one, the key.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import safetensors.numpy as st_numpy

__all__ = [
    "BN_MOMENTUM_CONVENTION",
    "FLOAT32",
    "FLOAT32_OR_64",
    "FORMAT_VERSION",
    "CheckpointError",
    "check_holdable",
    "check_tensors",
    "load_checkpoint",
    "save_checkpoint",
]

FORMAT_VERSION = "1"
BN_MOMENTUM_CONVENTION = "torch: running = (1 - m) * running + m * batch (Keras momentum = 1 - m)"
REQUIRED_META = ("format_version", "arch")

_HEADER_LEN_BYTES = 8  # safetensors: little-endian u64 header length, then a JSON header
_RESERVED_KEY = "__metadata__"  # the header entry holding the string metadata
_MAX_LISTED = 5  # missing/unexpected keys named in one message before "and N more"
# dtypes a tensor may have: float32 (the canonical form), or float32/float64 where told
# (training states of float64 runs, and float64 models: shared/training_state.py)
FLOAT32 = (np.dtype(np.float32),)
FLOAT32_OR_64 = (np.dtype(np.float32), np.dtype(np.float64))


class CheckpointError(ValueError):
    """A checkpoint could not be saved or loaded; the message names the file and key."""


def _where(path) -> str:
    return f"checkpoint {path}"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _list_keys(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #
def _check_tensor(key: str, value, where: str, dtypes=FLOAT32) -> None:
    """One tensor: numpy, one of ``dtypes`` (float32 unless told), finite."""
    if not isinstance(value, np.ndarray):
        raise CheckpointError(
            f"{where}: key {key!r}: expected a numpy array, got {type(value).__name__}"
        )
    if value.dtype not in dtypes:
        names = " or ".join(np.dtype(d).name for d in dtypes)
        raise CheckpointError(f"{where}: key {key!r}: dtype expected {names}, got {value.dtype}")
    finite = np.isfinite(value)
    if not finite.all():
        bad = np.argwhere(~finite)
        first = tuple(int(i) for i in bad[0])
        raise CheckpointError(
            f"{where}: key {key!r}: {len(bad)} non-finite values "
            f"(first {value[first]} at index {first})"
        )


def _check_keys(tensors, where: str) -> None:
    if not isinstance(tensors, Mapping):
        raise CheckpointError(f"{where}: tensors must be a dict, got {type(tensors).__name__}")
    if not tensors:
        raise CheckpointError(f"{where}: no tensors")
    for key in tensors:
        if not isinstance(key, str) or not key:
            raise CheckpointError(f"{where}: key {key!r}: keys must be non-empty strings")
        if key == _RESERVED_KEY:
            raise CheckpointError(f"{where}: key {key!r}: reserved by safetensors")


def check_tensors(tensors, expected: Mapping[str, tuple[int, ...]], where: str,
                  dtypes=FLOAT32) -> None:
    """Strictly check ``tensors`` against ``expected`` (key -> shape).

    Same key set (missing keys first, then unexpected ones), then per key in
    sorted order: a float32 (or one of ``dtypes``) numpy array of exactly the
    expected shape with only finite values. Raises :class:`CheckpointError` on the first problem,
    e.g. ``"<where>: key 'head.weight': shape expected (5, 64), got (10, 64)"``.
    """
    _check_keys(tensors, where)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{where}: missing key(s) {_list_keys(missing)}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{where}: unexpected key(s) {_list_keys(unexpected)}")
    for key in sorted(expected):
        value = tensors[key]
        want = tuple(int(d) for d in expected[key])
        if isinstance(value, np.ndarray) and tuple(value.shape) != want:
            raise CheckpointError(
                f"{where}: key {key!r}: shape expected {want}, got {tuple(value.shape)}"
            )
        _check_tensor(key, value, where, dtypes)


def check_holdable(tensors: Mapping[str, np.ndarray], model_dtype, where: str) -> None:
    """float64 tensors into a float32 model only when float32 holds them exactly.

    A training state exported in float64 from a float32 run (exact) loads anywhere;
    values a float32 model would round are refused naming the first key.
    """
    if np.dtype(model_dtype) != np.float32:
        return
    for key in sorted(tensors):
        value = tensors[key]
        if value.dtype == np.float64 and not np.array_equal(value.astype(np.float32), value):
            raise CheckpointError(f"{where}: key {key!r}: float64 values that a float32 model "
                                  f"cannot hold exactly")


def _check_meta(meta, where: str) -> dict[str, str]:
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"{where}: meta must be a dict, got {type(meta).__name__}")
    for key, value in meta.items():
        if not isinstance(key, str) or not key:
            raise CheckpointError(f"{where}: meta key {key!r}: keys must be non-empty strings")
        if not isinstance(value, str):
            raise CheckpointError(
                f"{where}: meta key {key!r}: value must be str, got {type(value).__name__} "
                f"{value!r} (format numbers with repr() or str())"
            )
    return dict(meta)


# --------------------------------------------------------------------------- #
# save
# --------------------------------------------------------------------------- #
def save_checkpoint(path, tensors: Mapping[str, np.ndarray], meta: Mapping[str, str], *,
                    dtypes=FLOAT32) -> Path:
    """Validate, then atomically write ``tensors`` and ``meta`` to ``path``; return the Path.

    ``tensors``: non-empty, non-empty string keys, finite float32 numpy
    arrays. ``meta``: str -> str, must include ``arch``; ``format_version``
    (if given) must equal :data:`FORMAT_VERSION`. The parent directory must
    exist.
    """
    path = Path(path)
    where = _where(path)
    _check_keys(tensors, where)
    for key, value in tensors.items():
        _check_tensor(key, value, where, dtypes)
    meta = _check_meta(meta, where)
    if meta.setdefault("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: meta key 'format_version': this writer writes {FORMAT_VERSION!r}, "
            f"got {meta['format_version']!r}"
        )
    if not meta.get("arch"):
        raise CheckpointError(f"{where}: meta key 'arch': required, got {meta.get('arch')!r}")
    meta.setdefault("bn_momentum_convention", BN_MOMENTUM_CONVENTION)

    # np.require, not np.ascontiguousarray: the latter turns 0-d arrays into shape (1,)
    contiguous = {key: np.require(value, requirements="C") for key, value in tensors.items()}
    try:
        data = st_numpy.save(contiguous, metadata=meta)
    except Exception as exc:
        raise CheckpointError(f"{where}: could not serialise: {_one_line(exc)}") from exc
    try:
        _write_atomic(path, data)
    except OSError as exc:
        raise CheckpointError(f"{where}: could not write: {_one_line(exc)}") from exc
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a fresh file beside ``path``, fsync it, ``os.replace`` it over ``path``.

    The temporary file is created with ``os.open(O_EXCL, 0o666)`` rather than
    ``tempfile.mkstemp`` so that the checkpoint gets the usual umask-derived
    permissions instead of mkstemp's 0600. On any failure, including
    KeyboardInterrupt, the temporary file is removed and ``path`` is untouched.
    """
    directory = path.parent
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable; not possible (nor needed) on Windows."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- #
# load
# --------------------------------------------------------------------------- #
def load_checkpoint(
    path, *, expected: Mapping[str, tuple[int, ...]] | None = None, dtypes=FLOAT32
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read ``path``; return ``(tensors, meta)`` after checking everything.

    Checks: the file is a complete safetensors file; ``format_version`` is
    :data:`FORMAT_VERSION`; ``arch`` is present; every tensor is finite
    float32; and, given ``expected`` (key -> shape), exactly those keys with
    exactly those shapes (:func:`check_tensors`). Returned arrays are
    writable and own their memory.
    """
    path = Path(path)
    where = _where(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{where}: file not found") from None
    except OSError as exc:
        raise CheckpointError(f"{where}: could not read: {_one_line(exc)}") from exc

    meta = _read_meta(data, where)
    try:
        tensors = st_numpy.load(data)
    except Exception as exc:
        raise CheckpointError(
            f"{where}: not a valid safetensors file (truncated or corrupt): {_one_line(exc)}"
        ) from exc

    for key in REQUIRED_META:
        if not meta.get(key):
            raise CheckpointError(f"{where}: meta key {key!r}: required, missing")
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: meta key 'format_version': expected {FORMAT_VERSION!r}, "
            f"got {meta['format_version']!r}"
        )
    if expected is not None:
        check_tensors(tensors, expected, where, dtypes)
    else:
        _check_keys(tensors, where)
        for key in sorted(tensors):
            _check_tensor(key, tensors[key], where, dtypes)
    return {key: np.array(value) for key, value in tensors.items()}, meta


def _read_meta(data: bytes, where: str) -> dict[str, str]:
    """The header's string metadata, with clear errors for files that are not safetensors."""
    if len(data) < _HEADER_LEN_BYTES:
        raise CheckpointError(
            f"{where}: not a safetensors file (truncated or corrupt): only {len(data)} bytes"
        )
    header_len = int.from_bytes(data[:_HEADER_LEN_BYTES], "little")
    if header_len > len(data) - _HEADER_LEN_BYTES:
        raise CheckpointError(
            f"{where}: not a safetensors file (truncated or corrupt): header claims "
            f"{header_len} bytes, file has {len(data)}"
        )
    try:
        header = json.loads(data[_HEADER_LEN_BYTES : _HEADER_LEN_BYTES + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{where}: not a safetensors file (truncated or corrupt): header is not JSON "
            f"({_one_line(exc)})"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: not a safetensors file: header is not a JSON object")
    meta = header.get(_RESERVED_KEY, {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{where}: meta must map strings to strings, got {meta!r}")
    return meta
