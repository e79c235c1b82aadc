"""The synthetic scenes benchmark: exact dense labels from analytic ray casting.

A :class:`Scene` is a plain description (camera, light, floor and wall textures,
objects). :func:`render` casts one ray per pixel through a pinhole camera and
intersects it analytically with a floor (plane ``y = 0``), a wall (plane
``z = wall_z``) and the objects (spheres, yawed boxes, upright cylinders) standing on
the floor. Every label is exact: the class of the surface hit, its depth, its surface
normal and the number of objects that are visible.

Coordinate frames
-----------------
World: ``x`` right, ``y`` up, ``z`` forward (away from the camera). The camera sits at
``(0, height, 0)``, pitched down by ``pitch`` radians and rolled by ``roll`` about its
optical axis.

Camera (OpenCV convention): ``x`` right (increasing column), ``y`` down (increasing
row), ``z`` forward. ``depth`` is the camera-frame ``z`` of the surface point (as in
NYUv2, not the distance along the ray) and ``normal`` is the unit surface normal in
the camera frame; a visible surface faces the camera, so its normal has a negative
dot product with the pixel's ray.

Pixels: column ``j`` of an image ``W`` pixels wide has normalised coordinate
``u = (j + 0.5 - W / 2) / (W / 2)`` and row ``i`` has
``v = (i + 0.5 - H / 2) / (W / 2)``;
the ray of pixel ``(u, v)`` has camera-frame direction
``((u - cx) / focal, (v - cy) / focal, 1)``. ``focal`` is in units of half the image
width, so a crop-and-resize by a factor ``s`` is exactly the camera with
``focal * s`` and a shifted principal point ``(cx, cy)``.

Examples
--------
>>> arrays = render_scenes(8, size=64, seed=0)
>>> arrays["image"].shape, arrays["segmentation"].dtype
((8, 64, 64, 3), dtype('int32'))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

#: Segmentation classes. Index = class id in the ``segmentation`` target.
CLASS_NAMES = ("floor", "wall", "sphere", "box", "cylinder")
SHAPES = ("sphere", "box", "cylinder")
#: Most objects a sampled scene holds; ``count`` of a sampled scene lies in
#: ``0 .. MAX_OBJECTS`` (the classes of the ``count`` task). A hand-made
#: :class:`Scene` may hold more: it is rendered and counted all the same.
MAX_OBJECTS = 5
#: Smallest image side :func:`render` accepts.
MIN_SIZE = 8

_AMBIENT = 0.25
_CHUNK = 32  # scenes rendered together: arrays stay in cache


@dataclass(frozen=True)
class Camera:
    """Pinhole camera at ``(0, height, 0)``; angles in radians.

    ``focal`` is in units of half the image width; ``(cx, cy)`` is the principal
    point offset in the same normalised units (0 = image centre).
    """

    height: float = 1.2
    pitch: float = 0.25
    roll: float = 0.0
    focal: float = 1.4
    cx: float = 0.0
    cy: float = 0.0


@dataclass(frozen=True)
class Object3D:
    """An object standing on the floor.

    ``shape`` is ``"sphere"`` (``size[0]`` = radius), ``"box"`` (``size`` = half
    extents along its own x, y, z; rotated by ``yaw`` about the vertical axis) or
    ``"cylinder"`` (``size[0]`` = radius, ``size[1]`` = height; upright).
    ``x, z`` is the footprint centre on the floor; ``colour`` is RGB albedo in [0, 1].
    """

    shape: str
    x: float
    z: float
    size: tuple[float, float, float]
    colour: tuple[float, float, float]
    yaw: float = 0.0


@dataclass(frozen=True)
class Scene:
    """A scene: camera, directional light, textured floor and wall, objects.

    ``light`` is a unit vector pointing from the surfaces towards the light (world
    frame). Floor texture: ``floor_colour * (1 - a + a * cos(kx (x - ox)) cos(kz z))``
    with ``a = texture_amp``; the wall is textured the same way in ``x`` and ``y``.
    """

    camera: Camera = field(default_factory=Camera)
    light: tuple[float, float, float] = (0.3, 0.8, -0.52)
    floor_colour: tuple[float, float, float] = (0.6, 0.6, 0.55)
    wall_colour: tuple[float, float, float] = (0.7, 0.75, 0.8)
    wall_z: float = 9.0
    texture_freq: float = 4.0
    texture_offset: float = 0.0
    texture_amp: float = 0.3
    objects: tuple[Object3D, ...] = ()

    def mirrored(self) -> Scene:
        """The scene reflected in the plane ``x = 0``.

        Its rendering is exactly the horizontal flip of this scene's rendering, with
        the camera-frame normal's ``x`` negated (an oracle for ``hflip``).
        """
        cam = dataclasses.replace(
            self.camera, roll=-self.camera.roll, cx=-self.camera.cx
        )
        lx, ly, lz = self.light
        objects = tuple(
            dataclasses.replace(o, x=-o.x, yaw=-o.yaw) for o in self.objects
        )
        return dataclasses.replace(
            self,
            camera=cam,
            light=(-lx, ly, lz),
            texture_offset=-self.texture_offset,
            objects=objects,
        )


@dataclass(frozen=True)
class Layout:
    """Ranges that :func:`sample_scene` draws objects from.

    ``distance``: range of an object's floor distance ``z`` from the camera;
    ``max_objects``: most objects a scene holds (at least one).
    """

    distance: tuple[float, float] = (2.5, 6.0)
    max_objects: int = MAX_OBJECTS

    def __post_init__(self) -> None:
        near, far = self.distance
        if not 0.5 <= near < far:
            raise ValueError(
                f"distance={self.distance!r}; expected (near, far) with "
                "0.5 <= near < far"
            )
        if not 1 <= int(self.max_objects) <= MAX_OBJECTS:
            raise ValueError(
                f"max_objects={self.max_objects!r}; expected 1..{MAX_OBJECTS}"
            )


#: Named layouts. ``"default"``: the benchmark of chapters 1 to 4 (1 to 5 objects,
#: 2.5 to 6 units away). ``"near"``: 1 to 3 objects 1.8 to 3.2 units away, so that
#: objects cover enough pixels of a 32 x 32 image to be segmented (the reference
#: scale of the experiments in chapters 5 and 6).
LAYOUTS = {
    "default": Layout(),
    "near": Layout(distance=(1.8, 3.2), max_objects=3),
}


def _layout(layout: str | Layout) -> Layout:
    if isinstance(layout, Layout):
        return layout
    if layout not in LAYOUTS:
        raise ValueError(
            f"unknown layout {layout!r}; expected one of {sorted(LAYOUTS)}"
        )
    return LAYOUTS[layout]


def sample_scene(rng: np.random.Generator, layout: str | Layout = "default") -> Scene:
    """Draw a random scene: 1 to ``MAX_OBJECTS`` non-overlapping objects in view.

    Parameters
    ----------
    rng:
        NumPy generator; the scene depends only on its state.
    layout:
        A name of :data:`LAYOUTS` or a :class:`Layout`: how many objects, how far.
    """
    layout = _layout(layout)
    near, far = layout.distance
    cam = Camera(
        height=rng.uniform(1.0, 1.6),
        pitch=rng.uniform(0.15, 0.4),
        focal=rng.uniform(1.2, 1.6),
    )
    az = rng.uniform(-1.2, 1.2)
    el = rng.uniform(0.5, 1.2)
    light = (np.sin(az) * np.cos(el), np.sin(el), -np.cos(az) * np.cos(el))
    n_objects = int(rng.integers(1, layout.max_objects + 1))
    objects: list[Object3D] = []
    footprints: list[tuple[float, float, float]] = []
    for _ in range(n_objects):
        for _attempt in range(20):
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            z = rng.uniform(near, far)
            x = rng.uniform(-0.4, 0.4) * z / cam.focal * 1.6
            if shape == "sphere":
                r = rng.uniform(0.35, 0.7)
                size, radius = (r, r, r), r
            elif shape == "box":
                hx, hy, hz = rng.uniform(0.3, 0.6, size=3)
                size, radius = (hx, hy, hz), float(np.hypot(hx, hz))
            else:
                r, h = rng.uniform(0.3, 0.5), rng.uniform(0.6, 1.6)
                size, radius = (r, h, r), r
            if all(np.hypot(x - fx, z - fz) > radius + fr for fx, fz, fr in footprints):
                break
        else:  # no free spot found: the scene keeps fewer objects
            continue
        footprints.append((x, z, radius))
        colour = tuple(float(c) for c in rng.uniform(0.15, 1.0, size=3))
        objects.append(
            Object3D(
                shape,
                float(x),
                float(z),
                tuple(float(s) for s in size),
                colour,
                yaw=float(rng.uniform(-np.pi / 4, np.pi / 4)),
            )
        )
    return Scene(
        camera=cam,
        light=tuple(float(c) for c in light),
        floor_colour=tuple(float(c) for c in rng.uniform(0.35, 0.8, size=3)),
        wall_colour=tuple(float(c) for c in rng.uniform(0.45, 0.9, size=3)),
        wall_z=float(rng.uniform(7.0, 10.0)),
        texture_freq=float(rng.uniform(2.0, 6.0)),
        texture_offset=float(rng.uniform(-1.0, 1.0)),
        texture_amp=float(rng.uniform(0.1, 0.35)),
        objects=tuple(objects),
    )


def _image_size(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if np.ndim(size) == 0 else tuple(size)
    if int(h) != h or int(w) != w or h < MIN_SIZE or w < MIN_SIZE:
        raise ValueError(
            f"image size {size!r} is not supported; expected an int or (height, width) "
            f"of integers >= {MIN_SIZE}"
        )
    return int(h), int(w)


def _camera_axes(cams: list[Camera]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World-frame right, down and forward axes of each camera, each (N, 3)."""
    pitch = np.array([c.pitch for c in cams])
    roll = np.array([c.roll for c in cams])
    zeros = np.zeros_like(pitch)
    fwd = np.stack([zeros, -np.sin(pitch), np.cos(pitch)], -1)
    right0 = np.stack([np.ones_like(pitch), zeros, zeros], -1)
    down0 = np.stack([zeros, -np.cos(pitch), -np.sin(pitch)], -1)
    c, s = np.cos(roll)[:, None], np.sin(roll)[:, None]
    return c * right0 + s * down0, c * down0 - s * right0, fwd


def _pad(values: list[list[tuple]], width: int, fill: tuple) -> np.ndarray:
    """Rows of tuples padded with ``fill`` to ``width`` -> (N, width, len(fill))."""
    k = max([len(v) for v in values] + [1])
    out = np.empty((len(values), k, width), np.float64)
    out[:] = fill
    for i, v in enumerate(values):
        if v:
            out[i, : len(v)] = v
    return out


def _render_chunk(scenes: list[Scene], h: int, w: int) -> dict[str, np.ndarray]:
    n, dt = len(scenes), np.float32
    cams = [s.camera for s in scenes]
    right, down, fwd = _camera_axes(cams)
    focal = np.array([c.focal for c in cams], dt)[:, None, None]
    u = (((np.arange(w) + 0.5) - w / 2) / (w / 2)).astype(dt)
    v = (((np.arange(h) + 0.5) - h / 2) / (w / 2)).astype(dt)
    uu = (u[None, None, :] - np.array([c.cx for c in cams], dt)[:, None, None]) / focal
    vv = (v[None, :, None] - np.array([c.cy for c in cams], dt)[:, None, None]) / focal
    # World ray direction of every pixel (N, P); its camera-z component is 1, so the
    # ray parameter t of a hit IS its depth.
    right, down, fwd = (a.astype(dt)[:, :, None, None] for a in (right, down, fwd))
    d = [
        (uu * right[:, a] + vv * down[:, a] + fwd[:, a]).reshape(n, h * w)
        for a in range(3)
    ]
    right, down, fwd = (a[:, :, 0, 0] for a in (right, down, fwd))
    oy = np.array([c.height for c in cams], dt)[:, None]
    inf = dt(np.inf)

    # Background: floor y = 0 and wall z = wall_z (the wall is hit by every ray with
    # d_z > 0; the floor only by rays going down).
    wall_z = np.array([s.wall_z for s in scenes], dt)[:, None]
    t_wall = np.where(d[2] > 0, wall_z / np.where(d[2] > 0, d[2], 1), inf)
    t_floor = np.where(d[1] < 0, -oy / np.where(d[1] < 0, d[1], -1), inf)
    floor_hit = t_floor < t_wall
    depth = np.where(floor_hit, t_floor, t_wall)
    label = np.where(floor_hit, 0, 1).astype(np.int32)
    # Background normals (world frame): floor +y, wall -z.
    nx = np.zeros_like(depth)
    ny = floor_hit.astype(dt)
    nz = floor_hit.astype(dt) - 1
    obj = np.full(depth.shape, -1, np.int32)  # index in scene.objects of the hit

    # Background albedo: textured floor and wall.
    px, py, pz = d[0] * depth, oy + d[1] * depth, d[2] * depth
    freq = np.array([s.texture_freq for s in scenes], dt)[:, None]
    off = np.array([s.texture_offset for s in scenes], dt)[:, None]
    amp = np.array([s.texture_amp for s in scenes], dt)[:, None]
    tex = np.cos(freq * (px - off)) * np.cos(freq * np.where(floor_hit, pz, py))
    tex = 1 - amp + amp * tex
    floor_c = np.array([s.floor_colour for s in scenes], dt).T[:, :, None]
    wall_c = np.array([s.wall_colour for s in scenes], dt).T[:, :, None]
    # (3, N, P), channels first; C order so that the object pixels can be set in place
    albedo = np.ascontiguousarray(np.where(floor_hit, floor_c, wall_c) * tex)

    table = _object_table(scenes)
    if table is not None:
        pix, t, gid, face = _object_hits(table, d, oy, (right, down, fwd), scenes, h, w)
        flat = depth.reshape(-1)
        np.minimum.at(flat, pix, t)
        win = (t == flat[pix]) & np.isfinite(t)
        pix, gid, face = pix[win], gid[win], face[win]
        row = table[gid]
        kind = row[:, 2].astype(np.int32)
        label.reshape(-1)[pix] = kind + 1
        obj.reshape(-1)[pix] = row[:, 1].astype(np.int32)
        albedo.reshape(3, -1)[:, pix] = row[:, 9:12].T
        snx, sny, snz = _object_normals(
            row,
            kind,
            face,
            [a.reshape(-1)[pix] for a in d],
            flat[pix],
            oy.reshape(-1)[row[:, 0].astype(int)],
        )
        nx.reshape(-1)[pix], ny.reshape(-1)[pix], nz.reshape(-1)[pix] = snx, sny, snz

    # Lambertian shading with ambient light.
    light = np.array([s.light for s in scenes], dt)
    lambert = np.maximum(nx * light[:, :1] + ny * light[:, 1:2] + nz * light[:, 2:], 0)
    shade = _AMBIENT + (1 - _AMBIENT) * lambert
    # albedo <= 1 and shade <= 1, so the image lies in [0, 1] without clipping
    image = np.empty((n, h * w, 3), dt)
    for c in range(3):
        np.multiply(albedo[c], shade, out=image[..., c])

    # Camera-frame normals: components along the camera's right, down, forward axes.
    normal = np.empty((n, h * w, 3), dt)
    for a, e in enumerate((right, down, fwd)):
        normal[..., a] = nx * e[:, :1] + ny * e[:, 1:2] + nz * e[:, 2:]
    # Any number of objects counts (a hand-made scene may hold more than
    # MAX_OBJECTS; the count task then refuses its label, see make_dataset).
    k = max(len(s.objects) for s in scenes)
    seen = np.zeros((n, k + 1), bool)
    seen[np.arange(n)[:, None], obj] = True  # column -1 (= last) collects background
    counts = seen[:, :k].sum(1).astype(np.int32)
    return {
        "image": image.reshape(n, h, w, 3),
        "segmentation": label.reshape(n, h, w),
        "depth": depth.reshape(n, h, w, 1),
        "normal": normal.reshape(n, h, w, 3),
        "count": counts,
        "object_id": obj.reshape(n, h, w),
    }


def _object_table(scenes: list[Scene]) -> np.ndarray | None:
    """One float32 row per object: scene, index, kind, x, z, size(3), yaw, colour(3)."""
    rows = [
        (si, oi, SHAPES.index(o.shape) + 1, o.x, o.z, *o.size, o.yaw, *o.colour)
        for si, s in enumerate(scenes)
        for oi, o in enumerate(s.objects)
    ]
    return np.array(rows, np.float32) if rows else None


def _object_normals(row, kind, face, d, t, oy):
    """World-frame unit normals at the hits ``o + t d`` of the objects in ``row``."""
    cx, cz, s0, yaw = row[:, 3], row[:, 4], row[:, 5], row[:, 8]
    px, py, pz = d[0] * t, oy + d[1] * t, d[2] * t
    sphere, box, cap = kind == 1, kind == 2, (kind == 3) & (face == 2)
    # sphere: (p - c) / r; cylinder side: radial; cylinder cap: +y
    nx = np.where(cap, 0, (px - cx) / s0)
    ny = np.where(sphere, (py - s0) / s0, np.where(cap, 1, 0))
    nz = np.where(cap, 0, (pz - cz) / s0)
    # box: the local face normal rotated back by +yaw about y
    sign = np.sign(face).astype(np.float32)
    axis = np.abs(face)
    lnx, lnz = np.where(axis == 1, sign, 0), np.where(axis == 3, sign, 0)
    cyaw, syaw = np.cos(yaw), np.sin(yaw)
    nx = np.where(box, lnx * cyaw - lnz * syaw, nx)
    ny = np.where(box, np.where(axis == 2, sign, 0), ny)
    nz = np.where(box, lnx * syaw + lnz * cyaw, nz)
    norm = np.sqrt(nx * nx + ny * ny + nz * nz)
    return nx / norm, ny / norm, nz / norm


def _object_hits(tab, d, oy, axes, scenes, h, w):
    """Ray-object intersections restricted to each object's screen bounding box.

    Returns flat pixel indices into (N * H * W), hit distances, the row of
    ``tab`` (see ``_object_table``) of the object tested, and the face code (box:
    +-1/2/3 for the local axis of the face hit; cylinder: 2 for the top cap).
    """
    dt = np.float32
    tab64 = tab.astype(np.float64)
    si, kind = tab[:, 0].astype(np.int64), tab[:, 2].astype(np.int64)
    x, z, s0, s1, s2 = tab64[:, 3:8].T
    # Bounding sphere (centre height cy, radius rad) of every object.
    cy = np.where(kind == 2, s1, np.where(kind == 1, s0, s1 / 2))
    rad = (
        np.where(
            kind == 1,
            s0,
            np.where(kind == 2, np.sqrt(s0**2 + s1**2 + s2**2), np.hypot(s0, s1 / 2)),
        )
        * 1.01
    )
    # Project the 8 corners of the sphere's bounding cube: the object's image lies in
    # the projections' bounding rectangle when every corner is in front of the camera.
    signs = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)])
    rel = np.stack([x, cy - oy[si, 0], z], -1)[:, None, :] + signs * rad[:, None, None]
    right, down, fwd = (a[si][:, None, :] for a in axes)
    xc, yc, zc = ((rel * a).sum(-1) for a in (right, down, fwd))
    cams = [scenes[i].camera for i in si]
    focal = np.array([c.focal for c in cams])[:, None]
    pcx = np.array([c.cx for c in cams])[:, None]
    pcy = np.array([c.cy for c in cams])[:, None]
    in_front = (zc > 1e-3).all(-1)
    zc = np.where(zc > 1e-3, zc, 1.0)
    col = (pcx + focal * xc / zc) * (w / 2) + w / 2 - 0.5
    row = (pcy + focal * yc / zc) * (w / 2) + h / 2 - 0.5
    j0 = np.where(in_front, np.floor(col.min(-1)) - 1, 0).clip(0, w).astype(np.int64)
    j1 = (
        np.where(in_front, np.ceil(col.max(-1)) + 1, w - 1)
        .clip(-1, w - 1)
        .astype(np.int64)
    )
    i0 = np.where(in_front, np.floor(row.min(-1)) - 1, 0).clip(0, h).astype(np.int64)
    i1 = (
        np.where(in_front, np.ceil(row.max(-1)) + 1, h - 1)
        .clip(-1, h - 1)
        .astype(np.int64)
    )
    nw, nh = np.maximum(j1 - j0 + 1, 0), np.maximum(i1 - i0 + 1, 0)
    cnt = nw * nh
    owner = np.repeat(np.arange(len(tab)), cnt)
    local = np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    ii = i0[owner] + local // nw[owner]
    jj = j0[owner] + local % nw[owner]
    pix = si[owner] * (h * w) + ii * w + jj
    t = np.full(pix.shape, np.inf, dt)
    face = np.zeros(pix.shape, np.int8)
    params = tab[:, 3:9]
    for k in (1, 2, 3):
        sel = np.nonzero(kind[owner] == k)[0]
        if sel.size == 0:
            continue
        p = params[owner[sel]]
        ray = [a.reshape(-1)[pix[sel]] for a in d]
        t[sel], face[sel] = _intersect(k, ray, oy[si[owner[sel]], 0], p)
    return pix, t, owner, face


def _intersect(kind, d, oy, p):
    """Hit distance and face code of rays ``o + t d`` (o = (0, oy, 0)), one per row.

    ``p`` holds the object's x, z, size (3) and yaw per ray, float32.
    """
    dt = np.float32
    inf = dt(np.inf)
    cx, cz, s0, s1, s2, yaw = p.T
    if kind == 1:  # sphere: |o + t d - c|^2 = r^2 with c = (cx, r, cz)
        ocx, ocy, ocz = -cx, oy - s0, -cz
        b = d[0] * ocx + d[1] * ocy + d[2] * ocz
        a = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
        c = ocx * ocx + ocy * ocy + ocz * ocz - s0 * s0
        disc = b * b - a * c
        t = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / a, inf)
        return np.where(t > 0, t, inf), np.zeros(t.shape, np.int8)
    if kind == 2:  # box: slabs in the box frame (rotated by -yaw about y)
        cyaw, syaw = np.cos(yaw), np.sin(yaw)
        lox = -(cx * cyaw) - cz * syaw
        loz = cx * syaw - cz * cyaw
        ldx = d[0] * cyaw + d[2] * syaw
        ldz = -d[0] * syaw + d[2] * cyaw
        tn, tf = np.full_like(ldx, -inf), np.full_like(ldx, inf)
        face = np.zeros(ldx.shape, np.int8)
        slabs = ((lox, ldx, s0), (oy - s1, d[1], s1), (loz, ldz, s2))
        for axis, (lo, ld, half) in enumerate(slabs, start=1):
            safe = np.where(ld == 0, dt(1e-30), ld)
            t1, t2 = (-half - lo) / safe, (half - lo) / safe
            near = np.minimum(t1, t2)
            better = near > tn
            face = np.where(better, np.where(t1 < t2, -axis, axis), face).astype(
                np.int8
            )
            tn = np.where(better, near, tn)
            tf = np.minimum(tf, np.maximum(t1, t2))
        return np.where((tn <= tf) & (tn > 0), tn, inf), face
    # upright cylinder: side (x - cx)^2 + (z - cz)^2 = r^2 for 0 <= y <= height,
    # plus the top cap y = height
    a = d[0] * d[0] + d[2] * d[2]
    b = d[0] * (-cx) + d[2] * (-cz)
    c = cx * cx + cz * cz - s0 * s0
    disc = b * b - a * c
    ts = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / a, inf)
    ys = oy + ts * d[1]
    ts = np.where((ys >= 0) & (ys <= s1) & (ts > 0), ts, inf)
    down = d[1] < 0
    tc = np.where(down, (s1 - oy) / np.where(down, d[1], -1), inf)
    xc, zc = tc * d[0] - cx, tc * d[2] - cz
    tc = np.where((xc * xc + zc * zc <= s0 * s0) & (tc > 0), tc, inf)
    return np.minimum(ts, tc), np.where(tc < ts, 2, 0).astype(np.int8)


def render_batch(
    scenes: list[Scene], size: int | tuple[int, int] = 64, object_ids: bool = False
) -> dict[str, np.ndarray]:
    """Render several scenes at once (vectorised); same keys as :func:`render_scenes`.

    With ``object_ids=True`` the result also holds ``"object_id"`` (N, H, W): the
    index in ``scene.objects`` of the object each pixel sees, -1 for floor and wall.
    """
    h, w = _image_size(size)
    parts = [
        _render_chunk(list(scenes[i : i + _CHUNK]), h, w)
        for i in range(0, len(scenes), _CHUNK)
    ]
    if not parts:
        parts = [_empty(h, w)]
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if not object_ids:
        del out["object_id"]
    return out


def _empty(h: int, w: int) -> dict[str, np.ndarray]:
    return {
        "image": np.zeros((0, h, w, 3), np.float32),
        "segmentation": np.zeros((0, h, w), np.int32),
        "depth": np.zeros((0, h, w, 1), np.float32),
        "normal": np.zeros((0, h, w, 3), np.float32),
        "count": np.zeros((0,), np.int32),
        "object_id": np.zeros((0, h, w), np.int32),
    }


def render(scene: Scene, size: int | tuple[int, int] = 64) -> dict[str, np.ndarray]:
    """Render one scene: the arrays of :func:`render_scenes` without the batch axis."""
    return {k: v[0] for k, v in render_batch([scene], size).items()}


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of ``seed``: depends only on (seed, index)."""
    return np.random.default_rng([int(seed), int(index)])


def sample_scenes(
    n: int, seed: int = 0, start: int = 0, layout: str | Layout = "default"
) -> list[Scene]:
    """Scenes ``start .. start + n - 1`` of ``seed`` (see :func:`sample_scene`)."""
    if int(n) != n or n < 0:
        raise ValueError(f"number of scenes must be an integer >= 0, got {n!r}")
    layout = _layout(layout)
    return [
        sample_scene(scene_rng(seed, i), layout) for i in range(start, start + int(n))
    ]


def render_scenes(
    n: int,
    size: int | tuple[int, int] = 64,
    seed: int = 0,
    layout: str | Layout = "default",
    object_ids: bool = False,
) -> dict[str, np.ndarray]:
    """Sample and render ``n`` scenes of the benchmark.

    Parameters
    ----------
    n:
        Number of scenes (>= 0). Scene ``i`` depends only on ``(seed, i)``, so the
        first ``k`` scenes of ``render_scenes(n, seed=s)`` do not depend on ``n``.
    size:
        Image side in pixels (int) or ``(height, width)``; at least ``MIN_SIZE``.
    seed:
        Seed of the benchmark split (use different seeds for train and test).
    layout:
        Object ranges: a name of :data:`LAYOUTS` (``"default"`` or ``"near"``) or a
        :class:`Layout`.
    object_ids:
        Also return the instance map ``object_id``. It does not change the other
        arrays; :mod:`mtl_utils.augment` uses it to recount ``count`` after a crop.

    Returns
    -------
    dict
        ``image`` (N, H, W, 3) float32 in [0, 1]; ``segmentation`` (N, H, W) int32
        class ids of ``CLASS_NAMES``; ``depth`` (N, H, W, 1) float32 camera-z;
        ``normal`` (N, H, W, 3) float32 unit camera-frame normals; ``count`` (N,)
        int32 number of visible objects; with ``object_ids=True`` also
        ``object_id`` (N, H, W) int32, the index in ``scene.objects`` of the object
        each pixel sees, -1 for floor and wall.
    """
    _image_size(size)
    return render_batch(sample_scenes(n, seed, layout=layout), size, object_ids)
