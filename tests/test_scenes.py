"""The renderer against exact references: implicit surfaces, an SDF sphere tracer
written independently here, and the mirror symmetry of the scene description."""

import numpy as np
import pytest

from mtl_utils.data.scenes import (
    CLASS_NAMES,
    MAX_OBJECTS,
    MIN_SIZE,
    Camera,
    Object3D,
    Scene,
    render,
    render_batch,
    render_scenes,
    sample_scenes,
)

SIZE = 48


@pytest.fixture(scope="module")
def scenes():
    # seed 3 plus a hand-made scene with a rolled, off-centre camera and a tall box
    hand = Scene(
        camera=Camera(height=1.3, pitch=0.3, roll=0.2, focal=1.5, cx=0.1, cy=-0.05),
        objects=(
            Object3D("box", 0.4, 3.5, (0.4, 0.5, 0.3), (0.8, 0.2, 0.2), yaw=0.5),
            Object3D("sphere", -0.9, 4.0, (0.5, 0.5, 0.5), (0.2, 0.8, 0.2)),
            Object3D("cylinder", 0.0, 5.5, (0.35, 1.5, 0.35), (0.2, 0.2, 0.8)),
        ),
    )
    return sample_scenes(12, seed=3) + [hand]


@pytest.fixture(scope="module")
def rendered(scenes):
    return render_batch(scenes, SIZE, object_ids=True)


def camera_axes(cam):
    """Right, down, forward world axes of a camera (written out in float64)."""
    p, r = cam.pitch, cam.roll
    fwd = np.array([0.0, -np.sin(p), np.cos(p)])
    right0, down0 = np.array([1.0, 0, 0]), np.array([0.0, -np.cos(p), -np.sin(p)])
    right = np.cos(r) * right0 + np.sin(r) * down0
    down = np.cos(r) * down0 - np.sin(r) * right0
    return right, down, fwd


def pixel_rays(cam, h, w):
    """World-frame ray directions (H, W, 3) with unit camera-z component."""
    right, down, fwd = camera_axes(cam)
    u = ((np.arange(w) + 0.5) - w / 2) / (w / 2)
    v = ((np.arange(h) + 0.5) - h / 2) / (w / 2)
    uu, vv = np.meshgrid((u - cam.cx) / cam.focal, (v - cam.cy) / cam.focal)
    return uu[..., None] * right + vv[..., None] * down + fwd


def backproject(scene, depth):
    """World points (H, W, 3) of every pixel from its depth."""
    h, w = depth.shape[:2]
    origin = np.array([0.0, scene.camera.height, 0.0])
    return origin + depth.astype(np.float64)[..., None] * pixel_rays(scene.camera, h, w)


def to_local(o, p):
    """Point(s) p in the object's frame (centred on its footprint, un-yawed)."""
    q = p - np.array([o.x, 0.0, o.z])
    c, s = np.cos(o.yaw), np.sin(o.yaw)
    return np.stack(
        [q[..., 0] * c + q[..., 2] * s, q[..., 1], -q[..., 0] * s + q[..., 2] * c], -1
    )


def sdf(o, p):
    """Signed distance from p (..., 3) to object o (standard SDF formulas)."""
    if o.shape == "sphere":
        return np.linalg.norm(p - np.array([o.x, o.size[0], o.z]), axis=-1) - o.size[0]
    if o.shape == "box":
        q = to_local(o, p) - np.array([0.0, o.size[1], 0.0])
        e = np.abs(q) - np.array(o.size)
        return np.linalg.norm(np.maximum(e, 0), axis=-1) + np.minimum(e.max(-1), 0)
    r, height = o.size[0], o.size[1]
    q = p - np.array([o.x, height / 2, o.z])
    e = np.stack(
        [np.hypot(q[..., 0], q[..., 2]) - r, np.abs(q[..., 1]) - height / 2], -1
    )
    return np.linalg.norm(np.maximum(e, 0), axis=-1) + np.minimum(e.max(-1), 0)


def surface_residual(scene, p, obj_id, seg):
    """Relative distance of each point to the implicit surface it should lie on."""
    res = np.zeros(p.shape[:-1])
    floor, wall = seg == 0, seg == 1
    res[floor] = np.abs(p[floor][:, 1]) / np.linalg.norm(p[floor], axis=-1)
    res[wall] = np.abs(p[wall][:, 2] / scene.wall_z - 1)
    for k, o in enumerate(scene.objects):
        m = obj_id == k
        if not m.any():
            continue
        res[m] = np.abs(sdf(o, p[m])) / max(o.size)
    return res


def test_backprojected_depth_lies_on_the_surfaces(scenes, rendered):
    worst = 0.0
    for i, scene in enumerate(scenes):
        p = backproject(scene, rendered["depth"][i, ..., 0])
        res = surface_residual(
            scene, p, rendered["object_id"][i], rendered["segmentation"][i]
        )
        worst = max(worst, res.max())
    assert worst < 1e-4, worst


def test_normals_are_unit_length(rendered):
    norm = np.linalg.norm(rendered["normal"], axis=-1)
    assert np.abs(norm - 1).max() < 1e-5


def test_visible_surfaces_face_the_camera(scenes, rendered):
    # a surface seen along a ray has a normal pointing back against the ray
    for i, scene in enumerate(scenes):
        cam = scene.camera
        u = ((np.arange(SIZE) + 0.5) - SIZE / 2) / (SIZE / 2)
        uu, vv = np.meshgrid((u - cam.cx) / cam.focal, (u - cam.cy) / cam.focal)
        ray = np.stack([uu, vv, np.ones_like(uu)], -1)
        assert ((rendered["normal"][i] * ray).sum(-1) < 1e-6).all()


def test_normals_match_sdf_gradient(scenes, rendered):
    """Normals equal the normalised finite-difference gradient of the SDF."""
    eps = 1e-5
    for i, scene in enumerate(scenes):
        oid = rendered["object_id"][i]
        p = backproject(scene, rendered["depth"][i, ..., 0])
        right, down, fwd = camera_axes(scene.camera)
        for k, o in enumerate(scene.objects):
            m = oid == k
            if not m.any():
                continue
            pts = p[m]
            grad = np.stack(
                [sdf(o, pts + eps * e) - sdf(o, pts - eps * e) for e in np.eye(3)],
                -1,
            )
            grad /= np.linalg.norm(grad, axis=-1, keepdims=True)
            cam = np.stack([grad @ right, grad @ down, grad @ fwd], -1)
            cos = (cam * rendered["normal"][i][m]).sum(-1)
            # edges of boxes/caps have two valid normals: allow a few
            assert np.mean(cos > 1 - 1e-4) > 0.97, (i, o.shape)


def test_image_is_lambertian_shading_of_the_albedo(scenes, rendered):
    """Object pixels: colour * (ambient + (1 - ambient) max(0, n . light))."""
    ambient = 0.25
    for i, scene in enumerate(scenes):
        right, down, fwd = camera_axes(scene.camera)
        world_n = rendered["normal"][i] @ np.stack([right, down, fwd])
        shade = ambient + (1 - ambient) * np.maximum(world_n @ np.array(scene.light), 0)
        oid = rendered["object_id"][i]
        for k, o in enumerate(scene.objects):
            m = oid == k
            expected = np.array(o.colour) * shade[m][:, None]
            np.testing.assert_allclose(rendered["image"][i][m], expected, atol=1e-5)
        # the background albedo is its colour times a texture factor in [1 - 2a, 1]
        seg = rendered["segmentation"][i]
        for cls, colour in ((0, scene.floor_colour), (1, scene.wall_colour)):
            m = seg == cls
            factor = rendered["image"][i][m] / (np.array(colour) * shade[m][:, None])
            assert np.ptp(factor, axis=-1).max() < 1e-4  # same factor in R, G, B
            assert factor.min() > 1 - 2 * scene.texture_amp - 1e-4
            assert factor.max() < 1 + 1e-4


def sphere_trace(scene, rays):
    """First hit of each ray by sphere tracing the scene's SDF (float64 oracle).

    Returns (depth, class id, object id) per ray.
    """
    origin = np.array([0.0, scene.camera.height, 0.0])
    unit = rays / np.linalg.norm(rays, axis=-1, keepdims=True)
    t = np.zeros(len(rays))
    # planes as exact intersections; objects by marching
    t_floor = np.where(
        rays[:, 1] < 0, -scene.camera.height / np.minimum(rays[:, 1], -1e-12), np.inf
    )
    t_wall = scene.wall_z / rays[:, 2]
    t_plane = np.minimum(t_floor, t_wall)
    cls = np.where(t_floor < t_wall, 0, 1)
    obj = np.full(len(rays), -1)
    dist_along = np.zeros(len(rays))
    done = np.zeros(len(rays), bool)
    for _ in range(400):
        p = origin + dist_along[:, None] * unit
        dists = np.stack([sdf(o, p) for o in scene.objects], -1)
        step = dists.min(-1)
        hit = (step < 1e-7) & ~done
        obj[hit] = dists[hit].argmin(-1)
        done |= hit
        dist_along = np.where(done, dist_along, dist_along + step)
        done |= dist_along * rays[:, 2] / np.linalg.norm(rays, axis=-1) > t_plane
    t = dist_along / np.linalg.norm(rays, axis=-1)  # camera z (rays have unit z)
    hit_obj = obj >= 0
    depth = np.where(hit_obj, t, t_plane)
    for k, o in enumerate(scene.objects):
        cls = np.where(obj == k, CLASS_NAMES.index(o.shape), cls)
    return depth, cls, obj


def test_render_agrees_with_an_sdf_sphere_tracer(scenes, rendered):
    agree, total = 0, 0
    for i, scene in enumerate(scenes):
        rays = pixel_rays(scene.camera, SIZE, SIZE).reshape(-1, 3)
        depth, cls, obj = sphere_trace(scene, rays)
        seg = rendered["segmentation"][i].reshape(-1)
        same = seg == cls
        agree += same.sum()
        total += same.size
        ours = rendered["depth"][i].reshape(-1)
        rel = np.abs(ours[same] - depth[same]) / depth[same]
        assert np.median(rel) < 1e-5 and np.mean(rel < 1e-3) > 0.99
        # segmentation ids are the classes of the objects hit
        oid = rendered["object_id"][i].reshape(-1)
        for k, o in enumerate(scene.objects):
            assert (seg[oid == k] == CLASS_NAMES.index(o.shape)).all()
    # silhouette pixels can differ by marching tolerance; nothing else may
    assert agree / total > 0.995, agree / total


def test_mirrored_scene_renders_the_horizontal_flip(scenes):
    for scene in scenes:
        a, b = render(scene, SIZE), render(scene.mirrored(), SIZE)
        assert np.abs(a["image"][:, ::-1] - b["image"]).max() <= 1e-6
        np.testing.assert_array_equal(a["segmentation"][:, ::-1], b["segmentation"])
        np.testing.assert_array_equal(a["depth"][:, ::-1], b["depth"])
        np.testing.assert_array_equal(a["normal"][:, ::-1] * [-1, 1, 1], b["normal"])
        assert a["count"] == b["count"]


def test_scene_i_depends_only_on_seed_and_index():
    first = render_scenes(4, size=32, seed=7)
    more = render_scenes(8, size=32, seed=7)
    for key in first:
        np.testing.assert_array_equal(first[key], more[key][:4])
    other = render_scenes(4, size=32, seed=8)
    assert not np.array_equal(first["image"], other["image"])


def test_count_is_the_number_of_distinct_visible_objects(scenes, rendered):
    for i, scene in enumerate(scenes):
        ids = np.unique(rendered["object_id"][i])
        assert rendered["count"][i] == (ids >= 0).sum() <= len(scene.objects)
    assert rendered["count"].max() <= MAX_OBJECTS


def test_render_scenes_schema():
    out = render_scenes(3, size=(24, 32), seed=0)
    assert set(out) == {"image", "segmentation", "depth", "normal", "count"}
    assert out["image"].shape == (3, 24, 32, 3) and out["image"].dtype == np.float32
    assert (
        out["segmentation"].shape == (3, 24, 32)
        and out["segmentation"].dtype == np.int32
    )
    assert out["depth"].shape == (3, 24, 32, 1) and out["depth"].dtype == np.float32
    assert out["normal"].shape == (3, 24, 32, 3) and out["normal"].dtype == np.float32
    assert out["count"].shape == (3,) and out["count"].dtype == np.int32
    assert 0 <= out["image"].min() and out["image"].max() <= 1
    assert set(np.unique(out["segmentation"])) <= set(range(len(CLASS_NAMES)))
    assert render_scenes(0, size=16)["image"].shape == (0, 16, 16, 3)


def test_object_ids_option_adds_the_instance_map_and_changes_nothing_else():
    plain = render_scenes(6, size=32, seed=3)
    more = render_scenes(6, size=32, seed=3, object_ids=True)
    assert set(more) == set(plain) | {"object_id"}
    for key, value in plain.items():  # bit-identical
        assert more[key].dtype == value.dtype
        np.testing.assert_array_equal(more[key], value)
    assert more["object_id"].shape == (6, 32, 32)
    visible = [len(np.unique(ids[ids >= 0])) for ids in more["object_id"]]
    np.testing.assert_array_equal(visible, plain["count"])


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="number of scenes must be an integer >= 0"):
        render_scenes(-1)
    with pytest.raises(ValueError, match=f"integers >= {MIN_SIZE}"):
        render_scenes(2, size=MIN_SIZE - 1)
    with pytest.raises(ValueError, match="image size"):
        render_scenes(2, size=(32, 4))


def test_the_near_layout_draws_from_its_ranges_and_default_is_unchanged():
    from mtl_utils.data.scenes import LAYOUTS, Layout

    default = sample_scenes(20, seed=4)
    assert sample_scenes(20, seed=4, layout="default") == default
    assert sample_scenes(20, seed=4, layout=Layout()) == default
    near = sample_scenes(200, seed=4, layout="near")
    low, high = LAYOUTS["near"].distance
    distances = [o.z for s in near for o in s.objects]
    assert min(distances) >= low and max(distances) <= high
    assert max(len(s.objects) for s in near) == LAYOUTS["near"].max_objects

    # objects are nearer, so they cover more pixels: the point of the layout
    def object_share(arrays):
        return float((arrays["segmentation"] >= 2).mean())

    far = render_scenes(64, size=32, seed=4)
    close = render_scenes(64, size=32, seed=4, layout="near")
    assert object_share(close) > 1.5 * object_share(far)
    with pytest.raises(ValueError, match="unknown layout 'far'"):
        sample_scenes(1, layout="far")
    with pytest.raises(ValueError, match="max_objects"):
        Layout(max_objects=9)
