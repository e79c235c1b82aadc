"""NYUv2 loader on a generated fixture in the MTAN layout (no real data here)."""

import dataclasses
import re

import keras
import numpy as np
import pytest
from test_segnet import REFERENCE_MTAN

from mtl_utils.cost import count_params
from mtl_utils.data.nyuv2 import (
    MTAN_NYUV2,
    NYUV2_SIZE,
    load_nyuv2,
    save_nyuv2_layout,
)
from mtl_utils.tasks import Task


@pytest.fixture
def fixture_root(tmp_path):
    """Three samples with -1 labels and invalid (0) depth and normals, MTAN dtypes."""
    rng = np.random.default_rng(0)
    h, w = NYUV2_SIZE
    label = rng.integers(-1, 13, size=(3, h, w)).astype(np.float32)
    depth = rng.uniform(0.5, 10, size=(3, h, w, 1)).astype(np.float32)
    depth[:, :10] = 0.0  # no measurement
    normal = rng.normal(size=(3, h, w, 3)).astype(np.float32)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    normal[:, :, :7] = 0.0  # invalid
    arrays = {
        "image": rng.random((3, h, w, 3), dtype=np.float32),
        "segmentation": label,
        "depth": depth,
        "normal": normal,
    }
    save_nyuv2_layout(arrays, tmp_path, "val")
    return tmp_path, arrays


def test_loads_the_mtan_layout_into_the_scenes_schema(fixture_root):
    root, ref = fixture_root
    got = load_nyuv2(root, "val")
    assert set(got) == {"image", "segmentation", "depth", "normal"}
    assert got["segmentation"].dtype == np.int32 and got["image"].dtype == np.float32
    for key in got:
        np.testing.assert_array_equal(got[key], ref[key])
    assert (got["segmentation"] == -1).any() and (got["depth"] == 0).any()
    assert (np.linalg.norm(got["normal"], axis=-1) == 0).any()
    assert len(load_nyuv2(root, "val", max_samples=2)["image"]) == 2


def test_files_are_read_in_numeric_order(fixture_root):
    root, ref = fixture_root
    # 10.npy must come after 2.npy (a string sort would put it first)
    for folder, key in (("image", "image"), ("label", "segmentation")):
        np.save(root / "val" / folder / "10.npy", ref[key][0].astype(np.float32))
    np.save(root / "val" / "depth" / "10.npy", ref["depth"][0])
    np.save(root / "val" / "normal" / "10.npy", ref["normal"][0])
    got = load_nyuv2(root, "val")
    assert len(got["image"]) == 4
    np.testing.assert_array_equal(got["image"][3], ref["image"][0])


def test_missing_folder_says_where_the_data_goes(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"train/image does not exist: download"
    ):
        load_nyuv2(tmp_path, "train")


def test_wrong_shape_names_the_file(fixture_root):
    root, _ = fixture_root
    np.save(root / "val" / "depth" / "1.npy", np.ones((288, 380, 1), np.float32))
    with pytest.raises(
        ValueError, match=r"depth/1\.npy: shape \(288, 380, 1\); expected"
    ):
        load_nyuv2(root, "val")


def test_pickled_object_array_is_refused(fixture_root):
    root, _ = fixture_root
    bad = np.empty(2, dtype=object)
    bad[:] = [{"a": 1}, None]
    np.save(root / "val" / "normal" / "0.npy", bad, allow_pickle=True)
    with pytest.raises(
        ValueError, match=r"normal/0\.npy: cannot be read without pickle"
    ):
        load_nyuv2(root, "val")


def test_non_numeric_dtype_is_refused(fixture_root):
    root, _ = fixture_root
    np.save(root / "val" / "label" / "2.npy", np.full((288, 384), "x"))
    with pytest.raises(
        ValueError, match=r"label/2\.npy: dtype <U1; expected a numeric"
    ):
        load_nyuv2(root, "val")


def test_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="unknown split 'test'"):
        load_nyuv2(tmp_path, "test")


# The NYUv2 setup of MTAN: Liu, Johns and Davison, "End-to-End Multi-Task Learning
# with Attention", CVPR 2019, as the authors' code runs it (github.com/lorenmt/mtan,
# im2im_pred/model_segnet_mtan.py: optim.Adam(lr=1e-4), StepLR(step_size=100,
# gamma=0.5), batch_size = 2, 200 epochs, --weight default 'equal', --temp 2.0,
# class_nb = 13, BatchNorm2d after every conv; the paper's 288x384 NYUv2; the test
# loader is the only evaluation split, averaged over the last 10 epochs per the
# repository's README).
PAPER = {
    "input_size": (288, 384),
    "num_classes": 13,
    "tasks": ("segmentation", "depth", "normal"),
    "architecture": "segnet_mtan",
    "width": 1.0,
    "batch_norm": True,
    "optimizer": "adam",
    "learning_rate": 1e-4,
    "epochs": 200,
    "decay_every": 100,
    "decay_factor": 0.5,
    "batch_size": 2,
    "weighting": "equal",
    "dwa_temperature": 2.0,
    "num_val": 0,
    "report_last_epochs": 10,
}


def test_mtan_recipe_has_the_papers_settings():
    assert dataclasses.asdict(MTAN_NYUV2) == PAPER
    assert MTAN_NYUV2.differences() == {}


def test_recipe_learning_rate_follows_step_lr_every_step():
    """torch's StepLR(step_size=100, gamma=0.5) in closed form: epoch e runs at
    1e-4 * 0.5 ** (e // 100); the Keras schedule gives that to every step."""
    steps = 3
    schedule = MTAN_NYUV2.learning_rate_schedule(steps_per_epoch=steps)
    for epoch in (0, 1, 99, 100, 101, 199):
        expected = 1e-4 * 0.5 ** (epoch // 100)
        assert MTAN_NYUV2.learning_rate_at(epoch) == pytest.approx(expected)
        for step in (epoch * steps, epoch * steps + steps - 1):
            assert float(schedule(step)) == pytest.approx(expected, rel=1e-6)


def test_recipe_without_a_decay_in_its_epochs_has_a_constant_rate():
    short = dataclasses.replace(MTAN_NYUV2, epochs=2)
    assert short.learning_rate_schedule(steps_per_epoch=5) == pytest.approx(1e-4)


def test_recipe_differences_name_each_changed_setting_with_both_values():
    cpu = dataclasses.replace(MTAN_NYUV2, input_size=(96, 128), epochs=2, num_val=4)
    assert cpu.differences() == {
        "input_size": ((96, 128), (288, 384)),
        "epochs": (2, 200),
        "num_val": (4, 0),
    }


@pytest.mark.parametrize(
    "change, message",
    [
        ({"batch_size": 0}, "batch_size=0; expected a positive integer"),
        ({"learning_rate": -1.0}, "expected both > 0"),
        ({"decay_factor": 2.0}, "decay_factor=2.0"),
        ({"architecture": "vgg"}, "architecture='vgg'; expected one of"),
        ({"num_val": -1}, "num_val=-1"),
    ],
)
def test_recipe_rejects_bad_settings_naming_them(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        dataclasses.replace(MTAN_NYUV2, **change)


# The network and optimizer the recipe names. References: the parameter count of
# the reference SegNet-MTAN (lorenmt/mtan, measured with torch; see
# tests/test_segnet.py) and PyTorch's documented Adam defaults (torch.optim.Adam:
# betas=(0.9, 0.999), eps=1e-8), which the reference code runs with.
RECIPE_TASKS = [
    Task("segmentation", "segmentation", 13),
    Task("depth", "depth", 1),
    Task("normal", "normal", 3),
]


def test_recipe_builds_the_reference_segnet_mtan():
    model = MTAN_NYUV2.build_model(RECIPE_TASKS)
    assert count_params(model, trainable_only=True) == REFERENCE_MTAN
    assert sorted(model.output) == sorted(MTAN_NYUV2.tasks)
    assert tuple(model.input.shape[1:]) == (288, 384, 3)


def test_recipe_hard_sharing_follows_its_batch_norm_setting():
    small = {"input_size": (32, 32), "width": 0.0625, "architecture": "hard_sharing"}
    for batch_norm in (True, False):
        recipe = dataclasses.replace(MTAN_NYUV2, batch_norm=batch_norm, **small)
        model = recipe.build_model(RECIPE_TASKS)
        norms = [
            layer
            for layer in model._flatten_layers()
            if isinstance(layer, keras.layers.BatchNormalization)
        ]
        assert bool(norms) == batch_norm
        assert model.get_layer("encoder").get_layer("block5_conv3").filters == 32


def test_recipe_optimizer_is_adam_with_pytorchs_defaults_and_step_lr():
    optimizer = MTAN_NYUV2.make_optimizer(steps_per_epoch=4)
    assert isinstance(optimizer, keras.optimizers.Adam)
    assert (optimizer.beta_1, optimizer.beta_2, optimizer.epsilon) == (
        0.9,
        0.999,
        1e-8,
    )
    schedule = optimizer._learning_rate
    for step, expected in ((0, 1e-4), (399, 1e-4), (400, 5e-5), (799, 5e-5)):
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-6)
    sgd = dataclasses.replace(MTAN_NYUV2, optimizer="sgd", epochs=2)
    optimizer = sgd.make_optimizer(steps_per_epoch=4)
    assert isinstance(optimizer, keras.optimizers.SGD)
    assert float(optimizer.learning_rate) == pytest.approx(1e-4)


def test_recipe_refuses_a_network_it_cannot_build_naming_why():
    with pytest.raises(ValueError, match="batch_norm=False with architecture="):
        dataclasses.replace(MTAN_NYUV2, batch_norm=False)
    with pytest.raises(ValueError, match=r"expected the recipe's tasks"):
        MTAN_NYUV2.build_model(RECIPE_TASKS[:2])
    wrong = [Task("segmentation", "segmentation", 40), *RECIPE_TASKS[1:]]
    with pytest.raises(ValueError, match="has 40 classes; expected the recipe's"):
        MTAN_NYUV2.build_model(wrong)
