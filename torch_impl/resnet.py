"""ResNet-18: torchvision's own model as the base, and its state_dict <-> canonical tensors.

The base *is* ``torchvision.models.resnet18`` with ``fc`` replaced by
``nn.Identity()`` (the project's :class:`~torch_impl.model.Head` is separate),
so canonical keys are torchvision's state_dict keys under ``base.``
(``base.layer2.0.downsample.0.weight``) and torchvision's ``fc.*`` is
``head.fc.*``. ``tf_impl/resnet.py`` builds the same tree in Keras with the
same names.

The state_dict conversion lives only on this side: a torchvision ``.pth`` is
a torch artefact. Key renaming is framework-free (:mod:`shared.convert`);
this module adds what needs torch: the reference shapes, tensors, files.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from shared.archs import ResNet18Config
from shared.checkpoint import CheckpointError, check_tensors
from shared.convert import BOOKKEEPING, NUM_CLASSES_KEY, to_canonical_key
from shared.io import atomic_path

__all__ = [
    "canonical_to_state_dict",
    "load_state_dict_file",
    "pretrained_imagenet_state_dict",
    "resnet18_base",
    "save_state_dict_file",
    "state_dict_to_canonical",
    "torchvision_shapes",
]

IMAGENET_CLASSES = 1000  # torchvision's fc: what resnet18() builds by default
_LISTED = 5  # keys named in one error message before "and N more"


def resnet18_base(config: ResNet18Config, norm_layer: Callable[[int], nn.Module]) -> nn.Module:
    """torchvision's ResNet-18 (NCHW images -> (N, 512) features) with ``fc`` removed.

    torchvision calls ``norm_layer(num_features)`` with nothing else, so the
    epsilon and momentum must come from ``norm_layer`` itself (as
    ``torch_impl.model.default_norm_layer`` does); every BatchNorm built is
    checked against ``config`` so a bare ``nn.BatchNorm2d`` with other
    defaults cannot slip in.
    """
    base = torchvision.models.resnet18(weights=None, norm_layer=norm_layer)
    base.fc = nn.Identity()
    for name, module in base.named_modules(prefix="base"):
        if hasattr(module, "running_mean"):
            _check_norm(name, module, config)
    return base


def _check_norm(name: str, module: nn.Module, config: ResNet18Config) -> None:
    # FrozenBatchNorm2d has eps but no momentum (its statistics never move).
    got = (module.eps, getattr(module, "momentum", config.bn_momentum))
    want = (config.bn_epsilon, config.bn_momentum)
    if got != want:
        raise ValueError(f"resnet18: norm layer {name!r} has (eps, momentum) {got}, config "
                         f"wants {want}: build norm_layer with default_norm_layer(config, ...)")


# --------------------------------------------------------------------------- #
# torchvision state_dict <-> canonical tensors
# --------------------------------------------------------------------------- #
def torchvision_shapes(num_classes: int = IMAGENET_CLASSES) -> dict[str, tuple[int, ...]]:
    """torchvision ``resnet18(num_classes=...)`` state_dict key -> shape, without bookkeeping.

    Built on the meta device: shapes only, no memory, no initialisation cost.
    """
    with torch.device("meta"):
        reference = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    return {key: tuple(value.shape) for key, value in reference.state_dict().items()
            if key.rsplit(".", 1)[-1] != BOOKKEEPING}


def _num_classes(weight, default: int = IMAGENET_CLASSES) -> int:
    # The classifier's rows; any count is accepted (a fine-tuned ResNet-18 has its own).
    shape = tuple(getattr(weight, "shape", ()))
    return int(shape[0]) if len(shape) == 2 and shape[0] > 0 else default


def _to_numpy(key: str, value, where: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if value.dtype != torch.float32:  # bfloat16 has no numpy twin: say it here, clearly
        raise CheckpointError(f"{where}: key {key!r}: dtype expected float32, got {value.dtype}")
    return value.detach().cpu().numpy().copy()


def state_dict_to_canonical(state_dict: Mapping, where: str = "state_dict") -> dict[str, np.ndarray]:
    """A torchvision ResNet-18 state_dict -> canonical float32 numpy tensors.

    Strict: exactly torchvision's keys and shapes (errors name the
    torchvision key), float32, finite. ``num_batches_tracked`` of each
    BatchNorm is accepted and dropped (not part of the canonical form).
    ``fc.*`` becomes ``head.fc.*`` for any number of classes.
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{where}: not a state_dict: expected a dict of tensors, "
                              f"got {type(state_dict).__name__}")
    expected = torchvision_shapes(_num_classes(state_dict.get(NUM_CLASSES_KEY)))
    bn_prefixes = {key[: -len(".running_mean")] for key in expected if key.endswith(".running_mean")}
    kept = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{where}: key {key!r}: keys must be strings (not a state_dict?)")
        if not isinstance(value, (torch.Tensor, np.ndarray)):  # e.g. {"model": ..., "epoch": 3}
            raise CheckpointError(f"{where}: key {key!r}: expected a tensor, got "
                                  f"{type(value).__name__} (not a state_dict?)")
        prefix, _, leaf = key.rpartition(".")
        if not (leaf == BOOKKEEPING and prefix in bn_prefixes):
            kept[key] = value
    # Key set first (a ResNet-34 is "unexpected keys", not a dtype error on one of them).
    for problem, keys in (("missing", set(expected) - set(kept)),
                          ("unexpected", set(kept) - set(expected))):
        if keys:
            shown = sorted(keys)
            more = f" and {len(shown) - _LISTED} more" if len(shown) > _LISTED else ""
            raise CheckpointError(f"{where}: {problem} key(s) {', '.join(map(repr, shown[:_LISTED]))}"
                                  f"{more} (expected a torchvision ResNet-18 state_dict)")
    arrays = {key: _to_numpy(key, kept[key], where) for key in expected}
    check_tensors(arrays, expected, where)
    return {to_canonical_key(key): arrays[key] for key in expected}


def canonical_to_state_dict(tensors: Mapping[str, np.ndarray],
                            where: str = "tensors") -> OrderedDict[str, torch.Tensor]:
    """Canonical ResNet-18 tensors -> a state_dict ``torchvision.models.resnet18`` loads strictly.

    Keys and order are torchvision's. ``num_batches_tracked`` is not in the
    canonical form, so every BatchNorm gets ``0`` (torch only reads it when
    ``momentum=None``, cumulative averaging; ResNet-18 uses momentum 0.1).
    """
    weight = tensors.get(to_canonical_key(NUM_CLASSES_KEY)) if isinstance(tensors, Mapping) else None
    num_classes = _num_classes(weight)
    check_tensors(tensors, {to_canonical_key(k): s for k, s in torchvision_shapes(num_classes).items()},
                  where)
    with torch.device("meta"):
        reference = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key in reference.state_dict():
        if key.rsplit(".", 1)[-1] == BOOKKEEPING:
            out[key] = torch.zeros((), dtype=torch.long)
        else:
            out[key] = torch.from_numpy(np.array(tensors[to_canonical_key(key)], np.float32))
    return out


def load_state_dict_file(path) -> dict:
    """Read a ``.pth``/``.pt`` (``torch.load(weights_only=True)``) or a ``.safetensors`` state_dict.

    Only reads; :func:`state_dict_to_canonical` checks what was read.
    """
    path = Path(path)
    where = f"state_dict {path}"
    if not path.is_file():
        raise CheckpointError(f"{where}: " + ("not a file" if path.exists() else "file not found"))
    try:
        if path.suffix == ".safetensors":
            import safetensors.torch

            return safetensors.torch.load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (torch.load's unpickler raises any type)
        message = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{where}: could not be read as a state_dict: "
                              f"{type(exc).__name__}: {message}") from None


def save_state_dict_file(state_dict: Mapping[str, torch.Tensor], path) -> Path:
    """``torch.save`` ``state_dict`` to ``path`` atomically (no partial file on failure)."""
    with atomic_path(path) as tmp:
        torch.save(dict(state_dict), tmp)
    return Path(path)


def pretrained_imagenet_state_dict(progress: bool = True) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet ResNet-18 weights (IMAGENET1K_V1, top-1 69.758%) as a state_dict.

    Downloads once (about 45 MB, hash-checked) into torch's hub cache
    (``$TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth``); needs network
    access the first time. Feed the result to :func:`state_dict_to_canonical`,
    or convert the cached file with ``freeze-parity convert``.
    """
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    return weights.get_state_dict(progress=progress, check_hash=True)
