"""Joint augmentation against the renderer (exact oracles), Keras and NumPy.

The renderer produces the transformed view itself: a mirrored scene for a flip, a
camera with a longer focal length (and shifted principal point) for a crop-and-resize,
a rolled camera for an in-plane rotation. Augmented labels are compared with those
renders on *interior* pixels: pixels whose 3x3 neighbourhood sees one surface (same
class, same object, normals within 30 degrees), since at a boundary nearest-neighbour
resampling and a fresh render may legitimately pick different sides.

Stated tolerances (measured on the first 16 scenes of seed 5 at 64x64:
segmentation 100% equal, depth always within the bound, normals <= 2.5 deg, image
mean absolute error <= 0.009):

- segmentation and object ids: equal on every interior pixel;
- depth: within the depth spread of the 3x3 neighbourhood of the source pixel that
  nearest-neighbour resampling copied (the resampling error bound);
- normals: within 3 degrees; image: mean absolute error below 0.015.
"""

import dataclasses
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from mtl_utils import augment as A
from mtl_utils.data.pipeline import make_dataset
from mtl_utils.data.scenes import (
    CLASS_NAMES,
    render,
    render_batch,
    render_scenes,
    sample_scenes,
)

SIZE = 64
IDS = {"object_id": "segmentation"}


@pytest.fixture(scope="module")
def scenes():
    return sample_scenes(6, seed=5)


def render1(scene, size=SIZE):
    return {k: v[0] for k, v in render_batch([scene], size, object_ids=True).items()}


def numpy_dict(example):
    return {k: np.asarray(v) for k, v in example.items()}


def neighbours(x, r=1):
    """The (2r+1)^2 shifted copies of a (H, W, ...) map (edge-padded)."""
    h, w = x.shape[:2]
    pad = [(r, r), (r, r)] + [(0, 0)] * (x.ndim - 2)
    p = np.pad(x, pad, mode="edge")
    return [
        p[r + dy : r + dy + h, r + dx : r + dx + w]
        for dy in range(-r, r + 1)
        for dx in range(-r, r + 1)
    ]


def interior(render):
    """Pixels whose 3x3 neighbourhood sees one smooth surface of one object."""
    seg, oid, normal = render["segmentation"], render["object_id"], render["normal"]
    ok = np.ones(seg.shape, bool)
    for s, o, n in zip(
        neighbours(seg), neighbours(oid), neighbours(normal), strict=True
    ):
        ok &= (s == seg) & (o == oid) & ((n * normal).sum(-1) > np.cos(np.radians(30)))
    return ok


def depth_spread(depth):
    """Largest |depth difference| to a 3x3 neighbour: the nearest-resampling bound."""
    d = depth[..., 0]
    return np.max(np.abs(np.stack(neighbours(d)) - d), axis=0)[..., None]


def with_probes(render):
    """The render plus maps that travel with the labels (interior mask, bound)."""
    probes = {
        "inner": interior(render).astype(np.int32),
        "spread": depth_spread(render["depth"]),
    }
    kinds = {"object_id": "segmentation", "inner": "segmentation", "spread": "depth"}
    return {**render, **probes}, kinds


def angle_deg(a, b):
    return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1.0, 1.0)))


def zoomed_camera(camera, size, scale, offset):
    """The camera whose render IS the crop of ``size`` at ``offset`` zoomed by scale.

    From the pixel convention of scenes.py: output pixel centre ``I + 0.5`` sees the
    source point ``top + (I + 0.5) / s`` (pixels), so ``v = v' / s + dv`` with
    ``dv`` the crop centre's offset from the image centre in units of W/2. Rays
    ``(v - cy) / f = (v' - cy') / f'`` then give ``f' = s f`` and
    ``cy' = s (cy - dv)`` (the same for x).
    """
    h, w = size
    top = offset[0] * (h - h / scale)
    left = offset[1] * (w - w / scale)
    du = (left + w / (2 * scale) - w / 2) / (w / 2)
    dv = (top + h / (2 * scale) - h / 2) / (w / 2)
    return dataclasses.replace(
        camera,
        focal=camera.focal * scale,
        cx=scale * (camera.cx - du),
        cy=scale * (camera.cy - dv),
    )


def shrunk_world(scene, k):
    """The scene with every length divided by ``k`` about the camera centre."""
    cam = scene.camera
    objects = tuple(
        dataclasses.replace(o, x=o.x / k, z=o.z / k, size=tuple(v / k for v in o.size))
        for o in scene.objects
    )
    return dataclasses.replace(
        scene,
        camera=dataclasses.replace(cam, height=cam.height / k),
        wall_z=scene.wall_z / k,
        texture_freq=scene.texture_freq * k,
        texture_offset=scene.texture_offset / k,
        objects=objects,
    )


def moved_camera(scene, distance):
    """The camera moved ``distance`` forward along its optical axis.

    The renderer keeps the camera above the origin, so the world moves instead (the
    floor texture's phase along z cannot move with it; labels are unaffected).
    """
    cam, p = scene.camera, scene.camera.pitch
    dz = distance * np.cos(p)
    return dataclasses.replace(
        scene,
        camera=dataclasses.replace(cam, height=cam.height - distance * np.sin(p)),
        wall_z=scene.wall_z - dz,
        objects=tuple(dataclasses.replace(o, z=o.z - dz) for o in scene.objects),
    )


def assert_matches_render(aug, truth, depth_scale=1.0):
    """Augmented labels vs a render of the transformed view on interior pixels."""
    m = (aug["inner"] == 1) & interior(truth)
    assert m.mean() > 0.5, "too few interior pixels to compare"
    np.testing.assert_array_equal(aug["segmentation"][m], truth["segmentation"][m])
    np.testing.assert_array_equal(aug["object_id"][m], truth["object_id"][m])
    err = np.abs(aug["depth"][..., 0][m] - truth["depth"][..., 0][m])
    bound = aug["spread"][..., 0][m] / depth_scale + 1e-4
    assert np.all(err <= bound), f"depth error {err.max():.4f} over the bound"
    assert angle_deg(aug["normal"][m], truth["normal"][m]).max() < 3.0
    assert np.abs(aug["image"][m] - truth["image"][m]).mean() < 0.015


# ------------------------------------------------------------------ exact oracles
def test_hflip_of_a_render_equals_the_render_of_the_mirrored_scene(scenes):
    for scene in scenes:
        flipped = numpy_dict(A.hflip(render1(scene), kinds=IDS))
        mirror = render1(scene.mirrored())
        np.testing.assert_allclose(flipped["image"], mirror["image"], atol=1e-6)
        for key in ("segmentation", "depth", "object_id"):
            np.testing.assert_array_equal(flipped[key], mirror[key])
        np.testing.assert_array_equal(flipped["normal"], mirror["normal"])


def test_hflip_negates_normal_x_and_keeps_y_and_z(scenes):
    r = render1(scenes[0])
    flipped = numpy_dict(A.hflip(r, kinds=IDS))
    np.testing.assert_array_equal(flipped["normal"][:, ::-1, 0], -r["normal"][..., 0])
    np.testing.assert_array_equal(flipped["normal"][:, ::-1, 1:], r["normal"][..., 1:])


def test_hflip_twice_is_the_identity(scenes):
    r = render1(scenes[1])
    twice = numpy_dict(A.hflip(A.hflip(r, kinds=IDS), kinds=IDS))
    for key, value in r.items():
        np.testing.assert_array_equal(twice[key], value)


@pytest.mark.parametrize(
    "scale, offset", [(1.2, (0.3, 0.8)), (1.5, (0.5, 0.5)), (2.0, (1.0, 0.0))]
)
def test_scale_crop_is_the_render_of_a_camera_with_focal_times_scale(
    scenes, scale, offset
):
    """A crop-and-resize is exactly a focal-length zoom: the true depth is unchanged."""
    for scene in scenes:
        example, kinds = with_probes(render1(scene))
        aug = numpy_dict(
            A.scale_crop(example, scale, offset, depth_rule="zoom", kinds=kinds)
        )
        cam = zoomed_camera(scene.camera, (SIZE, SIZE), scale, offset)
        truth = render1(dataclasses.replace(scene, camera=cam))
        assert_matches_render(aug, truth)


def test_mtan_depth_rule_is_the_zoom_of_a_world_shrunk_by_the_scale(scenes):
    """MTAN divides depth by s: exactly the view of the world s times smaller, seen
    through the zoomed camera (the image is identical, every depth is divided by s)."""
    scale = 1.5
    for scene in scenes:
        zoom = dataclasses.replace(
            scene, camera=zoomed_camera(scene.camera, (SIZE, SIZE), scale, (0.5, 0.5))
        )
        truth, small = render1(zoom), render1(shrunk_world(zoom, scale))
        # the shrunk world looks the same and is s times closer (float32 rounding)
        np.testing.assert_allclose(small["image"], truth["image"], atol=1e-3)
        np.testing.assert_array_equal(small["segmentation"], truth["segmentation"])
        np.testing.assert_allclose(small["depth"] * scale, truth["depth"], rtol=1e-4)
        example, kinds = with_probes(render1(scene))
        aug = numpy_dict(A.scale_crop(example, scale, depth_rule="mtan", kinds=kinds))
        assert_matches_render(aug, small, depth_scale=scale)


def test_moved_camera_agrees_with_mtan_depth_only_at_the_reference_depth(scenes):
    """Moving the camera by d = Z (1 - 1/s) makes an object at depth Z look s times
    larger, and its depth Z/s is MTAN's label; the wall behind, at Z_w > Z, moves to
    Z_w - d > Z_w / s, so MTAN's rule is only an approximation of moving closer."""
    scale = 1.5
    for scene in scenes:
        r = render1(scene)
        oid = r["object_id"]
        ids, counts = np.unique(oid[oid >= 0], return_counts=True)
        ref = ids[np.argmax(counts)]
        z_ref = float(np.median(r["depth"][..., 0][oid == ref]))
        moved = render1(moved_camera(scene, z_ref * (1 - 1 / scale)))
        aug = numpy_dict(A.scale_crop(r, scale, depth_rule="mtan", kinds=IDS))
        on = (aug["object_id"] == ref) & (moved["object_id"] == ref)
        wall = (aug["segmentation"] == 1) & (moved["segmentation"] == 1)
        rel = np.abs(aug["depth"] / moved["depth"] - 1)[..., 0]
        assert np.median(rel[on]) < 0.03
        assert np.median(rel[wall]) > 0.1
        # and the object's apparent size agrees with the zoom within 10 %
        area_aug = (aug["object_id"] == ref).sum()
        area_moved = (moved["object_id"] == ref).sum()
        assert abs(area_moved / area_aug - 1) < 0.1


@pytest.mark.parametrize("angle", [0.15, -0.3])
def test_rotate_is_the_render_of_the_camera_rolled_by_the_angle(scenes, angle):
    for scene in scenes:
        example, kinds = with_probes(render1(scene))
        aug = numpy_dict(A.rotate(example, angle, kinds=kinds))
        cam = dataclasses.replace(scene.camera, roll=scene.camera.roll + angle)
        truth = render1(dataclasses.replace(scene, camera=cam))
        assert_matches_render(aug, truth)


def test_rotate_with_the_opposite_sign_disagrees_with_the_rolled_render(scenes):
    """Pins the sign convention: rotate(+a) is roll +a, and rotate(-a) is not."""
    scene, angle = scenes[0], 0.3
    cam = dataclasses.replace(scene.camera, roll=scene.camera.roll + angle)
    truth = render1(dataclasses.replace(scene, camera=cam))
    wrong = numpy_dict(A.rotate(render1(scene), -angle, kinds=IDS))
    m = interior(truth) & (wrong["segmentation"] >= 0)
    assert (wrong["segmentation"][m] == truth["segmentation"][m]).mean() < 0.95


# ---------------------------------------------------------- library references
def test_scale_crop_of_an_integer_crop_equals_keras_resize(scenes):
    """Zooming a 32x32 crop at (8, 24) by 2 is keras.ops.image.resize of the crop;
    at the crop's border our samples read the real pixels just outside it, where
    resizing the bare crop would clamp to its edge, so the reference resizes the
    crop with a one-pixel margin (34 -> 68) and drops that margin (2 pixels)."""
    r = render1(scenes[2])
    scale, top, left = 2.0, 8, 24  # offsets as fractions of the free range 64 - 32
    aug = numpy_dict(A.scale_crop(r, scale, (top / 32, left / 32), kinds=IDS))
    margin = r["image"][top - 1 : top + 33, left - 1 : left + 33]
    image = keras.ops.image.resize(margin, (68, 68), interpolation="bilinear")
    np.testing.assert_allclose(aug["image"], np.asarray(image)[2:-2, 2:-2], atol=1e-5)
    crop = {k: v[top : top + 32, left : left + 32] for k, v in r.items() if v.ndim}
    size = (SIZE, SIZE)
    for key in ("segmentation", "object_id"):
        ref = keras.ops.image.resize(crop[key][..., None], size, "nearest")
        np.testing.assert_array_equal(aug[key], np.asarray(ref)[..., 0])
    depth = keras.ops.image.resize(crop["depth"], size, interpolation="nearest")
    np.testing.assert_allclose(aug["depth"], np.asarray(depth) / scale, rtol=1e-6)


def nearest_zoom_reference(x, scale, offset):
    """NumPy loop: output pixel i copies the source pixel containing the point
    top + (i + 0.5) / scale (pixel-edge units), clamped to the image."""
    h, w = x.shape[:2]
    top = offset[0] * (h - h / scale)
    left = offset[1] * (w - w / scale)
    out = np.empty_like(x)
    for i in range(h):
        si = min(int(np.floor(top + (i + 0.5) / scale)), h - 1)
        for j in range(w):
            sj = min(int(np.floor(left + (j + 0.5) / scale)), w - 1)
            out[i, j] = x[si, sj]
    return out


@pytest.mark.parametrize("scale, offset", [(1.2, (0.1, 0.9)), (1.5, (0.7, 0.2))])
def test_depth_after_scale_crop_equals_nearest_resampled_depth_over_scale(
    scenes, scale, offset
):
    r = render1(scenes[3])
    aug = numpy_dict(A.scale_crop(r, scale, offset, kinds=IDS))
    ref = nearest_zoom_reference(r["depth"], scale, offset)
    np.testing.assert_allclose(aug["depth"], ref / scale, rtol=1e-6)
    np.testing.assert_array_equal(
        aug["segmentation"], nearest_zoom_reference(r["segmentation"], scale, offset)
    )


def test_rotate_image_and_labels_equal_keras_affine_transform(scenes):
    r = render1(scenes[4])
    angle = 0.25
    c, s = np.cos(angle), np.sin(angle)
    x0 = y0 = (SIZE - 1) / 2
    # output pixel (x, y) reads input (c dx - s dy, s dx + c dy) + centre
    transform = np.array(
        [c, -s, x0 - c * x0 + s * y0, s, c, y0 - s * x0 - c * y0, 0, 0], "float32"
    )
    aug = numpy_dict(A.rotate(r, angle, kinds=IDS))
    image = keras.ops.image.affine_transform(
        r["image"], transform, "bilinear", fill_mode="constant", fill_value=0
    )
    np.testing.assert_allclose(aug["image"], np.asarray(image), atol=1e-5)
    seg = keras.ops.image.affine_transform(
        r["segmentation"][..., None].astype("float32"),
        transform,
        "nearest",
        fill_mode="constant",
        fill_value=-1,
    )
    np.testing.assert_array_equal(aug["segmentation"], np.asarray(seg)[..., 0])


def test_rotate_marks_exactly_the_pixels_from_outside_the_image_invalid(scenes):
    r = render1(scenes[0])
    angle = 0.4
    aug = numpy_dict(A.rotate(r, angle, kinds=IDS))
    c, s = np.cos(angle), np.sin(angle)
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float64)
    centre = (SIZE - 1) / 2
    xs = c * (xx - centre) - s * (yy - centre) + centre
    ys = s * (xx - centre) + c * (yy - centre) + centre
    outside = (np.round(xs) < 0) | (np.round(xs) > SIZE - 1)
    outside |= (np.round(ys) < 0) | (np.round(ys) > SIZE - 1)
    assert outside.mean() > 0.05
    np.testing.assert_array_equal(aug["segmentation"] == -1, outside)
    assert np.all(aug["object_id"][outside] == -1)
    np.testing.assert_array_equal(aug["depth"][..., 0] == 0, outside)
    np.testing.assert_array_equal(np.all(aug["normal"] == 0, -1), outside)


# ------------------------------------------------------------------------- count
def ids_in(ids):
    return set(np.unique(ids[ids >= 0]).tolist())


def clearly_visible(ids):
    """Objects with a pixel whose 3x3 neighbourhood sees that object only."""
    inner = np.ones(ids.shape, bool)
    for n in neighbours(ids):
        inner &= n == ids
    return ids_in(np.where(inner, ids, -1))


def check_count_against_renders(pairs):
    """``count`` of each augmented example vs the render of the transformed view.

    ``pairs``: (augmented example, render of the view). The count must be the
    number of objects in the moved instance map (what the moved segmentation
    shows), and the objects the two see may differ only by slivers: an object seen
    by one view only has no interior pixel there. Returns the share of equal counts.
    """
    equal = []
    for aug, truth in pairs:
        got, want = ids_in(aug["object_id"]), ids_in(truth["object_id"])
        assert aug["count"] == len(got)
        assert clearly_visible(truth["object_id"]) <= got
        assert clearly_visible(aug["object_id"]) <= want
        equal.append(int(aug["count"]) == int(truth["count"]))
    return float(np.mean(equal))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scale", [1.2, 1.5, 2.0])
def test_count_after_scale_crop_is_the_count_of_the_zoomed_camera(seed, scale):
    """Renderer oracle: the crop is the camera with focal * s, which sees ``count``
    objects; passing the count through unchanged is wrong in many scenes."""
    scenes = sample_scenes(40, seed=seed)
    offsets = np.random.default_rng(seed).uniform(size=(len(scenes), 2))
    source = render_batch(scenes, SIZE, object_ids=True)
    views = render_batch(
        [
            dataclasses.replace(
                sc, camera=zoomed_camera(sc.camera, (SIZE, SIZE), scale, tuple(o))
            )
            for sc, o in zip(scenes, offsets, strict=True)
        ],
        SIZE,
        object_ids=True,
    )
    pairs = [
        (
            numpy_dict(
                A.scale_crop({k: v[i] for k, v in source.items()}, scale, tuple(o))
            ),
            {k: v[i] for k, v in views.items()},
        )
        for i, o in enumerate(offsets)
    ]
    assert check_count_against_renders(pairs) >= 0.9
    if scale >= 1.5:  # the bug this guards against: the count passed through
        assert np.mean(source["count"] != views["count"]) > 0.05


@pytest.mark.parametrize("angle", [0.3, -0.5])
def test_count_after_rotate_is_the_count_of_the_rolled_camera(angle):
    scenes = sample_scenes(40, seed=3)
    source = render_batch(scenes, SIZE, object_ids=True)
    views = render_batch(
        [
            dataclasses.replace(
                sc, camera=dataclasses.replace(sc.camera, roll=sc.camera.roll + angle)
            )
            for sc in scenes
        ],
        SIZE,
        object_ids=True,
    )
    pairs = [
        (
            numpy_dict(A.rotate({k: v[i] for k, v in source.items()}, angle)),
            {k: v[i] for k, v in views.items()},
        )
        for i in range(len(scenes))
    ]
    assert check_count_against_renders(pairs) >= 0.9


def test_count_without_an_instance_map_is_marked_missing_after_a_zoom(scenes):
    """No object ids: a crop or a rotation cannot recount, so the label is -1."""
    r = render1(scenes[0])
    del r["object_id"]
    assert r["count"] > 0
    assert A.scale_crop(r, 1.2)["count"] == -1
    assert A.rotate(r, 0.1)["count"] == -1
    assert A.scale_crop(r, 1.0)["count"] == r["count"]  # no zoom, nothing cut
    assert A.rotate(r, 0.0)["count"] == r["count"]
    assert A.hflip(r)["count"] == r["count"]
    missing = {**r, "count": np.int32(-1)}
    with_ids = {**render1(scenes[0]), "count": np.int32(-1)}
    for ex in (missing, with_ids):  # a missing count stays missing
        assert A.scale_crop(ex, 1.5)["count"] == -1


def test_make_dataset_passes_the_instance_map_to_augment_for_the_count():
    """The batches' count is the number of objects left in the zoomed instance map
    (a copy of the map, yielded as the target "ids", moves the same way)."""
    arrays = render_scenes(24, size=32, seed=4, object_ids=True)
    arrays["ids"] = arrays["object_id"].copy()
    fn = A.make_augment(
        scales=(2.0,), color=False, flip_probability=0.0, kinds={"ids": "segmentation"}
    )
    ds = make_dataset(arrays, ["count", "ids"], 24, augment=fn, seed=3)
    _, targets = collect(ds)
    assert sorted(targets) == ["count", "ids"]
    left = [len(ids_in(ids)) for ids in targets["ids"]]
    np.testing.assert_array_equal(targets["count"], left)
    assert np.any(targets["count"] != arrays["count"])


def test_bilinear_resize_without_renormalising_shortens_normals(scenes):
    """Why scale_crop renormalises: resizing normals as an image (as MTAN's code
    does) blends directions at creases into vectors shorter than 1."""
    r = render1(scenes[1])
    crop = r["normal"][16:48, 16:48]
    resized = np.asarray(keras.ops.image.resize(crop, (SIZE, SIZE)))
    assert np.linalg.norm(resized, axis=-1).min() < 0.95
    ours = numpy_dict(A.scale_crop(r, 2.0, kinds=IDS))["normal"]
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)


# --------------------------------------------------------------------- properties
TRANSFORMS = {
    "hflip": lambda ex, k: A.hflip(ex, kinds=k),
    "scale_crop": lambda ex, k: A.scale_crop(ex, 1.37, (0.2, 0.6), kinds=k),
    "rotate": lambda ex, k: A.rotate(ex, -0.2, kinds=k),
    "photometric": lambda ex, k: A.photometric(ex, [4, 2]),
    "augment": lambda ex, k: A.augment(ex, [7, 1], max_angle=0.3, kinds=k),
}


def with_holes(render):
    """A render with a block of missing labels (seg -1, depth 0, normal 0)."""
    ex = {k: v.copy() for k, v in render.items()}
    ex["segmentation"][10:30, 20:40] = -1
    ex["depth"][25:45, 5:25] = 0
    ex["normal"][40:60, 30:50] = 0
    return ex


@pytest.mark.parametrize("name", TRANSFORMS)
def test_normals_are_unit_on_valid_pixels_after_every_transform(scenes, name):
    for scene in scenes[:3]:
        out = numpy_dict(TRANSFORMS[name](with_holes(render1(scene)), IDS))
        norm = np.linalg.norm(out["normal"], axis=-1)
        valid = norm > 0
        assert valid.mean() > 0.5
        np.testing.assert_allclose(norm[valid], 1.0, atol=1e-5)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_segmentation_stays_in_the_class_set_or_minus_one(scenes, name):
    allowed = set(range(len(CLASS_NAMES))) | {-1}
    for scene in scenes[:3]:
        out = numpy_dict(TRANSFORMS[name](with_holes(render1(scene)), IDS))
        assert set(np.unique(out["segmentation"]).tolist()) <= allowed
        assert out["segmentation"].dtype == np.int32


@pytest.mark.parametrize("name", TRANSFORMS)
def test_every_transform_keeps_keys_shapes_and_dtypes(scenes, name):
    r = render1(scenes[0])
    out = numpy_dict(TRANSFORMS[name](r, IDS))
    assert sorted(out) == sorted(r)
    for key, value in r.items():
        assert out[key].shape == value.shape and out[key].dtype == value.dtype, key


def test_scale_crop_never_blends_invalid_pixels_into_valid_ones(scenes):
    ex = with_holes(render1(scenes[2]))
    scale, offset = 1.37, (0.3, 0.4)
    out = numpy_dict(A.scale_crop(ex, scale, offset, kinds=IDS))
    # depth: every value is a source value / s (or 0), never a blend with 0
    ref_depth = nearest_zoom_reference(ex["depth"], scale, offset) / scale
    np.testing.assert_allclose(out["depth"], ref_depth, rtol=1e-6)
    # normals are valid exactly where the nearest source normal is valid
    src_valid = np.any(ex["normal"] != 0, -1)
    ref_valid = nearest_zoom_reference(src_valid, scale, offset)
    np.testing.assert_array_equal(np.any(out["normal"] != 0, -1), ref_valid)


def test_photometric_changes_only_the_image(scenes):
    r = render1(scenes[0])
    out = numpy_dict(A.photometric(r, [3, 9]))
    assert np.abs(out["image"] - r["image"]).max() > 1e-3
    assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0
    for key in r:
        if key != "image":
            np.testing.assert_array_equal(out[key], r[key])


def test_photometric_brightness_adds_one_offset_within_its_range():
    image = np.full((8, 8, 3), 0.5, np.float32)
    image[0, 0] = (0.3, 0.4, 0.6)
    for seed in range(5):
        out = numpy_dict(
            A.photometric(
                {"image": image}, [seed, 0], 0.1, contrast=0, saturation=0, hue=0
            )
        )["image"]
        delta = out - image
        np.testing.assert_allclose(delta, delta[0, 0, 0], atol=1e-6)
        assert abs(delta[0, 0, 0]) <= 0.1


def test_photometric_with_zero_strengths_is_the_identity(scenes):
    r = render1(scenes[0])
    out = numpy_dict(A.photometric(r, [1, 1], 0, 0, 0, 0))
    np.testing.assert_array_equal(out["image"], r["image"])


# ----------------------------------------------------------------- randomness
def test_random_scale_crop_draws_its_scale_from_the_set():
    ex = {"image": np.zeros((16, 16, 3), np.float32), "depth": np.ones((16, 16, 1))}
    seen = set()
    for seed in range(40):
        out = numpy_dict(A.random_scale_crop(ex, [seed, 3], scales=(1.0, 1.25, 2.0)))
        values = np.unique(out["depth"])
        assert len(values) == 1
        seen.add(round(1 / float(values[0]), 6))
    assert seen == {1.0, 1.25, 2.0}


def test_random_hflip_probability_zero_never_flips_and_one_always_does(scenes):
    r = render1(scenes[0])
    for seed in range(4):
        never = numpy_dict(A.random_hflip(r, [seed, 0], 0.0, kinds=IDS))
        always = numpy_dict(A.random_hflip(r, [seed, 0], 1.0, kinds=IDS))
        np.testing.assert_array_equal(never["image"], r["image"])
        np.testing.assert_array_equal(always["image"], r["image"][:, ::-1])


def test_same_seed_same_output_eagerly_and_in_a_tf_function(scenes):
    r = render1(scenes[0])

    @tf.function
    def graph(ex, seed):
        return A.augment(ex, seed, max_angle=0.3, kinds=IDS)

    seed = tf.constant([5, 6], tf.int64)
    eager = numpy_dict(A.augment(r, seed, max_angle=0.3, kinds=IDS))
    again = numpy_dict(A.augment(r, seed, max_angle=0.3, kinds=IDS))
    traced = numpy_dict(graph(r, seed))
    other = numpy_dict(A.augment(r, [5, 7], max_angle=0.3, kinds=IDS))
    for key in r:
        np.testing.assert_array_equal(eager[key], again[key])
        np.testing.assert_allclose(eager[key], traced[key], atol=1e-6)
    assert np.abs(eager["image"] - other["image"]).max() > 1e-3


@pytest.fixture(scope="module")
def arrays():
    return render_scenes(24, size=32, seed=2)


def collect(ds):
    images, targets = [], []
    for x, y in ds:
        images.append(x.numpy())
        targets.append({k: v.numpy() for k, v in y.items()})
    return np.concatenate(images), {
        k: np.concatenate([t[k] for t in targets]) for k in targets[0]
    }


def test_same_seed_same_output_in_a_parallel_tf_data_pipeline(arrays):
    """Stateless ops: no op determinism needed, unlike Keras' stateful layers."""
    tasks = ["segmentation", "depth", "normal", "count"]
    fn = A.make_augment(max_angle=0.2)
    a = collect(make_dataset(arrays, tasks, 8, shuffle=True, augment=fn, seed=1))
    b = collect(make_dataset(arrays, tasks, 8, shuffle=True, augment=fn, seed=1))
    c = collect(make_dataset(arrays, tasks, 8, shuffle=True, augment=fn, seed=2))
    np.testing.assert_array_equal(a[0], b[0])
    for key in tasks:
        np.testing.assert_array_equal(a[1][key], b[1][key])
    assert not np.array_equal(a[0], c[0])
    # the default augment works as make_dataset's augment too, labels move with it
    d = collect(make_dataset(arrays, tasks, 8, augment=A.augment))
    assert set(np.unique(d[1]["segmentation"]).tolist()) <= {-1, 0, 1, 2, 3, 4}


def test_each_epoch_gets_a_fresh_augmentation(arrays):
    ds = make_dataset(arrays, ["depth"], 24, augment=A.augment, seed=0)
    first, second = (next(iter(ds))[0].numpy() for _ in range(2))
    assert not np.array_equal(first, second)


# ------------------------------------------------------------------ bad input
def small():
    return {
        "image": np.zeros((8, 8, 3), np.float32),
        "segmentation": np.zeros((8, 8), np.int32),
        "depth": np.ones((8, 8, 1), np.float32),
        "normal": np.tile(np.float32([0, 0, -1]), (8, 8, 1)),
        "count": np.int32(1),
    }


def test_example_without_an_image_is_rejected_with_its_keys():
    ex = small()
    del ex["image"]
    for fn in (A.hflip, lambda e: A.scale_crop(e, 1.2), lambda e: A.rotate(e, 0.1)):
        with pytest.raises(ValueError, match=r"no 'image' entry; keys are \['count'"):
            fn(ex)
    with pytest.raises(ValueError, match="no 'image' entry"):
        A.augment(ex, [0, 0])


@pytest.mark.parametrize(
    "key, shape, expected",
    [
        ("segmentation", (8, 8, 1), r"\(H, W\) class ids"),
        ("depth", (8, 8), r"\(H, W, 1\)"),
        ("normal", (8, 8, 2), r"\(H, W, 3\)"),
        ("image", (2, 8, 8, 3), r"expected \(H, W, 3\) -- one sample, not a batch"),
    ],
)
def test_targets_of_the_wrong_rank_name_the_shape_expected(key, shape, expected):
    ex = small()
    ex[key] = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=expected):
        A.hflip(ex)


def test_target_of_another_size_than_the_image_is_rejected():
    ex = small()
    ex["depth"] = np.ones((8, 6, 1), np.float32)
    with pytest.raises(ValueError, match="height and width must match"):
        A.scale_crop(ex, 1.5)


def test_dense_target_of_unknown_kind_asks_for_kinds():
    ex = small()
    ex["mask"] = np.zeros((8, 8), np.int32)
    with pytest.raises(ValueError, match=r"pass kinds=\{'mask': 'segmentation'\}"):
        A.hflip(ex)


def test_scale_below_one_is_rejected_eagerly_and_in_graph_mode():
    with pytest.raises(ValueError, match=r"scale must be >= 1 .* got 0.8"):
        A.scale_crop(small(), 0.8)
    with pytest.raises(ValueError, match="scales are"):
        A.random_scale_crop(small(), [0, 0], scales=(0.5, 1.0))
    with pytest.raises(ValueError, match="scales are"):
        A.make_augment(scales=(0.9,))

    @tf.function
    def graph(scale):
        return A.scale_crop(small(), scale)["depth"]

    with pytest.raises(tf.errors.InvalidArgumentError, match="scale must be >= 1"):
        graph(tf.constant(0.5))


def test_other_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="depth_rule"):
        A.scale_crop(small(), 1.2, depth_rule="metric")
    with pytest.raises(ValueError, match="offset"):
        A.scale_crop(small(), 1.2, offset=(1.5, 0.0))
    with pytest.raises(ValueError, match=r"seed has shape \(3,\)"):
        A.augment(small(), [1, 2, 3])
    with pytest.raises(ValueError, match="unknown augment option"):
        A.make_augment(angle=0.1)


# ------------------------------------------------------------ Keras layers caveats
def keras_batch(n=4, size=16):
    rng = np.random.default_rng(0)
    images = rng.random((n, size, size, 3)).astype("float32")
    masks = rng.integers(0, 5, (n, size, size, 1)).astype("int32")
    return images, masks


def test_our_hflip_equals_keras_random_flip_on_the_samples_it_flips(scenes):
    batch = render_batch(scenes, SIZE)
    layer = keras.layers.RandomFlip("horizontal", seed=3)
    out = layer(
        {
            "images": batch["image"],
            "segmentation_masks": batch["segmentation"][..., None],
        }
    )
    images = np.asarray(out["images"])
    flipped = [not np.array_equal(images[i], batch["image"][i]) for i in range(6)]
    assert any(flipped) and not all(flipped)  # RandomFlip decides per sample
    for i, was_flipped in enumerate(flipped):
        if was_flipped:
            ours = numpy_dict(A.hflip({k: v[i] for k, v in batch.items()}))
            np.testing.assert_array_equal(ours["image"], images[i])
            np.testing.assert_array_equal(
                ours["segmentation"], np.asarray(out["segmentation_masks"])[i, ..., 0]
            )


def mask_dtype(layer, images, masks):
    out = layer({"images": images, "segmentation_masks": masks})
    return keras.backend.standardize_dtype(out["segmentation_masks"].dtype)


#: Keras 3.6 to 3.13 resample masks with the images' (bilinear) interpolation in
#: RandomRotation, RandomZoom and RandomTranslation; 3.14 and later use nearest.
KERAS_VERSION = tuple(int(v) for v in keras.__version__.split(".")[:2])
KERAS_INTERPOLATES_MASKS = KERAS_VERSION < (3, 14)


def test_keras_random_flip_and_random_crop_return_float_masks():
    """Observed on Keras 3.8 to 3.15: int32 masks come back as float32 from
    RandomFlip and RandomCrop. RandomRotation, RandomZoom and RandomTranslation
    keep int32 from Keras 3.14 on; before, they return the interpolated float32."""
    images, masks = keras_batch()
    for layer in (
        keras.layers.RandomFlip(seed=1),
        keras.layers.RandomCrop(8, 8, seed=1),
    ):
        assert mask_dtype(layer, images, masks) == "float32"
    geometric = "float32" if KERAS_INTERPOLATES_MASKS else "int32"
    for layer in (
        keras.layers.RandomRotation(0.2, seed=1),
        keras.layers.RandomZoom(0.2, seed=1),
        keras.layers.RandomTranslation(0.2, 0.2, seed=1),
    ):
        assert mask_dtype(layer, images, masks) == geometric


def test_keras_layers_write_their_outputs_into_the_dict_they_are_given():
    """Observed: the layer returns the very dict it was called with, now holding
    the augmented tensors; keep a copy if the originals are needed."""
    images, masks = keras_batch()
    data = {"images": images, "segmentation_masks": masks}
    out = keras.layers.RandomFlip(seed=1)(data)
    assert out is data
    assert data["segmentation_masks"] is not masks


def test_keras_random_crop_uses_one_offset_for_the_whole_batch():
    size = 16
    positions = np.arange(size * size, dtype="float32").reshape(1, size, size, 1)
    images = np.repeat(np.repeat(positions, 8, 0), 3, -1)
    for seed in range(3):
        out = np.asarray(keras.layers.RandomCrop(8, 8, seed=seed)(images))
        corners = out[:, 0, 0, 0]
        assert len(set(corners.tolist())) == 1, corners


def test_keras_random_crop_with_training_false_crops_masks_but_not_images():
    """Observed on Keras 3.8 to 3.15: the images are returned uncropped (16x16)
    while the masks are cropped to 8x8 -- at the top-left corner, not the centre.
    Keras 3.6 and 3.7 crop both at the top-left corner."""
    images, masks = keras_batch()
    layer = keras.layers.RandomCrop(8, 8, seed=1)
    out = layer({"images": images, "segmentation_masks": masks}, training=False)
    expected = images if KERAS_VERSION >= (3, 8) else images[:, :8, :8]
    np.testing.assert_array_equal(np.asarray(out["images"]), expected)
    assert tuple(out["segmentation_masks"].shape) == (4, 8, 8, 1)
    np.testing.assert_array_equal(
        np.asarray(out["segmentation_masks"]), masks[:, :8, :8]
    )


def test_keras_random_rotation_fills_masks_by_reflection_not_with_an_ignore_label():
    """Observed: the default fill_mode="reflect" invents labels in the corners; a
    constant fill_value=-1 applies to the images as well."""
    images = np.ones((1, 16, 16, 3), "float32")
    masks = np.zeros((1, 16, 16, 1), "int32")
    masks[:, :, :8] = 2
    data = {"images": images, "segmentation_masks": masks}
    out = keras.layers.RandomRotation((0.125, 0.125), seed=1)(data)
    labels = set(np.unique(out["segmentation_masks"]).tolist())
    # no -1; Keras before 3.14 also invents 1s where the two labels meet
    assert labels == ({0, 1, 2} if KERAS_INTERPOLATES_MASKS else {0, 2})
    const = keras.layers.RandomRotation(
        (0.125, 0.125), fill_mode="constant", fill_value=-1.0, seed=1
    )(data)
    assert np.asarray(const["segmentation_masks"]).min() == -1
    assert np.asarray(const["images"]).min() == -1.0  # the image is filled with -1 too


def test_keras_layers_draw_from_a_stateful_generator_so_results_depend_on_order():
    """Why parallel pipelines with Keras layers do not repeat: a sample's crop
    depends on how many samples the layer saw before it, i.e. on the order in which
    parallel map calls happen to run."""
    images = keras_batch(n=6)[0]

    def crops(order):
        layer = keras.layers.RandomCrop(8, 8, seed=7)
        out = {i: np.asarray(layer(images[i], training=True)) for i in order}
        return [out[i] for i in range(len(images))]

    forward, backward = crops(range(6)), crops(reversed(range(6)))
    assert any(not np.array_equal(a, b) for a, b in zip(forward, backward, strict=True))


def test_keras_layers_in_a_parallel_map_repeat_with_op_determinism():
    """Run in a fresh process: op determinism is global and cannot be undone."""
    code = textwrap.dedent(
        """
        import os
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        import numpy as np, keras, tensorflow as tf
        tf.config.experimental.enable_op_determinism()
        images = np.random.default_rng(0).random((64, 16, 16, 3)).astype("float32")
        def run(parallel):
            crop = keras.layers.RandomCrop(8, 8, seed=5)
            flip = keras.layers.RandomFlip("horizontal", seed=5)
            ds = tf.data.Dataset.from_tensor_slices(images)
            ds = ds.map(lambda x: flip(crop(x)), num_parallel_calls=parallel)
            return np.stack(list(ds.as_numpy_iterator()))
        a, b = run(tf.data.AUTOTUNE), run(tf.data.AUTOTUNE)
        print(np.array_equal(a, b), np.array_equal(a, run(None)))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["True", "True"]


def test_apply_keras_layers_returns_integer_masks_moved_with_the_images(scenes):
    batch = render_batch(scenes, SIZE)
    keras.utils.set_random_seed(0)
    layers = [keras.layers.RandomFlip("horizontal", seed=2)]
    images, masks = A.apply_keras_layers(layers, batch["image"], batch["segmentation"])
    images, masks = np.asarray(images), np.asarray(masks)
    assert masks.dtype == np.int32 and masks.shape == (6, SIZE, SIZE)
    for i in range(6):
        flipped = not np.array_equal(images[i], batch["image"][i])
        expected = (
            batch["segmentation"][i][:, ::-1] if flipped else batch["segmentation"][i]
        )
        np.testing.assert_array_equal(masks[i], expected)


FIXED_GEOMETRY = {  # factors with equal bounds: every call draws the same transform
    "rotation": lambda **kw: keras.layers.RandomRotation((0.125, 0.125), **kw),
    "zoom": lambda **kw: keras.layers.RandomZoom((-0.3, -0.3), **kw),
    "translation": lambda **kw: keras.layers.RandomTranslation(
        (0.23, 0.23), (-0.17, -0.17), **kw
    ),
}


@pytest.mark.parametrize("kind", FIXED_GEOMETRY)
def test_apply_keras_layers_moves_labels_by_nearest_neighbour_on_every_keras(kind):
    """Labels 0 and 2 stay 0 and 2 (Keras before 3.14 would blend them into 1s):
    the masks equal the same layer with interpolation="nearest" applied to them as
    an image, the images equal the layer (bilinear) applied to the images alone."""
    rng = np.random.default_rng(0)
    images = rng.random((2, 16, 16, 3)).astype("float32")
    masks = np.zeros((2, 16, 16), "int32")
    masks[:, :, 8:] = 2
    masks[1, 4:12, 4:12] = 0
    out_images, out_masks = A.apply_keras_layers(
        [FIXED_GEOMETRY[kind](seed=1)], images, masks
    )
    assert keras.backend.standardize_dtype(out_masks.dtype) == "int32"
    assert set(np.unique(out_masks).tolist()) == {0, 2}
    nearest = FIXED_GEOMETRY[kind](interpolation="nearest")
    as_image = np.repeat(masks[..., None].astype("float32"), 3, axis=-1)
    np.testing.assert_array_equal(
        np.asarray(out_masks), np.asarray(nearest(as_image))[..., 0].astype("int32")
    )
    np.testing.assert_allclose(
        np.asarray(out_images), np.asarray(FIXED_GEOMETRY[kind]()(images)), atol=1e-6
    )


def test_apply_keras_layers_leaves_the_layers_interpolation_as_it_was():
    layer = keras.layers.RandomRotation(0.2, seed=1)
    images, masks = keras_batch()
    A.apply_keras_layers([layer], images, masks[..., 0])
    assert layer.interpolation == "bilinear"


def test_apply_keras_layers_rejects_a_layer_that_is_not_an_image_layer():
    images, masks = keras_batch()
    with pytest.raises(ValueError, match="expected a Keras image preprocessing layer"):
        A.apply_keras_layers([keras.layers.Dense(3)], images, masks[..., 0])


def test_apply_keras_layers_rejects_random_crop_in_inference_mode():
    """Keras 3.8+ crops only the masks with training=False (test above)."""
    images, masks = keras_batch()
    crop = [keras.layers.RandomCrop(8, 8)]
    if KERAS_VERSION < (3, 8):  # both cropped at the top-left corner
        out = A.apply_keras_layers(crop, images, masks[..., 0], training=False)
        np.testing.assert_array_equal(np.asarray(out[1]), masks[:, :8, :8, 0])
        return
    with pytest.raises(ValueError, match="did not move the masks with the images"):
        A.apply_keras_layers(crop, images, masks[..., 0], training=False)


# ---------------------------------------------------------------------------
# flip test-time augmentation
# ---------------------------------------------------------------------------

TTA_KINDS = {
    "segmentation": "segmentation",
    "depth": "depth",
    "normal": "normal",
    "count": "classification",
}


def test_unflip_predictions_negates_normal_x_against_closed_form():
    """A constant normal (a, b, c) predicted on the mirror image is (-a, b, c) in
    the original; a map f(j) of the column becomes f(W - 1 - j)."""
    b, h, w = 2, 3, 5
    normal = np.broadcast_to(np.float32([0.6, 0.0, -0.8]), (b, h, w, 3))
    column = np.broadcast_to(np.arange(w, dtype="float32")[:, None], (b, h, w, 1))
    back = A.unflip_predictions(
        {"normal": normal, "depth": column}, {"normal": "normal", "depth": "depth"}
    )
    np.testing.assert_array_equal(
        np.asarray(back["normal"]),
        np.broadcast_to(np.float32([-0.6, 0.0, -0.8]), (b, h, w, 3)),
    )
    np.testing.assert_array_equal(
        np.asarray(back["depth"])[0, 0, :, 0], [4, 3, 2, 1, 0]
    )


def test_flip_tta_of_input_independent_predictions_has_closed_form():
    """A model that ignores its input predicts the same on both passes:
    normal (a, b, c) averages with (-a, b, c) to (0, b, c)/|(0, b, c)|; depth j
    averages with W - 1 - j to (W - 1)/2; segmentation logits (j, W - 1 - j)
    average to equal probabilities; image-level logits stay what they were."""
    b, h, w = 2, 3, 6
    j = np.arange(w, dtype="float32")
    outputs = {
        "normal": np.broadcast_to(np.float32([0.6, 0.48, -0.64]), (b, h, w, 3)),
        "depth": np.broadcast_to(j[:, None], (b, h, w, 1)),
        "segmentation": np.broadcast_to(np.stack([j, w - 1 - j], -1), (b, h, w, 2)),
        "count": np.broadcast_to(np.float32([0.0, 1.0, 3.0]), (b, 3)),
    }
    tta = A.flip_tta(lambda x: outputs, np.zeros((b, h, w, 3), "float32"), TTA_KINDS)
    expected_normal = np.float32([0.0, 0.48, -0.64]) / 0.8
    np.testing.assert_allclose(
        np.asarray(tta["normal"]),
        np.broadcast_to(expected_normal, (b, h, w, 3)),
        atol=1e-6,
    )
    np.testing.assert_allclose(np.asarray(tta["depth"]), (w - 1) / 2, atol=1e-6)
    np.testing.assert_allclose(np.exp(np.asarray(tta["segmentation"])), 0.5, atol=1e-6)
    logits = np.float32([0.0, 1.0, 3.0])
    softmax = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(
        np.exp(np.asarray(tta["count"])), [softmax] * b, atol=1e-6
    )
    # without the negation, the constant normal comes back unchanged (wrong)
    wrong = A.flip_tta(
        lambda x: outputs, np.zeros((b, h, w, 3), "float32"), TTA_KINDS, False
    )
    np.testing.assert_allclose(
        np.asarray(wrong["normal"])[0, 0, 0], [0.6, 0.48, -0.64], atol=1e-6
    )


def test_flip_tta_of_a_perfect_model_is_exact_against_the_renderer():
    """Oracle: a 'model' that returns the renderer's labels of whichever scene
    it is shown (the scene, or Scene.mirrored()). Flip TTA must return the
    scene's own labels; flipping the normals back like an image must not."""
    scenes = sample_scenes(3, seed=5)
    size = 24
    views = {}
    for sc in scenes:
        for view in (sc, sc.mirrored()):
            r = render(view, size)
            views[r["image"].tobytes()] = r

    def perfect(images):
        rows = [views[np.asarray(x).tobytes()] for x in np.asarray(images)]
        out = {k: np.stack([r[k] for r in rows]) for k in ("depth", "normal")}
        out["segmentation"] = (
            np.eye(5, dtype="float32")[np.stack([r["segmentation"] for r in rows])]
            * 20.0
        )
        out["count"] = np.eye(6, dtype="float32")[[r["count"] for r in rows]] * 20.0
        return out

    truth = [render(sc, size) for sc in scenes]
    images = np.stack([t["image"] for t in truth])
    tta = A.flip_tta(perfect, images, TTA_KINDS)
    normals = np.stack([t["normal"] for t in truth])
    valid = np.linalg.norm(normals, axis=-1) > 0
    np.testing.assert_allclose(
        np.asarray(tta["normal"])[valid], normals[valid], atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(tta["depth"]), np.stack([t["depth"] for t in truth]), atol=1e-6
    )
    np.testing.assert_array_equal(
        np.argmax(np.asarray(tta["segmentation"]), -1),
        np.stack([t["segmentation"] for t in truth]),
    )
    np.testing.assert_array_equal(
        np.argmax(np.asarray(tta["count"]), -1), [t["count"] for t in truth]
    )
    wrong = np.asarray(A.flip_tta(perfect, images, TTA_KINDS, False)["normal"])
    sideways = valid & (np.abs(normals[..., 0]) > 0.1)
    assert sideways.any()
    assert np.abs(wrong[sideways] - normals[sideways]).max() > 0.1


def test_flip_tta_rejects_unknown_kinds_and_non_dense_maps():
    with pytest.raises(ValueError, match="unknown task kinds"):
        A.unflip_predictions({"a": np.zeros((1, 2, 2, 1))}, {"a": "edges"})
    with pytest.raises(ValueError, match=r"expected \(B, H, W, C\)"):
        A.unflip_predictions({"depth": np.zeros((1, 2, 2))}, {"depth": "depth"})
