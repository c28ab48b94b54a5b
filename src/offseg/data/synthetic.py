"""A small procedurally generated street-scene dataset, for demos and tests without downloads.

Each image is a street seen from the road: sky with clouds, a row of buildings with windows,
a road in perspective with lane marks, tiled sidewalks, and trees, poles, people and cars
scaled by their distance. Classes differ in colour, texture, shape and place, so a small model
learns them in minutes on a CPU, while noise, lighting and random layouts keep it from being
trivial. Everything is drawn from a generator seeded by (seed, split, index): the same
arguments always give the same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .labels import dataset_info, write_classes_file

SYNTHETIC_CLASSES = ("sky", "building", "road", "sidewalk", "tree", "car", "person", "pole")
SKY, BUILDING, ROAD, SIDEWALK, TREE, CAR, PERSON, POLE = range(len(SYNTHETIC_CLASSES))

_FACADES = np.array([[150, 78, 62], [196, 180, 150], [120, 122, 128], [212, 200, 178], [112, 86, 70], [170, 150, 130]])
_CAR_PAINTS = np.array(
    [[180, 25, 30], [30, 60, 160], [225, 225, 225], [25, 25, 30], [160, 165, 170], [220, 180, 30], [40, 120, 70]]
)
_SHIRTS = np.array(
    [[200, 40, 40], [40, 90, 190], [240, 200, 40], [40, 160, 80], [230, 230, 230], [150, 60, 160], [250, 130, 30]]
)
_TROUSERS = np.array([[30, 40, 80], [25, 25, 25], [90, 70, 50], [70, 70, 75]])
_SKIN = np.array([[235, 200, 170], [200, 150, 110], [140, 95, 65], [90, 60, 45]])


class _Canvas:
    """An image and its label map, painted back to front."""

    def __init__(self, height: int, width: int, rng: np.random.Generator):
        self.height, self.width, self.rng = height, width, rng
        self.image = np.zeros((height, width, 3), dtype=np.float32)
        self.label = np.zeros((height, width), dtype=np.uint8)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        self.ys, self.xs = ys, xs

    def paint(self, mask: np.ndarray, class_id: int, colour) -> None:
        colour = np.asarray(colour, dtype=np.float32)
        self.image[mask] = colour[mask] if colour.ndim == 3 else colour
        self.label[mask] = class_id

    def smooth_noise(self, cells_y: int, cells_x: int) -> np.ndarray:
        """Noise in [0, 1] that varies over about `cells` blobs per side (bilinear upsampling)."""
        coarse = self.rng.random((cells_y, cells_x)).astype(np.float32)
        return np.asarray(Image.fromarray(coarse).resize((self.width, self.height), Image.Resampling.BILINEAR))

    def disc(self, cy: float, cx: float, radius: float) -> np.ndarray:
        return (self.ys - cy) ** 2 + (self.xs - cx) ** 2 <= radius**2

    def box(self, top: float, bottom: float, left: float, right: float) -> np.ndarray:
        return (self.ys >= top) & (self.ys < bottom) & (self.xs >= left) & (self.xs < right)


def _jitter(rng: np.random.Generator, colour, amount: float = 12.0) -> np.ndarray:
    return np.clip(np.asarray(colour, dtype=np.float32) + rng.normal(0, amount, 3), 0, 255)


def render_scene(rng: np.random.Generator, height: int = 128, width: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """One street scene: uint8 RGB image (H, W, 3) and its label map (H, W) with ids 0..7."""
    c = _Canvas(height, width, rng)
    ys, xs = c.ys, c.xs
    horizon = rng.uniform(0.36, 0.5) * height
    vanish_x = rng.uniform(0.3, 0.7) * width
    depth = np.maximum(ys - horizon, 0.0)  # grows towards the viewer below the horizon

    # Sky: vertical gradient, sometimes hazy, with soft clouds.
    top, low = _jitter(rng, (55, 105, 200), 15), _jitter(rng, (175, 205, 238), 10)
    if rng.random() < 0.25:  # overcast
        top, low = _jitter(rng, (120, 135, 160), 10), _jitter(rng, (190, 195, 205), 8)
    t = np.clip(ys / max(horizon, 1.0), 0, 1)[..., None]
    sky = top * (1 - t) + low * t
    clouds = np.clip((c.smooth_noise(9, 6) - 0.55) * 3.0, 0, 1)[..., None]
    sky = sky * (1 - clouds) + np.float32(245) * clouds
    c.paint(np.ones((height, width), dtype=bool), SKY, sky)

    # Buildings: a row of facades standing on the horizon, taller towards the image sides.
    x = rng.uniform(-0.1, 0.0) * width
    while x < width:
        w = rng.uniform(0.12, 0.3) * width
        centre_offset = abs(x + w / 2 - vanish_x) / width
        rise = (rng.uniform(0.15, 0.45) + 0.9 * centre_offset) * horizon
        if rng.random() < 0.85:  # the rest are gaps showing the sky
            facade = _jitter(rng, _FACADES[rng.integers(len(_FACADES))], 14)
            mask = c.box(horizon - rise, horizon + 2, x, x + w)
            period_x, period_y = rng.uniform(5, 10), rng.uniform(6, 12)
            windows = (((xs - x) % period_x) < 0.55 * period_x) & (((ys - horizon + rise) % period_y) < 0.5 * period_y)
            windows &= c.box(horizon - rise + 3, horizon - 3, x + 2, x + w - 2)
            lit = c.smooth_noise(6, 8) > 0.7
            colour = np.broadcast_to(facade, (height, width, 3)).copy()
            colour[windows] = np.where(lit[windows][:, None], (230, 205, 120), (45, 55, 75))
            colour += rng.normal(0, 5, (height, width, 1)).astype(np.float32)
            c.paint(mask, BUILDING, colour)
        x += w

    # Road: a trapezoid from the vanishing point, dark asphalt with dashed centre marks.
    spread = (height - horizon) and width / (height - horizon)
    left_slope, right_slope = rng.uniform(0.35, 0.75) * spread, rng.uniform(0.35, 0.75) * spread
    road_left, road_right = vanish_x - depth * left_slope, vanish_x + depth * right_slope
    ground = ys > horizon
    road = ground & (xs >= road_left) & (xs <= road_right)
    asphalt = _jitter(rng, (80, 80, 84), 8) + rng.normal(0, 7, (height, width, 1)).astype(np.float32)
    centre = vanish_x + depth * (right_slope - left_slope) / 2
    marks = road & (np.abs(xs - centre) < 0.35 + depth * 0.02) & (np.sin(60.0 / (depth + 4.0)) > 0.2)
    asphalt[marks] = _jitter(rng, (230, 225, 200), 5)
    c.paint(road, ROAD, asphalt)

    # Sidewalks: the rest of the ground, light paving with perspective tile joints.
    persp_x = (xs - vanish_x) / (depth + 1.0)
    tiles = ((persp_x * 4.0) % 1.0 < 0.12) | ((40.0 / (depth + 1.0)) % 1.0 < 0.15)
    paving = _jitter(rng, (190, 170, 165), 14) + rng.normal(0, 6, (height, width, 1)).astype(np.float32)
    paving[tiles] *= 0.72
    c.paint(ground & ~road, SIDEWALK, paving)

    # Objects, painted far to near so nearer ones occlude.
    ground_h = height - horizon
    objects = []
    for _ in range(rng.integers(0, 4)):
        objects.append(("tree", rng.uniform(0.15, 1.0)))
    for _ in range(rng.integers(0, 4)):
        objects.append(("pole", rng.uniform(0.1, 1.0)))
    for _ in range(rng.integers(0, 5)):
        objects.append(("person", rng.uniform(0.2, 1.0)))
    for _ in range(rng.integers(0, 5)):
        objects.append(("car", rng.uniform(0.15, 1.1)))
    objects.sort(key=lambda item: item[1])
    for kind, nearness in objects:
        base = horizon + nearness * ground_h
        reach = (base - horizon) * left_slope, (base - horizon) * right_slope
        if kind == "car":
            cx = rng.uniform(vanish_x - 0.8 * reach[0], vanish_x + 0.8 * reach[1])
            _draw_car(c, base, cx, nearness * width * rng.uniform(0.26, 0.36))
            continue
        side = rng.random() < 0.5  # left or right sidewalk
        margin = rng.uniform(0.05, 0.5) * width * nearness
        cx = vanish_x - reach[0] - margin if side else vanish_x + reach[1] + margin
        size = nearness * height
        if kind == "tree":
            _draw_tree(c, base, cx, size * rng.uniform(0.7, 1.1))
        elif kind == "pole":
            _draw_pole(c, base, cx, size * rng.uniform(1.0, 1.5))
        else:
            _draw_person(c, base, cx, size * rng.uniform(0.45, 0.6))

    # Lighting and sensor noise.
    direction = rng.uniform(-1, 1, 2)
    shade = 1.0 + 0.15 * (direction[0] * (xs / width - 0.5) + direction[1] * (ys / height - 0.5))
    image = c.image * shade[..., None] * rng.uniform(0.85, 1.1)
    image += rng.normal(0, rng.uniform(2.0, 6.0), image.shape).astype(np.float32)
    return np.clip(image, 0, 255).round().astype(np.uint8), c.label


def _draw_tree(c: _Canvas, base: float, cx: float, size: float) -> None:
    trunk_w = max(1.0, 0.07 * size)
    c.paint(c.box(base - 0.55 * size, base, cx - trunk_w / 2, cx + trunk_w / 2), TREE, _jitter(c.rng, (90, 60, 40), 10))
    crown = np.zeros_like(c.label, dtype=bool)
    for _ in range(c.rng.integers(3, 6)):
        centre_y, centre_x = base - size * c.rng.uniform(0.6, 0.85), cx + size * c.rng.uniform(-0.2, 0.2)
        crown |= c.disc(centre_y, centre_x, size * c.rng.uniform(0.15, 0.28))
    leaves = _jitter(c.rng, (60, 120, 45), 12) * (0.75 + 0.5 * c.smooth_noise(12, 15))[..., None]
    leaves += c.rng.normal(0, 14, (c.height, c.width, 1)).astype(np.float32)  # mottled foliage
    c.paint(crown, TREE, leaves)


def _draw_pole(c: _Canvas, base: float, cx: float, size: float) -> None:
    width = max(1.0, 0.025 * size)
    metal = _jitter(c.rng, (135, 138, 140), 15)
    c.paint(c.box(base - size, base, cx - width / 2, cx + width / 2), POLE, metal)
    if c.rng.random() < 0.5:  # a lamp arm towards the road
        arm = 0.18 * size * (1 if c.rng.random() < 0.5 else -1)
        c.paint(c.box(base - size, base - size + width, min(cx, cx + arm), max(cx, cx + arm)), POLE, metal)


def _draw_person(c: _Canvas, base: float, cx: float, size: float) -> None:
    rng = c.rng
    legs = _jitter(rng, _TROUSERS[rng.integers(len(_TROUSERS))], 10)
    leg_w = max(1.0, 0.09 * size)
    for offset in (-0.07 * size, 0.07 * size - leg_w):
        c.paint(c.box(base - 0.48 * size, base, cx + offset, cx + offset + leg_w), PERSON, legs)
    torso = (((c.ys - (base - 0.63 * size)) / (0.2 * size)) ** 2 + ((c.xs - cx) / (0.14 * size)) ** 2) <= 1
    c.paint(torso, PERSON, _jitter(rng, _SHIRTS[rng.integers(len(_SHIRTS))], 12))
    c.paint(
        c.disc(base - 0.9 * size, cx, max(1.0, 0.09 * size)), PERSON, _jitter(rng, _SKIN[rng.integers(len(_SKIN))], 8)
    )


def _draw_car(c: _Canvas, base: float, cx: float, width: float) -> None:
    rng = c.rng
    height = 0.55 * width
    paint = _jitter(rng, _CAR_PAINTS[rng.integers(len(_CAR_PAINTS))], 10)
    body = c.box(base - 0.62 * height, base - 0.15 * height, cx - width / 2, cx + width / 2)
    inset = (c.ys - (base - height)) / (0.4 * height)  # 0 at the roof, 1 at the body's top
    cabin = (c.ys >= base - height) & (c.ys < base - 0.6 * height) & (np.abs(c.xs - cx) <= width * (0.3 + 0.12 * inset))
    colour = np.broadcast_to(paint, (c.height, c.width, 3)).copy()
    glass = cabin & (np.abs(c.xs - cx) <= width * (0.26 + 0.12 * inset)) & (c.ys > base - 0.93 * height)
    colour[glass] = _jitter(rng, (45, 60, 80), 8)
    lights = body & (np.abs(np.abs(c.xs - cx) - 0.4 * width) < 0.06 * width)
    lights &= np.abs(c.ys - (base - 0.45 * height)) < 0.05 * height
    colour[lights] = (250, 240, 200)
    c.paint(body | cabin, CAR, colour)
    for wheel_x in (cx - 0.3 * width, cx + 0.3 * width):
        c.paint(c.disc(base - 0.14 * height, wheel_x, max(1.0, 0.14 * height)), CAR, (22, 22, 24))


def generate_synthetic_dataset(
    root: str | Path, num_train: int = 80, num_val: int = 20, size: tuple[int, int] = (128, 160), seed: int = 0
) -> Path:
    """Write the street-scene dataset in the ``folder`` layout and return `root`.

    ROOT/train/images/000000.png, ROOT/train/labels/000000.png (palette PNG with class ids),
    the same under ROOT/val, and ROOT/classes.txt (names and colours). `size` is (H, W).
    Image i of a split depends only on (seed, split, i): more images extend a set, they do not
    change the existing ones. Read it with ``build_dataset("folder", root, split)``.
    """
    root = Path(root)
    height, width = int(size[0]), int(size[1])
    if height < 16 or width < 16:
        raise ValueError(f"size {size} is too small for a street scene (at least 16x16)")
    info = dataset_info("synthetic")
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: info.num_classes] = info.palette
    palette[255] = (0, 0, 0)
    for split_id, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        images, labels = root / split / "images", root / split / "labels"
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        for index in range(int(count)):
            rng = np.random.default_rng([int(seed), split_id, index])
            image, label = render_scene(rng, height, width)
            Image.fromarray(image).save(images / f"{index:06d}.png", compress_level=1)
            label_png = Image.frombytes("P", (width, height), label.tobytes())
            label_png.putpalette(palette.reshape(-1).tolist())
            label_png.save(labels / f"{index:06d}.png", compress_level=1)
    write_classes_file(root / "classes.txt", info.class_names, info.palette)
    return root
