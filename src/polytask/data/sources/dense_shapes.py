"""``dense-shapes``: generated scenes for dense multi-task learning (segmentation, depth and
surface normals), with every label following from one generative model (nothing downloaded).

Each scene is a tilted, textured ground plane seen from above (orthographic camera at height
``CAMERA_HEIGHT``) with up to ``max_objects`` solids standing on it: hemispheres, cones and
boxes. Per pixel the visible surface is the highest one; from its height field ``H(x, y)``

* ``depth`` = ``CAMERA_HEIGHT − H`` (0 = no reading at ``depth_holes`` of the pixels, as a
  depth sensor's holes; the ``depth`` task ignores them);
* ``normal`` = ``normalise(−∂H/∂x, −∂H/∂y, 1)`` from the analytic gradient of that surface;
* ``segment`` = the surface's kind: 0 plane, 1 hemisphere, 2 cone, 3 box.

The image is each surface's colour (a random stripe texture on the plane, one colour per
object) lit by a Lambertian light from a random direction, plus noise: shading carries the
shape, so all three tasks can be learnt from it.
"""

from __future__ import annotations

import numpy as np

from polytask.data.sources.common import check_fraction, check_minimums, rng_for
from polytask.data.sources.registry import DATASETS
from polytask.data.table import MultiLabelTable
from polytask.tasks import TaskSpec

CAMERA_HEIGHT = 3.0
SEGMENT_CLASSES = ("plane", "hemisphere", "cone", "box")
CONE_SLOPE = 1.5  # height per unit of radius
PLANE_OFFSET = 0.7  # the tilted plane (slopes up to ±0.3 per axis) stays above height 0


def dense_shapes_tasks() -> list[TaskSpec]:
    """The three dense tasks of ``dense-shapes``."""
    return [
        TaskSpec("segment", "segmentation", num_classes=len(SEGMENT_CLASSES)),
        TaskSpec("depth", "depth"),
        TaskSpec("normal", "normals", num_classes=3),
    ]


def _object_surface(
    kind: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    radius: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One object per scene (arrays over scenes ``[N, 1, 1]``): its height above the plane, the
    gradient of that height and where it covers the pixel grid ``x, y`` (``[1, S, S]``)."""
    dx, dy = x - cx, y - cy
    dist = np.sqrt(dx**2 + dy**2)
    sphere_h = np.sqrt(np.clip(radius**2 - dist**2, (0.2 * radius) ** 2, None))
    cone_h = CONE_SLOPE * (radius - dist)
    safe = np.maximum(dist, 1e-6)
    box = np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * radius
    is_sphere, is_cone, is_box = kind == 1, kind == 2, kind == 3
    height = np.where(is_sphere, sphere_h, np.where(is_cone, cone_h, 0.9 * radius))
    grad_x = np.where(is_sphere, -dx / sphere_h, np.where(is_cone, -CONE_SLOPE * dx / safe, 0.0))
    grad_y = np.where(is_sphere, -dy / sphere_h, np.where(is_cone, -CONE_SLOPE * dy / safe, 0.0))
    covers = np.where(is_box, box, dist < radius)
    return height, grad_x, grad_y, covers


def render_scenes(
    num_samples: int, size: int, max_objects: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """``num_samples`` scenes of ``size``² pixels: ``height``, ``grad`` ``[N, 2, S, S]``,
    ``segment`` and per-pixel ``colour`` ``[N, 3, S, S]`` (before lighting)."""
    n = num_samples
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    x, y = coords[None, None, :], coords[None, :, None]
    tilt = rng.uniform(-0.3, 0.3, (n, 2, 1, 1))
    height = tilt[:, 0] * x + tilt[:, 1] * y + PLANE_OFFSET
    grad = np.broadcast_to(tilt, (n, 2, size, size)).copy()
    segment = np.zeros((n, size, size), dtype=np.int64)
    phase, freq = rng.uniform(0, 2 * np.pi, (n, 1, 1)), rng.uniform(8, 20, (n, 1, 1))
    angle = rng.uniform(0, np.pi, (n, 1, 1))
    stripes = 0.5 + 0.5 * np.sin(freq * (np.cos(angle) * x + np.sin(angle) * y) + phase)
    base = rng.uniform(0.2, 0.8, (n, 3, 1, 1))
    colour = base * (0.6 + 0.4 * stripes[:, None])
    count = rng.integers(1, max_objects + 1, n)
    for slot in range(max_objects):
        kind = rng.integers(1, len(SEGMENT_CLASSES), (n, 1, 1))
        cx, cy = rng.uniform(0.15, 0.85, (2, n, 1, 1))
        radius = rng.uniform(0.12, 0.26, (n, 1, 1))
        obj_h, obj_gx, obj_gy, covers = _object_surface(kind, cx, cy, radius, x, y)
        plane_here = tilt[:, 0] * cx + tilt[:, 1] * cy + PLANE_OFFSET
        total = plane_here + obj_h  # objects stand on the plane under their centre
        visible = covers & (total > height) & (slot < count)[:, None, None]
        height = np.where(visible, total, height)
        grad = np.where(visible[:, None], np.stack([obj_gx, obj_gy], 1), grad)
        segment = np.where(visible, kind, segment)
        colour = np.where(visible[:, None], rng.uniform(0.3, 1.0, (n, 3, 1, 1)), colour)
    return {"height": height, "grad": grad, "segment": segment, "colour": colour}


@DATASETS.register("dense-shapes", "generated scenes: segmentation, depth and surface normals")
def dense_shapes(
    *,
    seed: int,
    num_samples: int = 1200,
    size: int = 32,
    max_objects: int = 4,
    depth_holes: float = 0.02,
    noise: float = 0.03,
) -> MultiLabelTable:
    """``num_samples`` ``size``×``size`` RGB scenes with a segmentation map (4 classes), a depth
    map (0 at the holes) and unit surface normals, all from one height field per scene."""
    check_minimums(
        "dense-shapes",
        {"num_samples": (num_samples, 10), "size": (size, 8), "max_objects": (max_objects, 1)},
    )
    check_fraction("depth_holes", depth_holes)
    rng = rng_for(seed, 0)
    scene = render_scenes(num_samples, size, max_objects, rng)
    normal = np.concatenate([-scene["grad"], np.ones_like(scene["grad"][:, :1])], axis=1)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    light = rng.normal(size=(num_samples, 3, 1, 1)) * np.array([0.6, 0.6, 0.0])[:, None, None]
    light[:, 2] = 1.0
    light /= np.linalg.norm(light, axis=1, keepdims=True)
    shade = np.clip((normal * light).sum(axis=1, keepdims=True), 0.0, 1.0)
    image = scene["colour"] * (0.25 + 0.75 * shade) + rng.normal(0, noise, scene["colour"].shape)
    depth = (CAMERA_HEIGHT - scene["height"])[:, None]
    depth[rng.random(depth.shape) < depth_holes] = 0.0
    return MultiLabelTable(
        inputs=np.clip(image, 0.0, 1.0).astype(np.float32),
        targets={
            "segment": scene["segment"],
            "depth": depth.astype(np.float32),
            "normal": normal.astype(np.float32),
        },
        tasks=dense_shapes_tasks(),
        source="dense-shapes",
    )
