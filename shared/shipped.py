"""The pretrained tinyconv checkpoint that ships inside the package.

Pretraining in float32 on another CPU gives another checkpoint, and every
downstream number (the README's tables, the explain decomposition) moves with
it. So the reference run starts from one file made once and shipped beside
this module: ``shared/pretrained/tinyconv-source.safetensors`` (canonical
format, :mod:`shared.checkpoint`), with its recipe in
``tinyconv-source.json``: the pretraining config, the command that made it,
the framework versions, its held-out source accuracy and the file's sha256.

:func:`shipped_checkpoint` checks the sha256 before a run may use the file; an
altered file is a :class:`~shared.checkpoint.CheckpointError` naming the file
and both hashes. ResNet-18 (45 MB) does not ship; it is pretrained on first
use into the cache (:func:`shared.pretrain.ensure_checkpoint`).

``freeze-parity pretrain --ship`` remakes both files (a maintainer's step:
the README's numbers must then be re-measured, and the tests say which).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from shared.checkpoint import CheckpointError, load_checkpoint
from shared.io import atomic_write_text

__all__ = [
    "CACHE",
    "SHIPPED_ARCHS",
    "SHIPPED_DIR",
    "default_checkpoint",
    "file_sha256",
    "recipe_path",
    "ship",
    "shipped_checkpoint",
]

SHIPPED_DIR = Path(__file__).parent / "pretrained"
SHIPPED_ARCHS = ("tinyconv", "vit")
# the value of --checkpoint (RunConfig.checkpoint) that selects the cache instead
CACHE = "cache"


def _stem(arch: str) -> str:
    return f"{arch}-source"


def recipe_path(arch: str = "tinyconv", directory: Path | None = None) -> Path:
    return Path(directory or SHIPPED_DIR) / f"{_stem(arch)}.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _recipe(arch: str, directory: Path | None) -> dict:
    path = recipe_path(arch, directory)
    try:
        recipe = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"shipped checkpoint recipe {path}: missing (reinstall freeze-parity, "
                              f"or remake it with `freeze-parity pretrain --ship`)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"shipped checkpoint recipe {path}: unreadable ({exc})") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("sha256"), str) \
            or not isinstance(recipe.get("file"), str):
        raise CheckpointError(f"shipped checkpoint recipe {path}: needs 'file' and 'sha256'")
    return recipe


def shipped_checkpoint(arch: str = "tinyconv", directory: Path | None = None) -> Path:
    """Path of the shipped checkpoint of ``arch`` after checking its sha256 and arch."""
    if arch not in SHIPPED_ARCHS:
        raise CheckpointError(f"no shipped checkpoint for arch {arch!r} (shipped: "
                              f"{', '.join(SHIPPED_ARCHS)}); use the cache or --checkpoint")
    recipe = _recipe(arch, directory)
    path = Path(directory or SHIPPED_DIR) / recipe["file"]
    if not path.is_file():
        raise CheckpointError(f"shipped checkpoint {path}: missing (reinstall freeze-parity)")
    actual = file_sha256(path)
    if actual != recipe["sha256"]:
        raise CheckpointError(f"shipped checkpoint {path}: sha256 {actual} does not match the "
                              f"expected {recipe['sha256']} ({recipe_path(arch, directory).name}): "
                              f"the file was altered; reinstall freeze-parity")
    _, meta = load_checkpoint(path)
    if meta.get("arch") != arch:
        raise CheckpointError(f"shipped checkpoint {path}: made for arch {meta.get('arch')!r}, not {arch!r}")
    return path


def uses_cache(arch: str, checkpoint: str | None = None) -> bool:
    """Whether a run of ``arch`` given ``checkpoint`` starts from the cache's checkpoint:
    asked for (``"cache"``), or no checkpoint given and none ships for ``arch``."""
    if checkpoint is None:
        return arch not in SHIPPED_ARCHS
    return str(checkpoint) == CACHE


def default_checkpoint(arch: str, checkpoint: str | None = None) -> str:
    """What a run starts from: ``checkpoint`` if given, the cache if it is ``"cache"``,
    else the shipped file (tinyconv) or the cache (pretrained on first use)."""
    from shared.pretrain import ensure_checkpoint

    if uses_cache(arch, checkpoint):
        return str(ensure_checkpoint(arch))
    return str(checkpoint) if checkpoint is not None else str(shipped_checkpoint(arch))


def ship(arch: str = "tinyconv", directory: Path | None = None, framework: str = "torch") -> dict:
    """Pretrain ``arch`` with its default recipe and write the checkpoint and its recipe."""
    from shared.pretrain import PretrainConfig, pretrain, stack_versions

    if arch not in SHIPPED_ARCHS:
        raise CheckpointError(f"arch {arch!r} does not ship (shipped: {', '.join(SHIPPED_ARCHS)})")
    directory = Path(directory or SHIPPED_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    config = PretrainConfig(arch=arch, framework=framework)
    path = directory / f"{_stem(arch)}.safetensors"
    metrics = pretrain(config, path)
    recipe = {
        "file": path.name,
        "sha256": file_sha256(path),
        "size_bytes": path.stat().st_size,
        "arch": arch,
        "made_by": f"freeze-parity pretrain --ship --framework {framework}",
        "pretrain_config": asdict(config),
        "versions": stack_versions(),
        "source_test_accuracy": round(metrics["accuracy"], 6),
        "source_test_loss": round(metrics["loss"], 6),
    }
    atomic_write_text(recipe_path(arch, directory), json.dumps(recipe, indent=2, sort_keys=True) + "\n")
    return recipe
