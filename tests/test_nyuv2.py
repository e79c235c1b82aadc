"""NYUv2 loader on a generated fixture in the MTAN layout (no real data here)."""

import numpy as np
import pytest

from mtl_utils.data.nyuv2 import NYUV2_SIZE, load_nyuv2, save_nyuv2_layout


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
