"""shared.data: the digits domains, deterministic batching, layouts and input checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import data
from shared.data import (
    MIN_SHIFT_MEAN_GAP,
    MIN_SHIFT_VAR_RATIO,
    SOURCE_CLASSES,
    TARGET_CLASSES,
    Split,
    batches,
    channel_stats,
    load_domains,
    nchw_to_nhwc,
    nhwc_to_nchw,
    synthetic,
    take_batches,
    validate_images,
    validate_labels,
)
from shared.tolerances import SAME_FRAMEWORK_ATOL

SPLIT_NAMES = ("source_train", "source_test", "target_train", "target_test")
BATCH = 32  # the batch size the experiments use


@pytest.fixture(scope="module")
def domains():
    return load_domains()


def _splits(d):
    return [getattr(d, name) for name in SPLIT_NAMES]


def _indexed_split(n: int, num_classes: int = 3) -> Split:
    """A split whose image i is filled with the value i, so batches reveal their indices."""
    images = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 2, 2, 3))
    labels = np.arange(n, dtype=np.int64) % num_classes
    return Split(np.ascontiguousarray(images), labels, num_classes, "indexed")


def _indices(x: np.ndarray) -> np.ndarray:
    return x[:, 0, 0, 0].astype(np.int64)


# --------------------------------------------------------------------------- #
# the domains
# --------------------------------------------------------------------------- #
def test_load_domains_shapes_dtypes_and_names(domains):
    total = 0
    for name, split in zip(SPLIT_NAMES, _splits(domains)):
        assert split.name == name.replace("_", "/")
        assert split.images.shape == (len(split), 32, 32, 3)
        assert split.images.dtype == np.float32 and split.labels.dtype == np.int64
        assert split.images.flags["C_CONTIGUOUS"]
        assert split.num_classes == 10
        assert set(np.unique(split.labels)) == set(range(10))
        assert 0.0 <= split.images.min() and split.images.max() <= 1.0
        total += len(split)
    assert total == 1797
    assert SOURCE_CLASSES == TARGET_CLASSES == (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)


def test_load_domains_source_and_target_share_no_image():
    from sklearn.datasets import load_digits

    raw = load_domains(size=8)
    as_bytes = lambda grey: np.round(grey * 16).astype(np.int64).tobytes()
    source = [as_bytes(img[..., 0]) for img in
              np.concatenate([raw.source_train.images, raw.source_test.images])]
    # undo the target recolouring of channel R by hand: grey = (pixel - 0.20) / 0.6
    target = [as_bytes((img[..., 0] - 0.20) / 0.6) for img in
              np.concatenate([raw.target_train.images, raw.target_test.images])]
    digits = [img.astype(np.int64).tobytes() for img in load_digits().images]
    # every image of the dataset is used once: the two domains together are the dataset
    assert sorted(source + target) == sorted(digits)
    # the two domains split every class about in half
    for c in range(10):
        n_src = int((raw.source_train.labels == c).sum() + (raw.source_test.labels == c).sum())
        n_tgt = int((raw.target_train.labels == c).sum() + (raw.target_test.labels == c).sum())
        assert abs(n_src - n_tgt) <= 1, (c, n_src, n_tgt)


def test_load_domains_split_is_stratified(domains):
    for domain in ("source", "target"):
        train = np.bincount(getattr(domains, f"{domain}_train").labels)
        test = np.bincount(getattr(domains, f"{domain}_test").labels)
        np.testing.assert_array_equal(test, np.round((train + test) * 0.25).astype(np.int64))


def test_load_domains_source_is_grey_target_is_coloured(domains):
    src = domains.source_train.images
    np.testing.assert_array_equal(src[..., 0], src[..., 1])
    np.testing.assert_array_equal(src[..., 0], src[..., 2])
    tgt = domains.target_train.images
    assert not np.array_equal(tgt[..., 0], tgt[..., 2])


def test_load_domains_same_seed_identical_bytes(domains):
    again = load_domains()
    for a, b in zip(_splits(domains), _splits(again)):
        assert a.images.tobytes() == b.images.tobytes()
        assert a.labels.tobytes() == b.labels.tobytes()


def test_load_domains_other_seed_other_split(domains):
    other = load_domains(seed=1)
    assert not np.array_equal(domains.source_test.images, other.source_test.images)


def test_load_domains_size_8_is_raw_digits_and_split_ignores_size():
    from sklearn.datasets import load_digits

    raw = load_domains(size=8)
    digits = load_digits()
    grey = raw.source_train.images[..., 0]
    # every source image is one of the raw digits / 16, exactly
    raw_set = {(digits.images[i] / 16.0).astype(np.float32).tobytes() for i in range(1797)}
    assert all(img.tobytes() in raw_set for img in grey)
    for size in (9, 65):
        other = load_domains(size=size)
        assert other.target_test.images.shape[1:] == (size, size, 3)
        np.testing.assert_array_equal(other.target_test.labels, raw.target_test.labels)


@pytest.mark.parametrize("kwargs", [{"size": 7}, {"seed": -1}, {"test_fraction": 1.0}])
def test_load_domains_bad_argument_raises(kwargs):
    (name,) = kwargs
    with pytest.raises(ValueError, match=name):
        load_domains(**kwargs)


def test_domain_shift_whole_splits_large(domains):
    mean_src, var_src = channel_stats(domains.source_train.images)
    for split in (domains.target_train, domains.target_test):
        mean_tgt, var_tgt = channel_stats(split.images)
        gap = np.abs(mean_tgt - mean_src)
        ratio = np.maximum(var_src, var_tgt) / np.minimum(var_src, var_tgt)
        assert gap.min() > MIN_SHIFT_MEAN_GAP, f"{split.name}: mean gaps {gap}"
        assert ratio.min() > MIN_SHIFT_VAR_RATIO, f"{split.name}: variance ratios {ratio}"


def test_domain_shift_every_target_batch_far_from_source_stats(domains):
    """What BatchNorm sees: each target batch's statistics vs the source's."""
    mean_src, var_src = channel_stats(domains.source_train.images)
    for x, _ in batches(domains.target_train, BATCH, epochs=3):
        mean_b, var_b = channel_stats(x)
        gap = np.abs(mean_b - mean_src)
        ratio = np.maximum(var_src, var_b) / np.minimum(var_src, var_b)
        assert gap.min() > MIN_SHIFT_MEAN_GAP, f"mean gaps {gap}"
        assert ratio.min() > MIN_SHIFT_VAR_RATIO, f"variance ratios {ratio}"


def test_channel_stats_matches_numpy():
    x = synthetic(n=5, size=4).images
    mean, var = channel_stats(x)
    flat = x.reshape(-1, 3).astype(np.float64)
    np.testing.assert_array_equal(mean, flat.mean(axis=0))
    np.testing.assert_array_equal(var, flat.var(axis=0))


# --------------------------------------------------------------------------- #
# batching
# --------------------------------------------------------------------------- #
def test_batches_same_seed_identical_other_seed_other_order(domains):
    split = domains.target_train
    a = list(batches(split, BATCH, seed=3))
    b = list(batches(split, BATCH, seed=3))
    c = list(batches(split, BATCH, seed=4))
    assert all(xa.tobytes() == xb.tobytes() and np.array_equal(ya, yb)
               for (xa, ya), (xb, yb) in zip(a, b))
    assert not np.array_equal(a[0][0], c[0][0])


def test_batches_cover_every_index_once_per_epoch():
    split = _indexed_split(10)
    got = [_indices(x) for x, _ in batches(split, 5, seed=1, epochs=3)]
    assert len(got) == 6
    epochs = [np.concatenate(got[i : i + 2]) for i in range(0, 6, 2)]
    for order in epochs:
        np.testing.assert_array_equal(np.sort(order), np.arange(10))
    assert not np.array_equal(epochs[0], epochs[1])  # a fresh permutation per epoch


def test_batches_without_shuffle_keep_order_and_drop_last_false_keeps_tail():
    split = _indexed_split(7)
    got = [_indices(x) for x, _ in batches(split, 3, shuffle=False, drop_last=False)]
    assert [g.tolist() for g in got] == [[0, 1, 2], [3, 4, 5], [6]]


def test_batches_yield_copies_labels_match_images():
    split = _indexed_split(6)
    x, y = next(batches(split, 4))
    np.testing.assert_array_equal(y, _indices(x) % 3)
    x[...] = -1.0
    assert split.images.min() == 0.0


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"batch_size": 2.0}, "batch_size must be an int"),
        ({"batch_size": 9}, "batch_size 9 > 8 items"),
        ({"batch_size": 2, "epochs": 0}, "epochs must be >= 1"),
        ({"batch_size": 2, "seed": -1}, "seed must be >= 0"),
    ],
)
def test_batches_bad_argument_raises_at_call(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        batches(_indexed_split(8), **kwargs)  # no next(): checked eagerly


def test_take_batches_cycles_epochs():
    split = _indexed_split(10)
    got = take_batches(split, 4, 5, seed=2)
    ref = list(batches(split, 4, seed=2, epochs=3))[:5]  # 2 full batches per epoch
    assert len(got) == 5
    for (x, y), (x_ref, y_ref) in zip(got, ref):
        np.testing.assert_array_equal(x, x_ref)
        np.testing.assert_array_equal(y, y_ref)
    assert take_batches(split, 4, 0) == []


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    batch_size=st.integers(1, 12),
    epochs=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    steps=st.integers(0, 15),
)
def test_batches_and_take_batches_invariants(n, batch_size, epochs, seed, shuffle, drop_last,
                                             steps):
    split = _indexed_split(n)
    if drop_last and batch_size > n:
        with pytest.raises(ValueError):
            batches(split, batch_size, drop_last=True)
        return
    got = list(batches(split, batch_size, seed=seed, epochs=epochs, shuffle=shuffle,
                       drop_last=drop_last))
    per_epoch = n // batch_size if drop_last else -(-n // batch_size)
    assert len(got) == per_epoch * epochs
    for e in range(epochs):
        order = np.concatenate([_indices(x) for x, _ in got[e * per_epoch : (e + 1) * per_epoch]])
        assert len(np.unique(order)) == len(order)  # no index twice in an epoch
        assert len(order) == (n - n % batch_size if drop_last else n)
        if not shuffle:
            np.testing.assert_array_equal(order, np.arange(len(order)))
    for x, y in got:
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert len(x) == len(y) and 1 <= len(x) <= batch_size
        assert len(x) == batch_size or (not drop_last)
        np.testing.assert_array_equal(y, _indices(x) % 3)

    if batch_size <= n:
        taken = take_batches(split, batch_size, steps, seed=seed, shuffle=shuffle)
        assert len(taken) == steps
        assert all(len(x) == batch_size for x, _ in taken)
        full_epochs = -(-steps // (n // batch_size)) if steps else 1
        ref = list(batches(split, batch_size, seed=seed, epochs=full_epochs, shuffle=shuffle))
        for (x, _), (x_ref, _) in zip(taken, ref[:steps], strict=True):
            np.testing.assert_array_equal(x, x_ref)


# --------------------------------------------------------------------------- #
# layouts
# --------------------------------------------------------------------------- #
def test_nhwc_nchw_round_trip_exact_contiguous_copies():
    x = synthetic(n=4, size=5).images
    y = nhwc_to_nchw(x)
    assert y.shape == (4, 3, 5, 5) and y.dtype == np.float32 and y.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(y[:, 1], x[..., 1])
    back = nchw_to_nhwc(y)
    assert back.flags["C_CONTIGUOUS"] and back.tobytes() == x.tobytes()
    assert not np.shares_memory(back, y) and not np.shares_memory(y, x)


@pytest.mark.parametrize("convert", [nhwc_to_nchw, nchw_to_nhwc])
def test_layout_conversion_rejects_rank_3(convert):
    with pytest.raises(ValueError, match="rank-4"):
        convert(np.zeros((2, 3, 3), np.float32))


# --------------------------------------------------------------------------- #
# synthetic
# --------------------------------------------------------------------------- #
def test_synthetic_deterministic_balanced_and_shift_moves_mean():
    a, b = synthetic(seed=5), synthetic(seed=5)
    assert a.images.tobytes() == b.images.tobytes() and np.array_equal(a.labels, b.labels)
    assert a.images.shape == (64, 16, 16, 3) and a.num_classes == 3
    assert np.bincount(a.labels).tolist() == [22, 21, 21]
    shifted = synthetic(seed=5, shift=1.0)
    np.testing.assert_allclose(channel_stats(shifted.images)[0] - channel_stats(a.images)[0], 1.0,
                               atol=SAME_FRAMEWORK_ATOL)


def test_synthetic_classes_are_separable():
    """The class signal is learnable: nearest class mean classifies the training set."""
    split = synthetic(n=90, size=8, num_classes=3)
    flat = split.images.reshape(len(split), -1)
    means = np.stack([flat[split.labels == c].mean(axis=0) for c in range(3)])
    dist = ((flat[:, None, :] - means[None]) ** 2).sum(axis=-1)
    assert (dist.argmin(axis=1) == split.labels).mean() == 1.0


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #
GOOD = np.zeros((2, 4, 4, 3), np.float32)


@pytest.mark.parametrize(
    "x, needle",
    [
        (GOOD.tolist(), "images must be a numpy array, got list"),
        (GOOD[0], "images must have rank 4"),
        (np.zeros((2, 3, 4, 4), np.float32), "looks like NCHW"),
        (np.zeros((2, 4, 4, 1), np.float32), "3 channels last, got shape (2, 4, 4, 1)"),
        (GOOD.astype(np.float64), "images must be float32, got float64"),
        (np.where(np.arange(96).reshape(GOOD.shape) == 7, np.nan, GOOD).astype(np.float32),
         "1 non-finite values (first nan at index (0, 0, 2, 1))"),
    ],
)
def test_validate_images_bad_input_names_problem(x, needle):
    with pytest.raises(ValueError) as info:
        validate_images(x, "target/train")
    assert str(info.value).startswith("target/train: ")
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "y, needle",
    [
        ([0, 1], "labels must be a numpy array, got list"),
        (np.zeros((2, 1), np.int64), "labels must have rank 1"),
        (np.zeros(2, np.float32), "labels must be integers, got float32"),
        (np.zeros(2, bool), "labels must be integers, got bool"),
        (np.array([0, 5, 1]), "labels must be in [0, 5), got 5 at index 1"),
        (np.array([0, -1]), "got -1 at index 1"),
    ],
)
def test_validate_labels_bad_input_names_value(y, needle):
    with pytest.raises(ValueError) as info:
        validate_labels(y, 5, "source/test")
    assert str(info.value).startswith("source/test: ")
    assert needle in str(info.value)


def test_validate_returns_input_unchanged():
    y = np.array([0, 4])
    assert validate_images(GOOD, "w") is GOOD and validate_labels(y, 5, "w") is y


@pytest.mark.parametrize(
    "images, labels, num_classes, needle",
    [
        (GOOD, np.zeros(3, np.int64), 2, "same length, got 2 images and 3 labels"),
        (GOOD, np.zeros(2, np.int32), 2, "labels must be int64, got int32"),
        (GOOD, np.array([0, 2]), 2, "got 2 at index 1"),
        (GOOD[:0], np.zeros(0, np.int64), 2, "split is empty"),
        (GOOD, np.zeros(2, np.int64), 0, "num_classes must be >= 1"),
    ],
)
def test_split_rejects_bad_fields(images, labels, num_classes, needle):
    with pytest.raises(ValueError) as info:
        Split(images, labels, num_classes, "my/split")
    assert str(info.value).startswith("my/split: ") and needle in str(info.value)


def test_digits_cache_is_read_only():
    grey, digits = data._digits()
    assert not grey.flags.writeable and not digits.flags.writeable


def test_take_batch_indices_match_take_batches():
    split = data.load_domains().target_train
    indices = data.take_batch_indices(len(split), 32, 50, seed=3)
    pairs = data.take_batches(split, 32, 50, seed=3)
    assert len(indices) == len(pairs) == 50
    for idx, (x, y) in zip(indices, pairs):
        assert np.array_equal(split.images[idx], x) and np.array_equal(split.labels[idx], y)
    # the same order as batches() over two epochs (drop_last)
    per_epoch = len(split) // 32
    flat = list(data.batches(split, 32, seed=3, epochs=3))[:50]
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(flat, pairs)) and per_epoch < 50
