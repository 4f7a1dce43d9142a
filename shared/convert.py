"""``freeze-parity convert``: torchvision ResNet-18 state_dict <-> canonical checkpoint, and
torch training file <-> canonical training checkpoint.

Framework-free half: key names, direction, metadata, file checks. The tensors
and ``.pth`` files are handled by ``torch_impl.resnet`` and ``torch_impl.weights``,
reached through :func:`shared.frameworks.load` (``shared`` never imports torch).

Direction comes from SRC:

* a ``.safetensors`` whose header carries ``format_version`` is a canonical
  checkpoint (written by :func:`shared.checkpoint.save_checkpoint`): with meta
  ``kind`` "training" (:mod:`shared.training_state`) it becomes torch's training
  file (``torch_impl.weights.write_training_file``), else a torchvision ``.pth``
  state_dict;
* a ``.pth``/``.pt`` that is torch's training file (its ``format`` entry) becomes
  a canonical training checkpoint;
* anything else (``.pth``, ``.pt``, a ``.safetensors`` of a state_dict) is a
  torchvision state_dict and becomes a canonical checkpoint.

Training files are converted for the project's archs (tinyconv, resnet18): their
model tensors are checked against the arch's canonical shapes.
"""

from __future__ import annotations

from pathlib import Path

from shared.archs import ARCHS, ResNet18Config
from shared.checkpoint import (
    FLOAT32_OR_64,
    CheckpointError,
    check_tensors,
    load_checkpoint,
    save_checkpoint,
)
from shared.errors import UsageError
from shared.training_state import (
    TrainingState,
    is_training_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)

__all__ = [
    "ARCH",
    "BOOKKEEPING",
    "NUM_CLASSES_KEY",
    "STATE_DICT_SUFFIXES",
    "convert",
    "is_canonical_checkpoint",
    "to_canonical_key",
    "to_torchvision_key",
]

ARCH = "resnet18"
BOOKKEEPING = "num_batches_tracked"  # torch's BN step counter: not in the canonical form
NUM_CLASSES_KEY = "fc.weight"  # torchvision's classifier; its rows are the class count
STATE_DICT_SUFFIXES = (".pth", ".pt")
CANONICAL_SUFFIX = ".safetensors"
_TORCHVISION_HEAD = "fc."  # torchvision's classifier -> the project's head
_HEAD, _BASE = "head.", "base."
_HEAD_BIAS = "head.fc.bias"  # the project's classifier: its length is the class count
# meta a training checkpoint's writer sets itself (not carried between the two files)
_STRUCTURAL_META = ("format_version", "kind", "optimizer", "step", "hyper", "parameters")


def to_canonical_key(key: str) -> str:
    """torchvision key -> canonical key: ``fc.*`` -> ``head.fc.*``, the rest under ``base.``."""
    return _HEAD + key if key.startswith(_TORCHVISION_HEAD) else _BASE + key


def to_torchvision_key(key: str) -> str:
    """Inverse of :func:`to_canonical_key`."""
    if key.startswith(_HEAD + _TORCHVISION_HEAD):
        return key[len(_HEAD):]
    if key.startswith(_BASE):
        return key[len(_BASE):]
    raise ValueError(f"key {key!r}: not a canonical ResNet-18 key (expected 'base.*' or 'head.fc.*')")


def _safetensors_meta(path: Path) -> dict[str, str] | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return f.metadata()
    except (SafetensorError, OSError, ValueError) as exc:
        message = " ".join(str(exc).split())
        raise CheckpointError(f"checkpoint {path}: not a valid safetensors file: {message}") from None


def is_canonical_checkpoint(path) -> bool:
    """True for a ``.safetensors`` carrying freeze-parity's ``format_version`` metadata."""
    path = Path(path)
    if path.suffix != CANONICAL_SUFFIX:
        return False
    return "format_version" in (_safetensors_meta(path) or {})


def _check_src(src: Path) -> None:
    if not src.exists():
        raise UsageError(f"SRC {src}: file not found")
    if not src.is_file():
        raise UsageError(f"SRC {src}: not a file")
    if src.suffix not in STATE_DICT_SUFFIXES + (CANONICAL_SUFFIX,):
        raise UsageError(f"SRC {src}: unknown suffix {src.suffix!r}; expected "
                         f"{', '.join(STATE_DICT_SUFFIXES + (CANONICAL_SUFFIX,))}")


def _check_dst(src: Path, dst: Path, suffixes: tuple[str, ...], what: str) -> None:
    if dst.suffix not in suffixes:
        raise UsageError(f"DST {dst}: {what} needs suffix {' or '.join(suffixes)}, "
                         f"got {dst.suffix or 'none'!r}")
    if dst.resolve() == src.resolve():
        raise UsageError(f"DST {dst}: same file as SRC")
    if dst.is_dir():
        raise UsageError(f"DST {dst}: is a directory")


def _check_bn_meta(meta: dict[str, str], where: str) -> None:
    # torchvision's resnet18() uses BatchNorm2d defaults; other values would change the function.
    config = ResNet18Config()
    for key, want in (("bn_epsilon", config.bn_epsilon), ("bn_momentum", config.bn_momentum)):
        if key not in meta:
            continue
        try:
            ok = float(meta[key]) == want
        except ValueError:
            ok = False
        if not ok:
            raise CheckpointError(f"{where}: meta key {key!r}: torchvision's resnet18() uses "
                                  f"{want!r}, got {meta[key]!r}")


def convert(src, dst) -> str:
    """Convert SRC to DST (direction from SRC, see module docstring); a one-line summary.

    Bad input raises :class:`UsageError` or :class:`CheckpointError` naming
    the file and key; DST is written atomically, so a failure leaves none.
    """
    from shared import frameworks

    src, dst = Path(src), Path(dst)
    _check_src(src)
    if is_training_checkpoint(src):
        return _training_to_torch(src, dst)
    if src.suffix in STATE_DICT_SUFFIXES and frameworks.load("torch", "weights").is_training_file(src):
        return _training_to_canonical(src, dst)
    if is_canonical_checkpoint(src):
        _check_dst(src, dst, STATE_DICT_SUFFIXES, "a torchvision state_dict")
        tensors, meta = load_checkpoint(src)
        where = f"checkpoint {src}"
        if meta.get("arch") != ARCH:
            raise CheckpointError(f"{where}: meta key 'arch': expected {ARCH!r}, got {meta.get('arch')!r}")
        _check_bn_meta(meta, where)
        resnet = frameworks.load("torch", "resnet")
        state_dict = resnet.canonical_to_state_dict(tensors, where)
        resnet.save_state_dict_file(state_dict, dst)
        return (f"{src} (canonical, {len(tensors)} tensors) -> {dst} (torchvision state_dict, "
                f"{BOOKKEEPING} = 0)")

    _check_dst(src, dst, (CANONICAL_SUFFIX,), "a canonical checkpoint")
    resnet = frameworks.load("torch", "resnet")
    where = f"state_dict {src}"
    tensors = resnet.state_dict_to_canonical(resnet.load_state_dict_file(src), where)
    config = ResNet18Config()
    meta = {
        "arch": ARCH,
        "made_by": "freeze-parity convert (torchvision state_dict)",
        "source": src.name,
        "bn_epsilon": repr(config.bn_epsilon),
        "bn_momentum": repr(config.bn_momentum),
        "num_classes": str(tensors["head.fc.bias"].shape[0]),
    }
    save_checkpoint(dst, tensors, meta)
    return f"{src} (torchvision state_dict) -> {dst} (canonical, {len(tensors)} tensors)"


# --------------------------------------------------------------------------- #
# training: torch's training file <-> canonical training checkpoint
# --------------------------------------------------------------------------- #
def _check_training(state: TrainingState, meta: dict[str, str], where: str) -> str:
    """The arch's canonical shapes hold the state's model tensors; the arch."""
    from shared import frameworks

    arch = meta.get("arch", "")
    if arch not in ARCHS:
        raise CheckpointError(f"{where}: meta key 'arch': expected one of {', '.join(ARCHS)}, "
                              f"got {arch!r}")
    head = state.tensors.get(_HEAD_BIAS)
    if head is None or head.ndim != 1 or head.shape[0] < 1:
        raise CheckpointError(f"{where}: key {_HEAD_BIAS!r}: missing or not a vector "
                              f"(not a {arch} model?)")
    model = frameworks.load("torch", "model").build_model(arch, int(head.shape[0]))
    expected = frameworks.load("torch", "weights").canonical_shapes(model)
    check_tensors(state.tensors, expected, where, FLOAT32_OR_64)
    return arch


def _carried(meta: dict[str, str], src: Path, made_by: str) -> dict[str, str]:
    kept = {k: v for k, v in meta.items() if k not in _STRUCTURAL_META}
    return {**kept, "made_by": made_by, "source": src.name}


def _describe(state: TrainingState, arch: str) -> str:
    return (f"{arch}, {state.optimizer}, step {state.step}, "
            f"{len(state.parameters or state.trainable_keys())} parameters")


def _training_to_torch(src: Path, dst: Path) -> str:
    from shared import frameworks

    _check_dst(src, dst, STATE_DICT_SUFFIXES, "a torch training file")
    state, meta = load_training_checkpoint(src)
    arch = _check_training(state, meta, f"checkpoint {src}")
    frameworks.load("torch", "weights").write_training_file(
        dst, state, _carried(meta, src, "freeze-parity convert (canonical training checkpoint)"))
    return (f"{src} (canonical training checkpoint: {_describe(state, arch)}) -> {dst} "
            f"(torch training file, {BOOKKEEPING} = 0)")


def _training_to_canonical(src: Path, dst: Path) -> str:
    from shared import frameworks

    _check_dst(src, dst, (CANONICAL_SUFFIX,), "a canonical training checkpoint")
    state, meta = frameworks.load("torch", "weights").read_training_file(src)
    arch = _check_training(state, meta, f"training file {src}")
    save_training_checkpoint(dst, state, _carried(meta, src, "freeze-parity convert "
                                                             "(torch training file)"))
    return (f"{src} (torch training file: {_describe(state, arch)}) -> {dst} "
            f"(canonical training checkpoint)")
