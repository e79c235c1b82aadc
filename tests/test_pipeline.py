"""The tf.data pipeline against the arrays it is built from."""

import numpy as np
import pytest

from mtl_utils.data.pipeline import make_dataset
from mtl_utils.data.scenes import render_scenes
from mtl_utils.tasks import scene_tasks


@pytest.fixture(scope="module")
def arrays():
    return render_scenes(10, size=16, seed=1)


def test_batches_hold_the_arrays_in_order(arrays):
    ds = make_dataset(arrays, scene_tasks(), batch_size=4)
    batches = [(x.numpy(), {k: v.numpy() for k, v in y.items()}) for x, y in ds]
    images = [x for x, _ in batches]
    targets = [y for _, y in batches]
    assert [len(x) for x in images] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(images), arrays["image"])
    for name in ("segmentation", "depth", "normal", "count"):
        np.testing.assert_array_equal(
            np.concatenate([t[name] for t in targets]), arrays[name]
        )


def test_shuffle_is_a_seeded_permutation(arrays):
    def order(seed):
        ds = make_dataset(arrays, ["count"], batch_size=10, shuffle=True, seed=seed)
        return next(iter(ds))[0].numpy()

    a, b = order(3), order(3)
    np.testing.assert_array_equal(a, b)
    # the shuffled images are the same set of images
    key = lambda x: x.reshape(len(x), -1).sum(1)  # noqa: E731
    np.testing.assert_allclose(
        np.sort(key(a)), np.sort(key(arrays["image"])), rtol=1e-6
    )


def test_augment_receives_distinct_seeds_per_sample(arrays):
    import tensorflow as tf

    def add_seed(example, seed):
        example = dict(example)
        example["count"] = tf.cast(seed[0] % 1000, tf.int32)
        return example

    ds = make_dataset(arrays, ["count"], batch_size=10, augment=add_seed, seed=0)
    first = next(iter(ds))[1]["count"].numpy()
    again = next(iter(make_dataset(arrays, ["count"], batch_size=10, augment=add_seed)))
    assert len(set(first.tolist())) > 5
    np.testing.assert_array_equal(first, again[1]["count"].numpy())


def test_unknown_task_name_lists_the_known_ones(arrays):
    with pytest.raises(
        ValueError, match=r"unknown task name\(s\) \['dept'\]; known tasks"
    ):
        make_dataset(arrays, ["dept"])


def test_bad_arrays_give_clear_errors(arrays):
    with pytest.raises(ValueError, match="no 'image' entry"):
        make_dataset({"depth": arrays["depth"]}, ["depth"])
    bad = dict(arrays, depth=arrays["depth"][:3])
    with pytest.raises(ValueError, match=r"target 'depth' has shape \(3, 16, 16, 1\)"):
        make_dataset(bad, ["depth"])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        make_dataset(arrays, ["depth"], batch_size=0)
