"""Real data for both frameworks: scikit-learn's handwritten digits, in two domains.

``sklearn.datasets.load_digits()`` ships 1,797 greyscale 8x8 digits (values
0..16) inside the package, so nothing is downloaded. They are split into

* the **source** domain, the pretraining task: half of the images of every
  digit 0-9, grey ink on black, replicated to 3 channels, scaled to [0, 1];
* the **target** domain, the fine-tuning task: the other half of every digit
  (no image is in both), recoloured: per channel ``TARGET_BACKGROUND[c] +
  TARGET_INK_GAIN * grey``, a tinted background and the contrast cut to 0.6.

The target shift is one every channel shares in kind: an offset per channel
and one contrast factor. Through the first convolution it becomes a per-channel
affine change of the source response, which BatchNorm on *target* statistics
undoes (away from the zero-padded borders) and stored *source* statistics do
not: a base that keeps its stored source statistics sees distorted features,
one that adapts its statistics sees nearly the features it was pretrained on.
That is the seed's lesson ("make BatchNorm adapt"), and it shows in accuracy.
Measured with ``load_domains()`` (size 32, seed 0), per channel R, G, B, via
:func:`channel_stats`:

================  ======================  ======================
split             mean                    variance (biased)
================  ======================  ======================
source/train      0.306, 0.306, 0.306     0.1048, 0.1048, 0.1048
target/train      0.382, 0.432, 0.532     0.0374, 0.0374, 0.0374
================  ======================  ======================

that is mean gaps of 0.08, 0.13, 0.23 and a variance ratio of 2.8 (0.6 squared,
plus the background's share). Even single 32-image target batches (3 shuffled epochs) stay at least
``MIN_SHIFT_MEAN_GAP`` (mean) and ``MIN_SHIFT_VAR_RATIO`` (variance) away from
the source statistics in every channel (``tests/test_data.py``).

Images are NHWC float32 with 3 channels; 8x8 digits are upsampled bilinearly
(pixel centres aligned, edges clamped) to ``size x size``, so ``size=8`` is
the raw data. Labels are int64. All randomness (train/test split, batch
order, synthetic data) comes from ``numpy.random.default_rng``, never from a
framework, so both frameworks see identical batches.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MIN_SHIFT_MEAN_GAP",
    "MIN_SHIFT_VAR_RATIO",
    "SOURCE_CLASSES",
    "TARGET_BACKGROUND",
    "TARGET_CLASSES",
    "TARGET_INK_GAIN",
    "Domains",
    "Split",
    "batches",
    "channel_stats",
    "load_domains",
    "nchw_to_nhwc",
    "nhwc_to_nchw",
    "synthetic",
    "take_batch_indices",
    "take_batches",
    "validate_images",
    "validate_labels",
]

# Both domains hold every digit; they share no image (each class is split in half).
SOURCE_CLASSES = tuple(range(10))
TARGET_CLASSES = tuple(range(10))

# Target recolouring, per channel R, G, B: pixel = background + ink_gain * grey.
# One gain for every channel keeps the shift affine per channel through the first
# convolution (see the module docstring); the background tints it.
TARGET_BACKGROUND = (0.20, 0.25, 0.35)
TARGET_INK_GAIN = 0.6

# The promise the domain split makes, checked by tests/test_data.py on whole
# splits and on single batches of 32: in every channel the target mean is at
# least this far from the source mean (measured: 0.071 on the worst batch) ...
MIN_SHIFT_MEAN_GAP = 0.05
# ... and the larger of the two variances is at least this multiple of the other
# (measured: 2.64 on the worst batch).
MIN_SHIFT_VAR_RATIO = 2.5

_DIGIT_SIZE = 8  # load_digits() images are 8x8
_DIGIT_MAX = 16.0  # ... with integer values 0..16


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #
def validate_images(x, where: str) -> np.ndarray:
    """Return ``x`` unchanged if it is a finite float32 NHWC batch with 3 channels.

    Raises ``ValueError("<where>: images ...")`` naming the problem otherwise.
    """
    if not isinstance(x, np.ndarray):
        # ValueError, not TypeError: every bad input raises ValueError (the API's promise)
        raise ValueError(  # noqa: TRY004
            f"{where}: images must be a numpy array, got {type(x).__name__}"
        )
    if x.ndim != 4:
        raise ValueError(
            f"{where}: images must have rank 4 (N, H, W, 3), got rank {x.ndim} shape {x.shape}"
        )
    if x.shape[-1] != 3:
        hint = " (looks like NCHW; use nchw_to_nhwc)" if x.shape[1] == 3 else ""
        raise ValueError(
            f"{where}: images must be NHWC with 3 channels last, got shape {x.shape}{hint}"
        )
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"{where}: images must have non-empty H and W, got shape {x.shape}")
    if x.dtype != np.float32:
        raise ValueError(f"{where}: images must be float32, got {x.dtype}")
    finite = np.isfinite(x)
    if not finite.all():
        bad = np.argwhere(~finite)
        first = tuple(int(i) for i in bad[0])
        raise ValueError(
            f"{where}: images must be finite, got {len(bad)} non-finite values "
            f"(first {x[first]} at index {first})"
        )
    return x


def validate_labels(y, num_classes: int, where: str) -> np.ndarray:
    """Return ``y`` unchanged if it is a rank-1 integer array with ``0 <= y < num_classes``."""
    if not isinstance(y, np.ndarray):
        raise ValueError(  # noqa: TRY004
            f"{where}: labels must be a numpy array, got {type(y).__name__}"
        )
    if y.ndim != 1:
        raise ValueError(f"{where}: labels must have rank 1, got rank {y.ndim} shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):  # bool is not an integer dtype here
        raise ValueError(f"{where}: labels must be integers, got {y.dtype}")
    _check_count(num_classes, "num_classes", where, minimum=1)
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{where}: labels must be in [0, {num_classes}), got {int(y[i])} at index {i} "
            f"({bad.size} out of range)"
        )
    return y


def _check_count(value, name: str, where: str, *, minimum: int) -> int:
    """An ``int`` (not bool) >= minimum, else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(  # noqa: TRY004
            f"{where}: {name} must be an int, got {type(value).__name__}"
        )
    if value < minimum:
        raise ValueError(f"{where}: {name} must be >= {minimum}, got {value}")
    return int(value)


# --------------------------------------------------------------------------- #
# containers
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Split:
    """One labelled image set: NHWC float32 images, int64 labels."""

    images: np.ndarray  # (N, H, W, 3) float32
    labels: np.ndarray  # (N,) int64, 0 <= label < num_classes
    num_classes: int
    name: str  # e.g. "source/train"; used in every error message

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Split: name must be a non-empty str, got {self.name!r}")
        validate_images(self.images, self.name)
        validate_labels(self.labels, self.num_classes, self.name)
        if self.labels.dtype != np.int64:
            raise ValueError(f"{self.name}: labels must be int64, got {self.labels.dtype}")
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"{self.name}: images and labels must have the same length, "
                f"got {len(self.images)} images and {len(self.labels)} labels"
            )
        if len(self.labels) == 0:
            raise ValueError(f"{self.name}: split is empty")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Domains:
    """Pretraining (source) and fine-tuning (target) data, each with train and test."""

    source_train: Split
    source_test: Split
    target_train: Split
    target_test: Split


# --------------------------------------------------------------------------- #
# the digits
# --------------------------------------------------------------------------- #
@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """load_digits() once per process: (1797, 8, 8) float64 in [0, 1], int64 digits."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / _DIGIT_MAX).astype(np.float64)
    digits = bunch.target.astype(np.int64)
    images.flags.writeable = False  # cached: nobody may change it for later callers
    digits.flags.writeable = False
    return images, digits


def _resize_matrix(size: int, src: int = _DIGIT_SIZE) -> np.ndarray:
    """(size, src) bilinear interpolation weights, pixel centres aligned, edges clamped."""
    pos = (np.arange(size) + 0.5) * (src / size) - 0.5
    pos = np.clip(pos, 0.0, src - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, src - 1)
    frac = pos - lo
    weights = np.zeros((size, src))
    np.add.at(weights, (np.arange(size), lo), 1.0 - frac)
    np.add.at(weights, (np.arange(size), hi), frac)
    return weights


def _upsample(grey: np.ndarray, size: int) -> np.ndarray:
    """(N, 8, 8) -> (N, size, size) bilinear; identity when size == 8."""
    if size == grey.shape[1]:
        return grey.copy()
    weights = _resize_matrix(size, grey.shape[1])
    return weights @ grey @ weights.T  # rows, then columns (broadcast over N)


def _as_source(grey: np.ndarray) -> np.ndarray:
    """Grey digits -> 3 identical channels."""
    return np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)


def _as_target(grey: np.ndarray) -> np.ndarray:
    """Grey digits -> low-contrast ink on a tinted background: background + gain * grey."""
    background = np.asarray(TARGET_BACKGROUND)
    return (background + TARGET_INK_GAIN * grey[..., None]).astype(np.float32)


def _stratified_split(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices, ``round(n_c * test_fraction)`` test items per class."""
    train, test = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(len(members) * test_fraction)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_domains(size: int = 32, seed: int = 0, test_fraction: float = 0.25) -> Domains:
    """Source (grey) and target (recoloured) train/test splits of all ten digits.

    Every class is first split in half between the domains (no image is in both),
    then each domain per class into train and test, so class balance is kept.
    Deterministic in ``(seed, test_fraction)``: the split does not depend on ``size``.
    """
    size = _check_count(size, "size", "load_domains", minimum=_DIGIT_SIZE)
    seed = _check_count(seed, "seed", "load_domains", minimum=0)
    if not isinstance(test_fraction, (float, int)) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"load_domains: test_fraction must be in (0, 1), got {test_fraction!r}")
    grey, digits = _digits()
    rng = np.random.default_rng(seed)
    source_pool, target_pool = _stratified_split(digits, 0.5, rng)
    splits = {}
    for domain, pool, recolour in (
        ("source", source_pool, _as_source),
        ("target", target_pool, _as_target),
    ):
        labels = digits[pool]
        for part, idx in zip(("train", "test"), _stratified_split(labels, test_fraction, rng)):
            name = f"{domain}/{part}"
            images = recolour(_upsample(grey[pool[idx]], size))
            splits[name] = Split(images, labels[idx].copy(), len(SOURCE_CLASSES), name)
    return Domains(
        source_train=splits["source/train"],
        source_test=splits["source/test"],
        target_train=splits["target/train"],
        target_test=splits["target/test"],
    )


# --------------------------------------------------------------------------- #
# batching
# --------------------------------------------------------------------------- #
def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Index order of one epoch: a permutation seeded by (seed, epoch), or 0..n-1."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches(
    split: Split,
    batch_size: int,
    *,
    seed: int = 0,
    epochs: int = 1,
    shuffle: bool = True,
    drop_last: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(images, labels)`` batches (fresh copies) over ``epochs`` epochs.

    Epoch ``e`` visits every index once, in the order of
    ``default_rng([seed, e]).permutation(len(split))`` (or in order when
    ``shuffle=False``). With ``drop_last`` the incomplete final batch of each
    epoch is skipped, so every batch has ``batch_size`` items. Arguments are
    checked when called, not at the first ``next``; a ``batch_size`` larger
    than the split with ``drop_last`` is an error rather than zero batches.
    """
    where = f"batches({split.name})" if isinstance(split, Split) else "batches"
    if not isinstance(split, Split):
        raise ValueError(  # noqa: TRY004
            f"{where}: split must be a Split, got {type(split).__name__}"
        )
    batch_size = _check_count(batch_size, "batch_size", where, minimum=1)
    seed = _check_count(seed, "seed", where, minimum=0)
    epochs = _check_count(epochs, "epochs", where, minimum=1)
    if drop_last and batch_size > len(split):
        raise ValueError(
            f"{where}: batch_size {batch_size} > {len(split)} items with drop_last gives no batches"
        )
    return _batches(split, batch_size, seed, epochs, bool(shuffle), bool(drop_last))


def _batches(split, batch_size, seed, epochs, shuffle, drop_last):
    n = len(split)
    stop = n - n % batch_size if drop_last else n
    for epoch in range(epochs):
        order = _epoch_order(n, seed, epoch, shuffle)
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            yield split.images[idx], split.labels[idx]  # fancy indexing copies


def take_batch_indices(
    n: int, batch_size: int, steps: int, *, seed: int = 0, shuffle: bool = True
) -> list[np.ndarray]:
    """Index arrays of exactly ``steps`` full batches over a split of ``n`` items.

    The same order as :func:`batches` (epoch ``e`` permuted by ``default_rng([seed, e])``,
    incomplete final batches dropped), as indices, so a run can cache per-item work
    (features computed once) and still see the batches both frameworks see.
    """
    steps = _check_count(steps, "steps", "take_batch_indices", minimum=0)
    batch_size = _check_count(batch_size, "batch_size", "take_batch_indices", minimum=1)
    seed = _check_count(seed, "seed", "take_batch_indices", minimum=0)
    if batch_size > n:
        raise ValueError(f"take_batch_indices: batch_size {batch_size} > {n} items gives no batches")
    per_epoch = n // batch_size
    out: list[np.ndarray] = []
    epoch = 0
    while len(out) < steps:
        order = _epoch_order(n, seed, epoch, bool(shuffle))
        for start in range(0, per_epoch * batch_size, batch_size):
            if len(out) == steps:
                break
            out.append(order[start : start + batch_size])
        epoch += 1
    return out


def take_batches(
    split: Split, batch_size: int, steps: int, *, seed: int = 0, shuffle: bool = True
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exactly ``steps`` full batches: the first ``steps`` of ``batches(..., drop_last=True)``
    run over as many epochs as needed."""
    batches(split, batch_size, seed=seed, shuffle=shuffle)  # checks the other arguments
    return [(split.images[idx], split.labels[idx])
            for idx in take_batch_indices(len(split), batch_size, steps, seed=seed, shuffle=shuffle)]


# --------------------------------------------------------------------------- #
# layouts and statistics
# --------------------------------------------------------------------------- #
def _rank4(x, where: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"{where}: expected a rank-4 array, got rank {x.ndim} shape {x.shape}")
    return x


def nhwc_to_nchw(x) -> np.ndarray:
    """(N, H, W, C) -> (N, C, H, W), as a new C-contiguous float32 array."""
    x = _rank4(x, "nhwc_to_nchw")
    return np.array(x.transpose(0, 3, 1, 2), dtype=np.float32, order="C", copy=True)


def nchw_to_nhwc(x) -> np.ndarray:
    """(N, C, H, W) -> (N, H, W, C), as a new C-contiguous float32 array."""
    x = _rank4(x, "nchw_to_nhwc")
    return np.array(x.transpose(0, 2, 3, 1), dtype=np.float32, order="C", copy=True)


def channel_stats(x) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance (divide by N*H*W) of NHWC images, in float64.

    Biased, as BatchNorm normalises with (Keras also updates with it; torch's
    running_var update uses the unbiased one).
    """
    x = _rank4(x, "channel_stats").astype(np.float64)
    return x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))


# --------------------------------------------------------------------------- #
# synthetic data for fast unit tests
# --------------------------------------------------------------------------- #
def synthetic(
    n: int = 64, size: int = 16, num_classes: int = 3, seed: int = 0, shift: float = 0.0
) -> Split:
    """Tiny random images a small net can learn: a per-class random pattern plus noise.

    ``shift`` is added to every pixel (a brightness shift, for domain-shift
    tests). Classes are balanced (``n // num_classes`` or one more each), in a
    random order.
    """
    n = _check_count(n, "n", "synthetic", minimum=1)
    size = _check_count(size, "size", "synthetic", minimum=1)
    num_classes = _check_count(num_classes, "num_classes", "synthetic", minimum=1)
    seed = _check_count(seed, "seed", "synthetic", minimum=0)
    if not np.isfinite(shift):
        raise ValueError(f"synthetic: shift must be finite, got {shift}")
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(0.0, 1.0, size=(num_classes, size, size, 3))
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    noise = rng.normal(0.0, 0.1, size=(n, size, size, 3))
    images = (patterns[labels] + noise + shift).astype(np.float32)
    return Split(images, labels, num_classes, f"synthetic/seed{seed}")
