"""The proving-ground world: seeded procedural driving-like scenes whose ground truth is known by
construction (issue 22, item 1; the contract is docs in ``notes/WORLD_API.md``).

Every object class is a triple (shape, texture, colour); identity lies in the three together:

* every colour, every shape and every texture is used by at least two classes (no class is
  decidable from one attribute alone);
* ID classes (the detector's label set, ``calibration/proving_ground/labels.yaml``) come first;
* every near-OOD class shares exactly two attributes with at least one ID class (and never all
  three with any);
* every far-OOD class shares at most one attribute with every ID class.

:func:`check_class_rules` checks these rules (the tests call it).

A scene (:func:`render_scene`) is fully determined by its arguments: a sky gradient, a road in
perspective (asphalt texture, dashed lane marks, kerbs), grass, roadside clutter (poles, trees,
bushes, buildings) drawn only in colours outside the class palette (grey, brown, beige, olive), so
clutter is never a class's triple; 3-10 objects, their sizes (longest side) log-uniform in
``size_range`` with perspective (small ones near the horizon), drawn back to front (partial
occlusion; the hidden fraction is recorded), textures drawn in object coordinates (they scale
with the object, and a 12 px object may lose its texture), then global lighting (brightness,
contrast, gamma, colour cast), optional Gaussian or motion blur and sensor noise.

Boxes are each object's full extent (occluded parts included) clipped to the frame. Objects hidden
more than :data:`MAX_OCCLUSION` or whose clipped box's longest side is under ``size_range[0]``
are never drawn (and so never unlabelled in a frame).

numpy + OpenCV only (no torch, no ROS).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

# --------------------------------------------------------------------------- the classes
SHAPES: Tuple[str, ...] = ("box", "disc", "triangle", "diamond", "cross", "ring", "star")
TEXTURES: Tuple[str, ...] = ("solid", "stripes", "dots", "checker", "waves", "speckle")
#: class colours (RGB). Clutter never uses these (see ``_CLUTTER``).
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (205, 35, 35),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 35),
    "green": (45, 175, 65),
    "white": (238, 238, 238),
    "purple": (145, 50, 180),
    "orange": (250, 135, 25),
}
GROUPS: Tuple[str, ...] = ("id", "near", "far")


@dataclasses.dataclass(frozen=True)
class ObjectClass:
    name: str        # caption / label name, e.g. "traffic cone"
    shape: str
    texture: str
    colour: str
    group: str       # "id" | "near" | "far"

    @property
    def attributes(self) -> Tuple[str, str, str]:
        return (self.shape, self.texture, self.colour)


def _c(name, shape, texture, colour, group) -> ObjectClass:
    return ObjectClass(name, shape, texture, colour, group)


ID_CLASSES: Tuple[ObjectClass, ...] = (
    _c("car", "box", "solid", "red", "id"),
    _c("truck", "box", "checker", "blue", "id"),
    _c("pedestrian", "diamond", "stripes", "green", "id"),
    _c("cyclist", "disc", "dots", "yellow", "id"),
    _c("traffic cone", "triangle", "stripes", "red", "id"),
    _c("road sign", "disc", "solid", "blue", "id"),
)
NEAR_CLASSES: Tuple[ObjectClass, ...] = (
    _c("moose", "diamond", "stripes", "red", "near"),        # pedestrian (shape, texture), cone (texture, colour)
    _c("mattress", "box", "solid", "yellow", "near"),        # car (shape, texture)
    _c("shopping cart", "disc", "dots", "green", "near"),    # cyclist (shape, texture)
    _c("kangaroo", "triangle", "stripes", "green", "near"),  # cone (shape, texture), pedestrian (texture, colour)
    _c("scooter", "disc", "checker", "blue", "near"),        # road sign (shape, colour), truck (texture, colour)
    _c("wheelchair", "box", "dots", "red", "near"),          # car (shape, colour)
)
FAR_CLASSES: Tuple[ObjectClass, ...] = (
    _c("boulder", "ring", "speckle", "white", "far"),
    _c("tire", "cross", "waves", "purple", "far"),
    _c("sofa", "star", "speckle", "orange", "far"),
    _c("barrel", "ring", "waves", "orange", "far"),
    _c("piano", "cross", "speckle", "white", "far"),
    _c("balloon", "star", "waves", "purple", "far"),
)
CLASSES: Tuple[ObjectClass, ...] = ID_CLASSES + NEAR_CLASSES + FAR_CLASSES
CLASS_BY_NAME: Dict[str, ObjectClass] = {c.name: c for c in CLASSES}

#: class draw probability by group (uniform within a group)
GROUP_WEIGHTS: Dict[str, float] = {"id": 0.5, "near": 0.3, "far": 0.2}

#: base seed per split; frame i of a split uses seed ``SPLIT_SEEDS[split] + i`` (splits 10^7 apart)
SPLIT_SEEDS: Dict[str, int] = {
    "clip": 10_000_000,
    "train": 20_000_000,
    "calibration": 30_000_000,
    "test": 40_000_000,
    "gate": 50_000_000,
    "demo": 60_000_000,
}
#: frame sizes (width, height): the first is the default; frame i of a split uses the second when
#: ``i % 4 == 3`` (see :func:`frame_size`)
FRAME_SIZES: Tuple[Tuple[int, int], ...] = ((1280, 720), (960, 720))
MAX_OCCLUSION = 0.7


def shared_attributes(a: ObjectClass, b: ObjectClass) -> int:
    return sum(x == y for x, y in zip(a.attributes, b.attributes))


def check_class_rules(classes: Sequence[ObjectClass] = CLASSES) -> List[str]:
    """The world's rules; returns the list of violations (empty when all hold)."""
    errs: List[str] = []
    ids = [c for c in classes if c.group == "id"]
    if len(classes) < 12:
        errs.append(f"{len(classes)} classes (< 12)")
    if len({c.name for c in classes}) != len(classes):
        errs.append("duplicate class names")
    if len({c.attributes for c in classes}) != len(classes):
        errs.append("two classes share all three attributes")
    order = [GROUPS.index(c.group) for c in classes]
    if any(c.group not in GROUPS for c in classes) or order != sorted(order):
        errs.append("groups must be id, near, far in that order")
    for c in classes:
        if c.shape not in SHAPES or c.texture not in TEXTURES or c.colour not in COLOURS:
            errs.append(f"{c.name}: unknown attribute in {c.attributes}")
    for i, values in enumerate((SHAPES, TEXTURES, tuple(COLOURS))):
        for v in values:
            n = sum(c.attributes[i] == v for c in classes)
            if n == 1:
                errs.append(f"attribute {v!r} used by one class only (decidable alone)")
    for c in classes:
        shared = [shared_attributes(c, i) for i in ids]
        if c.group == "near" and (max(shared) != 2):
            errs.append(f"near-OOD {c.name}: shares {max(shared)} attributes at most with an ID class (needs 2)")
        if c.group == "far" and max(shared) > 1:
            errs.append(f"far-OOD {c.name}: shares {max(shared)} attributes with an ID class (max 1)")
    return errs


def frame_size(index: int) -> Tuple[int, int]:
    """(width, height) of frame ``index`` of a split: 1 in 4 frames uses the second aspect ratio."""
    return FRAME_SIZES[1] if index % 4 == 3 else FRAME_SIZES[0]


def split_frame(split: str, index: int) -> Tuple[int, Tuple[int, int]]:
    """(seed, (width, height)) of frame ``index`` of ``split``."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SEEDS)}")
    return SPLIT_SEEDS[split] + int(index), frame_size(index)


# --------------------------------------------------------------------------- scene
@dataclasses.dataclass
class Scene:
    image: np.ndarray          # H x W x 3 uint8 RGB
    boxes: np.ndarray          # float32 [N, 4] xywh (full extent clipped to the frame)
    classes: List[str]         # N class names
    occlusion: np.ndarray      # float32 [N] fraction hidden by objects in front
    #: candidate objects placed but not drawn, by reason: "outside" (no part in the frame),
    #: "occluded" (hidden more than MAX_OCCLUSION), "small" (clipped box under size_range[0]);
    #: placed = len(classes) + sum(dropped.values())
    dropped: Dict[str, int] = dataclasses.field(default_factory=lambda: {"outside": 0, "occluded": 0, "small": 0})

    @property
    def groups(self) -> List[str]:
        return [CLASS_BY_NAME[c].group for c in self.classes]


# noise banks: fixed (seeded once), cropped at per-frame offsets -> fast and still determined by the seed
_BANK_H, _BANK_W = 1024, 1536
_BANKS: Dict[str, np.ndarray] = {}


def _banks() -> Dict[str, np.ndarray]:
    import cv2

    if len(_BANKS) < 4:  # built once, into a local dict first (threads never see half a bank set)
        banks: Dict[str, np.ndarray] = {}
        r = np.random.default_rng(1234567)
        n = r.normal(0.0, 1.0, (_BANK_H, _BANK_W, 3)).astype(np.float32)
        banks["sensor_pos"] = np.clip(n * 8, 0, 255).astype(np.uint8)
        banks["sensor_neg"] = np.clip(-n * 8, 0, 255).astype(np.uint8)
        g = r.normal(0.0, 1.0, (_BANK_H, _BANK_W)).astype(np.float32) * 10
        g += cv2.resize(r.normal(0.0, 1.0, (_BANK_H // 32, _BANK_W // 32)).astype(np.float32),
                        (_BANK_W, _BANK_H), interpolation=cv2.INTER_CUBIC) * 10
        g = cv2.merge([g, g, g])
        banks["grain_pos"] = np.clip(g, 0, 255).astype(np.uint8)
        banks["grain_neg"] = np.clip(-g, 0, 255).astype(np.uint8)
        _BANKS.update(banks)
    return _BANKS


def _crop(bank: np.ndarray, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    if h > bank.shape[0] or w > bank.shape[1]:
        reps = (-(-h // bank.shape[0]), -(-w // bank.shape[1])) + (1,) * (bank.ndim - 2)
        bank = np.tile(bank, reps)
    y = int(rng.integers(0, bank.shape[0] - h + 1))
    x = int(rng.integers(0, bank.shape[1] - w + 1))
    return bank[y:y + h, x:x + w]


def _jitter(rgb, rng, amount) -> Tuple[int, int, int]:
    return tuple(int(np.clip(v + rng.uniform(-amount, amount), 0, 255)) for v in rgb)


# clutter colours: never class colours (grey, brown, beige, olive, dark slate)
_CLUTTER = {
    "grey": (128, 128, 124), "dark_grey": (78, 80, 82), "brown": (110, 78, 50), "beige": (196, 180, 150),
    "olive": (74, 92, 44), "dark_olive": (50, 68, 34), "slate": (92, 100, 112), "tan": (165, 140, 105),
}


def _draw_background(rng: np.random.Generator, width: int, height: int):
    """Sky, ground, road, lane marks, clutter. Returns (image, horizon_y, vanish_x, road_slope)."""
    import cv2

    W, H = width, height
    img = np.empty((H, W, 3), np.uint8)
    hy = int(H * rng.uniform(0.36, 0.5))
    # sky: vertical gradient (top colour -> horizon haze)
    top = np.array(_jitter(rng.choice([(70, 120, 200), (110, 140, 180), (150, 160, 170), (60, 90, 150)]),
                           rng, 20), np.float32)
    bottom = np.array(_jitter((200, 210, 220), rng, 25), np.float32)
    t = np.linspace(0.0, 1.0, hy, dtype=np.float32)[:, None]
    col = np.ascontiguousarray((top * (1 - t) + bottom * t).astype(np.uint8)[:, None, :])
    img[:hy] = cv2.resize(col, (W, hy), interpolation=cv2.INTER_NEAREST)
    # ground: grass colour, the road drawn over it
    grass = _jitter((88, 118, 58), rng, 18)  # muted, darker than the class green
    cv2.rectangle(img, (0, hy), (W - 1, H - 1), grass, -1)
    vx = W * rng.uniform(0.35, 0.65)
    slope = rng.uniform(1.3, 2.6)  # road half-width per pixel below the horizon
    bottom_y = H - 1
    hw = (bottom_y - hy) * slope
    asphalt = _jitter((92, 92, 96), rng, 14)
    road = np.array([[vx - 2, hy], [vx + 2, hy], [vx + hw, bottom_y + 1], [vx - hw, bottom_y + 1]], np.int32)
    # kerb / shoulder slightly wider, light grey
    kerb = np.array([[vx - 3, hy], [vx + 3, hy], [vx + hw * 1.08, bottom_y + 1], [vx - hw * 1.08, bottom_y + 1]],
                    np.int32)
    cv2.fillPoly(img, [kerb], _jitter((150, 148, 140), rng, 10))
    cv2.fillPoly(img, [road], asphalt)
    # ground grain / asphalt texture
    b = _banks()
    g = img[hy:]
    cv2.add(g, _crop(b["grain_pos"], rng, H - hy, W), dst=g)
    cv2.subtract(g, _crop(b["grain_neg"], rng, H - hy, W), dst=g)
    # distant treeline / skyline band at the horizon
    band = int(rng.integers(0, 3))
    if band:
        xs = np.arange(0, W + 40, 40)
        heights = rng.uniform(4, 28 if band == 1 else 50, len(xs))
        pts = np.concatenate([np.stack([xs, hy - heights], 1), [[W, hy], [0, hy]]]).astype(np.int32)
        cv2.fillPoly(img, [pts], _CLUTTER["dark_olive"] if band == 1 else _CLUTTER["slate"])
    # dashed lane marks (in depth: dash positions uniform in 1/z)
    lanes = [0.0] + ([-0.5, 0.5] if rng.random() < 0.5 else [])
    phase = rng.uniform(0, 1)
    mark = _jitter((225, 225, 215), rng, 15)
    for lane in lanes:
        for k in range(14):
            z0, z1 = 1.0 / (k + phase + 0.4), 1.0 / (k + phase + 0.9)
            y0, y1 = hy + (H - hy) * z1, hy + (H - hy) * z0
            if y0 >= H:
                continue
            w0, w1 = 0.025 * (y0 - hy) * slope, 0.025 * (y1 - hy) * slope
            x0 = vx + lane * (y0 - hy) * slope
            x1 = vx + lane * (y1 - hy) * slope
            cv2.fillPoly(img, [np.array([[x0 - w0, y0], [x0 + w0, y0], [x1 + w1, y1], [x1 - w1, y1]], np.int32)],
                         mark)
    # roadside clutter: buildings near the horizon, poles, trees, bushes (back to front)
    items = []
    for _ in range(int(rng.integers(2, 9))):
        kind = rng.choice(["building", "pole", "tree", "bush"], p=[0.25, 0.3, 0.25, 0.2])
        depth = rng.uniform(0.02, 0.85) ** 2  # (y - hy) / (H - hy): most far away, none at the camera
        side = rng.choice([-1, 1])
        items.append((depth, kind, side, rng.uniform(1.2, 3.0)))
    for depth, kind, side, lateral in sorted(items):
        yb = hy + (H - hy) * depth
        s = max((yb - hy) * slope, 2.0)  # road half-width at this depth
        x = vx + side * lateral * s
        if kind == "building":
            bw, bh = s * rng.uniform(1.0, 2.5), s * rng.uniform(1.0, 3.0)
            col = _CLUTTER[rng.choice(["beige", "grey", "tan", "brown"])]
            p0 = (int(x - bw / 2), int(yb - bh))
            p1 = (int(x + bw / 2), int(yb))
            cv2.rectangle(img, p0, p1, col, -1)
            nx, ny = int(rng.integers(2, 5)), int(rng.integers(2, 6))
            win = _CLUTTER["dark_grey"]
            for i in range(nx):
                for j in range(ny):
                    cx = p0[0] + (i + 0.5) * bw / nx
                    cy = p0[1] + (j + 0.5) * bh / (ny + 0.5)
                    cv2.rectangle(img, (int(cx - bw / nx * 0.25), int(cy - bh / ny * 0.2)),
                                  (int(cx + bw / nx * 0.25), int(cy + bh / ny * 0.2)), win, -1)
        elif kind == "pole":
            ph = s * rng.uniform(1.5, 3.0)
            pw = max(1, int(s * 0.05))
            col = _CLUTTER[rng.choice(["grey", "dark_grey", "brown"])]
            cv2.rectangle(img, (int(x - pw), int(yb - ph)), (int(x + pw), int(yb)), col, -1)
            if rng.random() < 0.5:  # a lamp arm
                cv2.line(img, (int(x), int(yb - ph)), (int(x - side * s * 0.4), int(yb - ph)), col, max(1, pw))
        elif kind == "tree":
            th = s * rng.uniform(1.2, 2.5)
            tw = max(1, int(s * 0.06))
            cv2.rectangle(img, (int(x - tw), int(yb - th * 0.5)), (int(x + tw), int(yb)), _CLUTTER["brown"], -1)
            cv2.ellipse(img, (int(x), int(yb - th * 0.65)), (max(1, int(th * 0.3)), max(1, int(th * 0.25))), 0, 0,
                        360, _CLUTTER[rng.choice(["olive", "dark_olive"])], -1)
        else:
            r = s * rng.uniform(0.2, 0.5)
            cv2.ellipse(img, (int(x), int(yb - r * 0.5)), (max(1, int(r)), max(1, int(r * 0.6))), 0, 180, 360,
                        _CLUTTER[rng.choice(["olive", "dark_olive"])], -1)
    return img, hy, vx, slope


# --- object masks and textures, in object coordinates
def _shape_mask(shape: str, w: int, h: int, angle: float) -> np.ndarray:
    """uint8 mask (h, w) of ``shape`` filling the (w, h) patch, rotated by ``angle`` rad about its centre."""
    import cv2

    m = np.zeros((h, w), np.uint8)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    rx, ry = (w - 1) / 2.0, (h - 1) / 2.0

    def poly(pts):
        pts = np.asarray(pts, np.float64)
        c, s = np.cos(angle), np.sin(angle)
        x = pts[:, 0] * c - pts[:, 1] * s
        y = pts[:, 0] * s + pts[:, 1] * c
        # rotated shapes are rescaled to keep filling the patch
        sx = rx / max(np.abs(x).max(), 1e-6)
        sy = ry / max(np.abs(y).max(), 1e-6)
        return np.stack([cx + x * sx, cy + y * sy], 1)

    def fill(pts):
        cv2.fillPoly(m, [np.round(pts * 16).astype(np.int32)], 255, cv2.LINE_8, 4)

    if shape == "box":
        fill(poly([[-1, -1], [1, -1], [1, 1], [-1, 1]]))
    elif shape == "disc":
        cv2.ellipse(m, ((cx, cy), (w, h), 0), 255, -1)
    elif shape == "ring":
        cv2.ellipse(m, ((cx, cy), (w, h), 0), 255, -1)
        cv2.ellipse(m, ((cx, cy), (w * 0.45, h * 0.45), 0), 0, -1)
    elif shape == "triangle":
        fill(poly([[0, -1], [1, 1], [-1, 1]]))
    elif shape == "diamond":
        fill(poly([[0, -1], [1, 0], [0, 1], [-1, 0]]))
    elif shape == "cross":
        a = 0.34
        fill(poly([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a],
                   [-1, -a], [-a, -a]]))
    elif shape == "star":
        k = np.arange(10)
        r = np.where(k % 2 == 0, 1.0, 0.45)
        th = -np.pi / 2 + k * np.pi / 5
        fill(poly(np.stack([r * np.cos(th), r * np.sin(th)], 1)))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m


#: (shape) -> range of width / height
_ASPECT = {"box": (1.0, 1.8), "disc": (0.9, 1.1), "ring": (0.9, 1.1), "triangle": (0.85, 1.15),
           "diamond": (0.6, 0.8), "cross": (0.9, 1.1), "star": (0.9, 1.1)}


def _texture(texture: str, w: int, h: int, rng: np.random.Generator, angle: float) -> np.ndarray:
    """float32 (h, w) in [0, 1]: 1 = base colour, 0 = the dark second colour. Object coordinates:
    the pattern's periods are fractions of the object's size, so it scales with the object."""
    import cv2

    if texture == "solid":
        return np.ones((h, w), np.float32)
    s = max(w, h)
    if texture == "speckle":
        # blobs of a random low-resolution field (n cells across the longest side); one cell of
        # margin each side, cropped off, so the blobs do not smear into streaks at the edges
        n = int(rng.integers(7, 11))
        cell = s / n
        low = rng.random((n + 3, n + 3)).astype(np.float32)
        side = int(np.ceil(cell * (n + 3)))
        up = cv2.resize(low, (side, side), interpolation=cv2.INTER_LINEAR)
        oy, ox = int(cell) + (s - h) // 2, int(cell) + (s - w) // 2
        return (up[oy:oy + h, ox:ox + w] > 0.35).astype(np.float32)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    u = (x - w / 2.0) / s
    v = (y - h / 2.0) / s
    c, sn = np.cos(angle), np.sin(angle)
    u, v = u * c + v * sn, -u * sn + v * c
    k = rng.uniform(3.5, 5.5)  # periods across the object's longest side
    if texture == "stripes":
        return (np.sin(2 * np.pi * k * (u + 0.25 * v)) > 0).astype(np.float32)  # slanted stripes
    if texture == "dots":
        fu = (u * k) % 1.0 - 0.5
        fv = (v * k) % 1.0 - 0.5
        return (fu * fu + fv * fv > 0.27 ** 2).astype(np.float32)
    if texture == "checker":
        return ((np.floor(u * k) + np.floor(v * k)) % 2).astype(np.float32)
    if texture == "waves":
        return (np.sin(2 * np.pi * k * (v + 0.1 * np.sin(2 * np.pi * 2.0 * u))) > 0).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}")


@dataclasses.dataclass
class _Obj:
    cls: ObjectClass
    x0: int
    y0: int
    w: int
    h: int
    angle: float
    mask: np.ndarray  # (h, w) uint8
    base_y: float
    extent: Tuple[int, int, int, int] = (0, 0, 0, 0)  # the mask's (x, y, w, h) inside the patch


def _place(rng, cls, W, H, hy, vx, slope, size_range) -> _Obj:
    lo, hi = size_range
    size = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    a0, a1 = _ASPECT[cls.shape]
    aspect = rng.uniform(a0, a1)
    if aspect >= 1:
        w, h = size, size / aspect
    else:
        w, h = size * aspect, size
    w, h = max(int(round(w)), 3), max(int(round(h)), 3)
    # perspective: distance below the horizon proportional to the size (jittered per object)
    ground = H - hy
    base_y = hy + min(max(size / hi * ground * rng.uniform(0.7, 1.35), 2.0), ground + 0.3 * h)
    hw = (base_y - hy) * slope
    lateral = rng.uniform(-2.2, 2.2)
    cx = vx + lateral * hw + rng.normal(0, 0.05 * W)
    x0 = int(round(cx - w / 2))
    y0 = int(round(base_y - h))
    angle = rng.uniform(-0.2, 0.2) if cls.shape not in ("disc", "ring") else 0.0
    import cv2

    mask = _shape_mask(cls.shape, w, h, angle)
    return _Obj(cls, x0, y0, w, h, angle, mask, base_y, tuple(int(v) for v in cv2.boundingRect(mask)))


def _clip(o: _Obj, W, H):
    """Frame-clipped (x0, y0, x1, y1) of the object's mask extent; None when no part is in the frame."""
    ex, ey, ew, eh = o.extent
    if ew <= 0 or eh <= 0:
        return None
    gx0, gx1 = o.x0 + ex, o.x0 + ex + ew
    gy0, gy1 = o.y0 + ey, o.y0 + ey + eh
    cx0, cy0, cx1, cy1 = max(gx0, 0), max(gy0, 0), min(gx1, W), min(gy1, H)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    return cx0, cy0, cx1, cy1


def _occlusion(objs: List[_Obj], W, H):
    """Fraction of every object's in-frame mask area hidden by objects drawn after it."""
    idmap = np.full((H, W), -1, np.int16)
    parts = []
    for i, o in enumerate(objs):
        x0, y0 = max(o.x0, 0), max(o.y0, 0)
        x1, y1 = min(o.x0 + o.w, W), min(o.y0 + o.h, H)
        if x1 <= x0 or y1 <= y0:
            parts.append(None)
            continue
        m = o.mask[y0 - o.y0:y1 - o.y0, x0 - o.x0:x1 - o.x0] > 0
        parts.append((x0, y0, x1, y1, m))
        idmap[y0:y1, x0:x1][m] = i
    occ = np.ones(len(objs), np.float32)
    for i, part in enumerate(parts):
        if part is None:
            continue
        x0, y0, x1, y1, m = part
        area = np.count_nonzero(m)
        if area:
            occ[i] = 1.0 - np.count_nonzero(idmap[y0:y1, x0:x1][m] == i) / area
    return occ


def _draw_object(img: np.ndarray, o: _Obj, rng: np.random.Generator) -> None:
    import cv2

    H, W = img.shape[:2]
    x0, y0 = max(o.x0, 0), max(o.y0, 0)
    x1, y1 = min(o.x0 + o.w, W), min(o.y0 + o.h, H)
    if x1 <= x0 or y1 <= y0:
        return
    # contact shadow on the ground
    sh_w = max(int(o.w * 0.55), 1)
    sh_h = max(int(o.h * 0.08), 1)
    by = int(o.y0 + o.h)
    sx0, sx1 = max(o.x0 + o.w // 2 - sh_w, 0), min(o.x0 + o.w // 2 + sh_w, W)
    sy0, sy1 = max(by - sh_h, 0), min(by + sh_h, H)
    if sx1 > sx0 and sy1 > sy0:
        sm = np.zeros((sy1 - sy0, sx1 - sx0), np.uint8)
        cv2.ellipse(sm, (o.x0 + o.w // 2 - sx0, by - sy0), (sh_w, sh_h), 0, 0, 360, 1, -1)
        reg = img[sy0:sy1, sx0:sx1]
        reg[sm > 0] = (reg[sm > 0] * 0.55).astype(np.uint8)
    base = np.array(_jitter(COLOURS[o.cls.colour], rng, 14), np.float32)
    dark = base * rng.uniform(0.25, 0.4)
    tex = _texture(o.cls.texture, o.w, o.h, rng, o.angle + rng.uniform(-0.3, 0.3))
    # soft shading: lighter top-left, darker bottom-right
    shade = np.linspace(rng.uniform(1.0, 1.12), rng.uniform(0.75, 0.92), o.h, dtype=np.float32)[:, None]
    tex3 = tex[..., None]
    patch = (dark + (base - dark) * tex3) * shade[..., None]
    patch = np.clip(patch, 0, 255).astype(np.uint8)
    sl = (slice(y0 - o.y0, y1 - o.y0), slice(x0 - o.x0, x1 - o.x0))
    m = o.mask[sl] > 0
    reg = img[y0:y1, x0:x1]
    reg[m] = patch[sl][m]
    if o.w >= 24 and rng.random() < 0.7:  # a thin dark outline
        cnts, _ = cv2.findContours(o.mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(img, cnts, -1, tuple(int(v) for v in dark * 0.8), 1, offset=(o.x0, o.y0))


def _finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Global lighting (brightness, contrast, gamma, colour cast), blur, sensor noise."""
    import cv2

    H, W = img.shape[:2]
    gain = rng.uniform(0.65, 1.25)
    contrast = rng.uniform(0.75, 1.2)
    gamma = rng.uniform(0.75, 1.35)
    cast = 1.0 + rng.normal(0, 0.06, 3)
    x = np.arange(256, dtype=np.float32) / 255.0
    luts = []
    for ch in range(3):
        y = (x - 0.5) * contrast + 0.5
        y = np.clip(y * gain * cast[ch], 0, 1) ** gamma
        luts.append(np.clip(y * 255 + 0.5, 0, 255).astype(np.uint8))
    lut = np.stack(luts, 1).reshape(256, 1, 3)
    img = cv2.LUT(img, lut)
    r = rng.random()
    if r < 0.25:
        sigma = rng.uniform(0.6, 1.6)
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    elif r < 0.4:
        k = int(rng.integers(5, 12))
        kern = np.zeros((k, k), np.float32)
        a = rng.uniform(-0.3, 0.3)  # mostly horizontal (ego motion / panning)
        c, s = np.cos(a), np.sin(a)
        for t in np.linspace(-(k - 1) / 2, (k - 1) / 2, k * 2):
            kern[int(round((k - 1) / 2 + t * s)), int(round((k - 1) / 2 + t * c))] = 1
        img = cv2.filter2D(img, -1, kern / kern.sum())
    if rng.random() < 0.8:
        b = _banks()
        level = rng.uniform(0.3, 1.4)
        cv2.addWeighted(img, 1.0, _crop(b["sensor_pos"], rng, H, W), level, 0.0, dst=img)
        cv2.addWeighted(img, 1.0, _crop(b["sensor_neg"], rng, H, W), -level, 0.0, dst=img)
    return img


def render_scene(seed: int, width: int = 1280, height: int = 720, *, classes: Optional[Sequence[str]] = None,
                 n_objects: Optional[int] = None, size_range: Tuple[float, float] = (12, 300)) -> Scene:
    """One scene, fully determined by its arguments (``np.random.default_rng(seed)``).

    Args:
        seed: the scene's seed (frame i of a split: ``SPLIT_SEEDS[split] + i``).
        width, height: frame size in pixels.
        classes: restrict the objects to these class names (group weights renormalised over the
            groups present; uniform within a group).
        n_objects: objects to place (default 3-10 from the seed); best effort: candidates hidden
            more than :data:`MAX_OCCLUSION` or too small after clipping are replaced, a few times.
        size_range: (min, max) longest side in pixels, log-uniform.
    """
    if width < 32 or height < 32:
        raise ValueError(f"frame {width}x{height} too small (>= 32x32)")
    lo, hi = float(size_range[0]), float(size_range[1])
    if not (0 < lo <= hi):
        raise ValueError(f"size_range must be 0 < min <= max, got {size_range}")
    pool = list(CLASSES) if classes is None else [CLASS_BY_NAME[n] for n in classes if n in CLASS_BY_NAME]
    if classes is not None:
        unknown = [n for n in classes if n not in CLASS_BY_NAME]
        if unknown:
            raise ValueError(f"unknown class names {unknown}; expected some of {sorted(CLASS_BY_NAME)}")
    if not pool:
        raise ValueError("classes: empty")
    counts = {g: sum(c.group == g for c in pool) for g in GROUPS}
    probs = np.array([GROUP_WEIGHTS[c.group] / counts[c.group] for c in pool], np.float64)
    probs /= probs.sum()

    rng = np.random.default_rng(int(seed))
    W, H = int(width), int(height)
    img, hy, vx, slope = _draw_background(rng, W, H)
    n = int(rng.integers(3, 11)) if n_objects is None else int(n_objects)

    kept: List[_Obj] = []
    dropped = {"outside": 0, "occluded": 0, "small": 0}
    for _round in range(4):
        need = n - len(kept)
        if need <= 0:
            break
        cand = kept + [_place(rng, pool[int(rng.choice(len(pool), p=probs))], W, H, hy, vx, slope, (lo, hi))
                       for _ in range(need)]
        cand.sort(key=lambda o: o.base_y)  # back to front
        occ = _occlusion(cand, W, H)
        kept = []
        for o, oc in zip(cand, occ):
            box = _clip(o, W, H)
            reason = ("outside" if box is None else "occluded" if oc > MAX_OCCLUSION
                      else "small" if max(box[2] - box[0], box[3] - box[1]) < lo else None)
            if reason:
                dropped[reason] += 1
            else:
                kept.append(o)
    occ = _occlusion(kept, W, H) if kept else np.zeros(0, np.float32)
    boxes = []
    for o in kept:
        _draw_object(img, o, rng)
        x0, y0, x1, y1 = _clip(o, W, H)
        boxes.append((x0, y0, x1 - x0, y1 - y0))
    img = _finish(img, rng)
    return Scene(image=img, boxes=np.asarray(boxes, np.float32).reshape(-1, 4), classes=[o.cls.name for o in kept],
                 occlusion=np.asarray(occ, np.float32).reshape(-1), dropped=dropped)


def render_object(name: str, size: int = 128, *, seed: int = 0,
                  background: Tuple[int, int, int] = (128, 128, 128)) -> np.ndarray:
    """One object of class ``name`` (longest side ``size`` px, drawn as in scenes, no lighting or
    noise) centred on a ``size + 16`` px square of ``background``: an RGB uint8 tile (the class atlas)."""
    import cv2

    if name not in CLASS_BY_NAME:
        raise ValueError(f"unknown class {name!r}; expected one of {sorted(CLASS_BY_NAME)}")
    cls = CLASS_BY_NAME[name]
    rng = np.random.default_rng(int(seed))
    a0, a1 = _ASPECT[cls.shape]
    aspect = (a0 + a1) / 2
    w, h = (size, int(round(size / aspect))) if aspect >= 1 else (int(round(size * aspect)), size)
    side = size + 16
    tile = np.empty((side, side, 3), np.uint8)
    tile[:] = background
    mask = _shape_mask(cls.shape, w, h, 0.0)
    o = _Obj(cls, (side - w) // 2, (side - h) // 2, w, h, 0.0, mask, float((side + h) // 2),
             tuple(int(v) for v in cv2.boundingRect(mask)))
    _draw_object(tile, o, rng)
    return tile


# --------------------------------------------------------------------------- splits
LABELS_PATH = pathlib.Path(__file__).resolve().parents[2] / "calibration" / "proving_ground" / "labels.yaml"


def write_split(out_dir, split: str, n_frames: int, *, progress: bool = True, jpeg_quality: int = 92) -> pathlib.Path:
    """Write ``n_frames`` frames of ``split`` as ``out_dir/<split>/images/*.jpg`` and
    ``out_dir/<split>/annotations.json`` (plain COCO plus ``group``/``occlusion`` per annotation
    and shape/texture/colour/group per category); returns the annotation path."""
    import cv2
    from tqdm import tqdm

    if n_frames < 0:
        raise ValueError(f"n_frames must be >= 0, got {n_frames}")
    root = pathlib.Path(out_dir) / split
    (root / "images").mkdir(parents=True, exist_ok=True)
    cat_id = {c.name: i + 1 for i, c in enumerate(CLASSES)}
    images, anns = [], []
    dropped = {"outside": 0, "occluded": 0, "small": 0}
    for i in tqdm(range(n_frames), desc=f"proving-ground {split}", unit="frame", disable=not progress):
        seed, (w, h) = split_frame(split, i)
        sc = render_scene(seed, w, h)
        name = f"images/{split}_{i:06d}.jpg"
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(sc.image, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
        if not ok:
            raise OSError(f"JPEG encoding failed for frame {i}")
        (root / name).write_bytes(buf.tobytes())
        for k, v in sc.dropped.items():
            dropped[k] += v
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h, "seed": seed})
        for b, c, oc in zip(sc.boxes, sc.classes, sc.occlusion):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat_id[c],
                         "bbox": [round(float(v), 2) for v in b], "area": round(float(b[2] * b[3]), 2),
                         "iscrowd": 0, "group": CLASS_BY_NAME[c].group, "occlusion": round(float(oc), 4)})
    cats = [{"id": cat_id[c.name], "name": c.name, "supercategory": c.group, "shape": c.shape,
             "texture": c.texture, "colour": c.colour, "group": c.group} for c in CLASSES]
    data = {"info": {"description": f"runa_ood_node proving ground, split {split!r} (synthetic)",
                     "split": split, "base_seed": SPLIT_SEEDS[split], "frames": n_frames,
                     "label_set": str(LABELS_PATH),
                     # objects placed = annotations + dropped (never drawn), by reason
                     "objects_placed": len(anns) + sum(dropped.values()), "objects_dropped": dropped},
            "images": images, "annotations": anns, "categories": cats}
    path = root / "annotations.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path
