"""Metrics against scikit-learn and closed forms; Δm against the Nash-MTL table."""

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import jaccard_score

from mtl_utils.metrics import (
    TaskMetrics,
    classification_metrics,
    confusion_matrix,
    delta_m,
    depth_metrics,
    normal_metrics,
    segmentation_metrics,
)
from mtl_utils.tasks import Task


@pytest.fixture
def labels():
    rng = np.random.default_rng(0)
    target = rng.integers(-1, 5, size=(3, 16, 16))
    pred = np.where(
        rng.random(target.shape) < 0.6, target, rng.integers(0, 5, target.shape)
    )
    return target, np.clip(pred, 0, 4)


def test_confusion_matrix_matches_scikit_learn(labels):
    target, pred = labels
    keep = target != -1
    ref = sk_confusion_matrix(target[keep], pred[keep], labels=range(5))
    np.testing.assert_array_equal(confusion_matrix(target, pred, 5), ref)


def test_miou_and_pixel_accuracy_match_scikit_learn(labels):
    target, pred = labels
    keep = target != -1
    got = segmentation_metrics(target, pred, 5)
    ref_iou = jaccard_score(target[keep], pred[keep], average="macro", labels=range(5))
    assert got["miou"] == pytest.approx(ref_iou)
    assert got["pixel_acc"] == pytest.approx((target[keep] == pred[keep]).mean())


def test_miou_skips_classes_absent_from_target_and_prediction():
    target = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1]])
    # class 0: IoU 1/2, class 1: IoU 2/3; classes 2..4 absent from both
    assert segmentation_metrics(target, pred, 5)["miou"] == pytest.approx(
        (0.5 + 2 / 3) / 2
    )


def test_segmentation_accepts_logits(labels):
    target, pred = labels
    logits = np.eye(5)[pred]
    assert segmentation_metrics(target, logits, 5) == segmentation_metrics(
        target, pred, 5
    )


def test_depth_errors_use_valid_pixels_only():
    target = np.array([[[[2.0], [0.0]], [[4.0], [1.0]]]])
    pred = np.array([[[[1.0], [9.0]], [[5.0], [1.5]]]])
    got = depth_metrics(target, pred)
    assert got["abs_err"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert got["rel_err"] == pytest.approx((0.5 + 0.25 + 0.5) / 3)


def test_normal_angles_closed_form():
    angles = np.radians([0.0, 10.0, 20.0, 45.0, 90.0])
    target = np.tile([0.0, 0.0, 1.0], (6, 1))
    pred = (
        np.stack([np.sin(angles), np.zeros(5), np.cos(angles)], -1) * 3.0
    )  # unnormalised
    target[5] = 0.0  # invalid pixel
    pred = np.concatenate([pred, [[1.0, 0.0, 0.0]]])
    got = normal_metrics(target[None], pred[None])
    assert got["mean"] == pytest.approx(33.0)
    assert got["median"] == pytest.approx(20.0)
    assert got["within_11.25"] == pytest.approx(40.0)
    assert got["within_22.5"] == pytest.approx(60.0)
    assert got["within_30"] == pytest.approx(60.0)


def test_classification_accuracy_ignores_missing_labels():
    got = classification_metrics(np.array([1, 2, -1, 0]), np.array([1, 0, 3, 0]))
    assert got["accuracy"] == pytest.approx(2 / 3)


def test_accumulated_metrics_equal_metrics_on_the_whole_set(labels):
    target, pred = labels
    acc = TaskMetrics(Task("segmentation", "segmentation", 5))
    for i in range(3):
        acc.update(target[i : i + 1], pred[i : i + 1])
    assert acc.result() == segmentation_metrics(target, pred, 5)


# Navon et al. (2022), Table 2 (NYUv2, MTAN backbone): STL baseline and LS (equal
# weighting) rows; the table reports Δm% = 5.59 for LS.
NYU_STL = {
    "segmentation": {"miou": 38.30, "pixel_acc": 63.76},
    "depth": {"abs_err": 0.6754, "rel_err": 0.2780},
    "normal": {
        "mean": 25.01,
        "median": 19.21,
        "within_11.25": 30.14,
        "within_22.5": 57.20,
        "within_30": 69.15,
    },
}
NYU_EW = {
    "segmentation": {"miou": 39.29, "pixel_acc": 65.33},
    "depth": {"abs_err": 0.5493, "rel_err": 0.2263},
    "normal": {
        "mean": 28.15,
        "median": 23.96,
        "within_11.25": 22.09,
        "within_22.5": 47.50,
        "within_30": 61.08,
    },
}


def test_delta_m_reproduces_the_published_nyuv2_value():
    assert round(delta_m(NYU_EW, NYU_STL), 2) == 5.59


def test_delta_m_improvement_convention_averages_tasks():
    seg = -np.mean([(39.29 - 38.30) / 38.30, (65.33 - 63.76) / 63.76])
    dep = np.mean([(0.5493 - 0.6754) / 0.6754, (0.2263 - 0.2780) / 0.2780])
    nor = np.mean(
        [
            (28.15 - 25.01) / 25.01,
            (23.96 - 19.21) / 19.21,
            -(22.09 - 30.14) / 30.14,
            -(47.50 - 57.20) / 57.20,
            -(61.08 - 69.15) / 69.15,
        ]
    )
    expected = -100 * np.mean([seg, dep, nor])
    assert delta_m(NYU_EW, NYU_STL, convention="improvement") == pytest.approx(expected)


def test_delta_m_of_the_baseline_itself_is_zero():
    assert delta_m(NYU_STL, NYU_STL) == 0.0


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match=r"target has shape \(2, 4\) but prediction"):
        confusion_matrix(np.zeros((2, 4), int), np.zeros((2, 5), int), 3)
    with pytest.raises(ValueError, match="depth: target has shape"):
        depth_metrics(np.ones((1, 4, 4, 1)), np.ones((1, 4, 4)))
    with pytest.raises(ValueError, match="normal: target has shape"):
        normal_metrics(np.ones((1, 4, 4, 3)), np.ones((1, 4, 3, 3)))
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        confusion_matrix(np.array([0, 5]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="expected the same tasks"):
        delta_m({"depth": {"abs_err": 1.0}}, {"normal": {"mean": 1.0}})


def test_constant_baselines_equal_their_closed_forms():
    from mtl_utils.metrics import constant_baselines
    from mtl_utils.tasks import scene_tasks

    rng = np.random.default_rng(0)
    tasks = scene_tasks(["segmentation", "depth", "normal"])
    seg = rng.choice(5, size=(6, 8, 8), p=[0.5, 0.2, 0.1, 0.1, 0.1])
    depth = rng.uniform(1, 5, size=(6, 8, 8, 1))
    depth[0, 0, 0] = 0.0  # a missing label: left out of the mean and the error
    normal = rng.normal(size=(6, 8, 8, 3)) + [0.0, 0.0, 2.0]
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    train = {"segmentation": seg[:4], "depth": depth[:4], "normal": normal[:4]}
    test = {"segmentation": seg[4:], "depth": depth[4:], "normal": normal[4:]}
    got = constant_baselines(train, test, tasks)

    majority = np.bincount(seg[:4].ravel()).argmax()
    present = np.unique(seg[4:])
    share = (seg[4:] == majority).mean()
    assert got["segmentation"]["miou"] == pytest.approx(share / len(present))
    assert got["segmentation"]["pixel_acc"] == pytest.approx(share)
    mean_depth = depth[:4][depth[:4] > 0].mean()
    assert got["depth"]["abs_err"] == pytest.approx(
        np.abs(depth[4:] - mean_depth).mean()
    )
    m = normal[:4].reshape(-1, 3).mean(0)
    cosine = normal[4:].reshape(-1, 3) @ (m / np.linalg.norm(m))
    angles = np.degrees(np.arccos(np.clip(cosine, -1, 1)))
    assert got["normal"]["mean"] == pytest.approx(angles.mean())
    assert got["normal"]["median"] == pytest.approx(np.median(angles))
    with pytest.raises(ValueError, match="no labels"):
        constant_baselines({"depth": depth}, test, tasks)
