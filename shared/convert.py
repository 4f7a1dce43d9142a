"""``freeze-parity convert``: torchvision ResNet-18 state_dict <-> canonical checkpoint.

Framework-free half: key names, direction, metadata, file checks. The tensors
and ``.pth`` files are handled by ``torch_impl.resnet``, reached through
:func:`shared.frameworks.load` (``shared`` never imports torch).

Direction comes from SRC: a ``.safetensors`` whose header carries
``format_version`` is a canonical checkpoint (written by
:func:`shared.checkpoint.save_checkpoint`) and becomes a ``.pth`` state_dict;
anything else (``.pth``, ``.pt``, a ``.safetensors`` of a state_dict) is a
torchvision state_dict and becomes a canonical checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from shared.archs import ResNet18Config
from shared.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from shared.errors import UsageError

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
