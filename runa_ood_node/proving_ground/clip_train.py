"""``runa-ood proving-ground train``: the proving-ground CLIP, trained as a CLIP is trained.

No pretrained CLIP weights can be obtained here, so the proving ground brings its own: the open_clip
architecture ``runa-pg-vit`` (``core/model_configs/runa-pg-vit.json``: a ViT image tower at 224 px,
patch 32, and a small text tower), pre-trained contrastively on image-caption pairs rendered by
:func:`world.render_scene` from the ``"clip"`` split seeds only (disjoint from train / calibration /
test / gate / demo). It never sees the methods' region features, their heads or their views'
recipes beyond what any CLIP sees (photos of objects and of scenes), so no method is favoured by how
the backbone was made.

Pairs (one pool of rendered scenes, pre-rendered once and re-sampled every step):

* **object crops** (``1 - scene_fraction`` of a batch, drawn class-balanced): the box with a random
  context margin (none for a third of them: the tight box the pipeline crops) and jitter, squashed
  to 224 px with the pipeline's own resize rule (``views._resize``: small objects upscaled), captioned
  with the class name in varied templates (``"a photo of a {}"``, ``"a {} on the road"``,
  ``"a blurry photo of a {}"``, ...). Every class is named, the OOD ones too (real CLIP has seen a
  moose); small and partly occluded objects are kept (objects hidden by more than
  ``MAX_OCCLUSION`` are not named: a caption must describe what is visible).
* **scenes** (``scene_fraction``): the whole frame or a large region of it, squashed to 224 px,
  captioned with the objects that are visible in it at that scale (``"a road with a car, a moose and
  a traffic cone"``; ``"an empty road"``).
* RUNA's blurred global view is **not** a training pair: no real CLIP was trained on such images, and
  training on one method's view would favour that method.

Augmentations keep hue (colour is part of a class's identity): brightness, contrast and saturation
jitter, Gaussian blur, Gaussian noise. The loss is CLIP's symmetric InfoNCE with a learnable logit
scale; since a templated world repeats captions inside a batch, pairs whose captions name the same
class set count as positives of each other (the targets of a row are spread over them, as UniCL
does), instead of being pushed apart as false negatives.

Everything is seeded (numpy, torch; 2 threads by default) so a run remakes the same checkpoint. The
checkpoint is the model's state dict in fp16 (<= 40 MB), loadable by open_clip's normal
``pretrained=<path>`` path into the fp32 model (``DualEncoder.load("runa-pg-vit", pretrained=...)`` or
the registered name ``pretrained: proving-ground``). Beside it: ``<name>.sha256``, the loss curve PNG
and a JSON of the run (settings, times, zero-shot figures on held-out ``"calibration"`` scenes against
random weights of the same architecture).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

LOG = logging.getLogger(__name__)

MODEL_NAME = "runa-pg-vit"
#: the committed checkpoint, relative to the calibration directory (``pretrained: proving-ground``)
CHECKPOINT = "proving_ground/runa-pg-vit.pt"

CROP_TEMPLATES: Tuple[str, ...] = (
    "a photo of a {}", "a {} on the road", "a blurry photo of a {}", "a close-up photo of a {}",
    "a photo of a small {}", "a low resolution photo of a {}", "a {} by the road", "a dark photo of a {}",
    "a bright photo of a {}", "a cropped photo of a {}", "a photo of the {}", "a {}",
)
#: extra templates for objects partly hidden by others
OCCLUDED_TEMPLATES: Tuple[str, ...] = ("a partly hidden {}", "a photo of an occluded {}")
SCENE_TEMPLATES: Tuple[str, ...] = (
    "a road with {}", "a street scene with {}", "a photo of a road with {}", "{} on a road", "a driving scene with {}",
)
EMPTY_SCENE_CAPTIONS: Tuple[str, ...] = ("an empty road", "a photo of an empty road", "a road with nothing on it")

#: objects hidden more than this are not named in captions (a caption describes what is visible)
MAX_OCCLUSION = 0.7
#: a scene caption names an object when it is at least this many pixels (sqrt(w*h)) at 224 px
SCENE_MIN_PX = 6.0
#: at most this many names in a scene caption (context length 32)
SCENE_MAX_NAMES = 5
#: scene pairs (the committed checkpoint's run): this share shows the whole frame, the others a region whose
#: sides are fractions of the frame's drawn from SCENE_REGION (uniformly; ``region_law="log"``: log-uniformly)
WHOLE_SCENE_P = 0.4
SCENE_REGION = (0.35, 0.85)
REGION_LAWS = ("uniform", "log")
#: object tiles (``tile_fraction`` of a batch, none in the committed run): side fractions of the frame
TILE_REGION = (0.08, 0.4)
#: stored scene images are downscaled to this width (scene samples are squashed to 224 px anyway)
SCENE_STORE_WIDTH = 640


# ---------------------------------------------------------------------------------------------- pool
@dataclasses.dataclass
class Pool:
    """Pre-rendered training material: object patches (with context) and downscaled scenes."""

    class_names: List[str]
    patches: List[np.ndarray] = dataclasses.field(default_factory=list)  # uint8 HxWx3, box + context
    patch_boxes: List[Tuple[float, float, float, float]] = dataclasses.field(default_factory=list)  # xyxy in patch
    patch_class: List[int] = dataclasses.field(default_factory=list)
    patch_size_px: List[float] = dataclasses.field(default_factory=list)  # sqrt(w*h) in the frame
    patch_occlusion: List[float] = dataclasses.field(default_factory=list)
    scenes: List[np.ndarray] = dataclasses.field(default_factory=list)
    scene_boxes: List[np.ndarray] = dataclasses.field(default_factory=list)  # [N,4] xyxy in the stored scene
    scene_classes: List[np.ndarray] = dataclasses.field(default_factory=list)  # [N] class index
    scene_occlusion: List[np.ndarray] = dataclasses.field(default_factory=list)
    skipped_occluded: int = 0
    skipped_tiny: int = 0

    def class_counts(self) -> Dict[str, int]:
        counts = np.bincount(np.asarray(self.patch_class, np.int64), minlength=len(self.class_names))
        return {n: int(c) for n, c in zip(self.class_names, counts)}


def _frame(split: str, index: int, frame_scale: float = 1.0) -> Tuple[int, Tuple[int, int]]:
    """(seed, (width, height)) of frame ``index`` of ``split`` as the world's splits have it
    (:func:`world.split_frame`), the size scaled by ``frame_scale`` (smoke runs only)."""
    from . import world

    seed, (w, h) = world.split_frame(split, index)
    if frame_scale != 1.0:
        w, h = max(32, round(w * frame_scale)), max(32, round(h * frame_scale))
    return seed, (w, h)


def add_scene(pool: Pool, scene, scene_scale_width: int = SCENE_STORE_WIDTH) -> None:
    """Cut one rendered scene into the pool (object patches with context + a downscaled scene)."""
    import cv2

    img = scene.image
    H, W = img.shape[:2]
    index = {n: i for i, n in enumerate(pool.class_names)}
    xyxy = np.asarray(scene.boxes, np.float32).reshape(-1, 4).copy()
    xyxy[:, 2:] += xyxy[:, :2]
    occ = np.asarray(scene.occlusion, np.float32).reshape(-1)
    cls = np.asarray([index[c] for c in scene.classes], np.int64)
    for (x1, y1, x2, y2), c, o in zip(xyxy, cls, occ):
        w, h = x2 - x1, y2 - y1
        if w < 3 or h < 3:
            pool.skipped_tiny += 1
            continue
        if o > MAX_OCCLUSION:
            pool.skipped_occluded += 1
            continue
        pad = 0.5 * max(w, h) + 2.0
        px1, py1 = int(max(0, math.floor(x1 - pad))), int(max(0, math.floor(y1 - pad)))
        px2, py2 = int(min(W, math.ceil(x2 + pad))), int(min(H, math.ceil(y2 + pad)))
        patch = img[py1:py2, px1:px2]
        box = (x1 - px1, y1 - py1, x2 - px1, y2 - py1)
        s = 224.0 / max(w, h)
        if s < 1.0:  # the crop is shrunk to 224 px anyway: store it at that scale
            nw, nh = max(1, round(patch.shape[1] * s)), max(1, round(patch.shape[0] * s))
            sx, sy = nw / patch.shape[1], nh / patch.shape[0]
            patch = cv2.resize(patch, (nw, nh), interpolation=cv2.INTER_AREA)
            box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        pool.patches.append(np.ascontiguousarray(patch))
        pool.patch_boxes.append(tuple(float(v) for v in box))
        pool.patch_class.append(int(c))
        pool.patch_size_px.append(float(math.sqrt(w * h)))
        pool.patch_occlusion.append(float(o))
    s = min(1.0, scene_scale_width / W)
    small = cv2.resize(img, (round(W * s), round(H * s)), interpolation=cv2.INTER_AREA) if s < 1 else img.copy()
    pool.scenes.append(small)
    pool.scene_boxes.append(xyxy * np.float32(small.shape[1] / W))
    pool.scene_classes.append(cls)
    pool.scene_occlusion.append(occ)


def build_pool(n_scenes: int, *, split: str = "clip", start: int = 0, frame_scale: float = 1.0,
               size_range: Optional[Tuple[int, int]] = None, progress: bool = True, pool: Optional[Pool] = None) -> Pool:
    """Render ``n_scenes`` scenes of ``split`` (seeds ``SPLIT_SEEDS[split] + start + i``) into a pool.

    ``frame_scale`` < 1 renders smaller frames (tests: a tiny world); ``size_range`` as for
    :func:`world.render_scene` (its default when None).
    """
    from tqdm import tqdm

    from . import world

    if pool is None:
        pool = Pool(class_names=[c.name for c in world.CLASSES])
    kw = {} if size_range is None else {"size_range": tuple(size_range)}
    for i in tqdm(range(start, start + n_scenes), desc=f"render {split} scenes", unit="scene", disable=not progress):
        seed, (w, h) = _frame(split, i, frame_scale)
        add_scene(pool, world.render_scene(seed, w, h, **kw))
    if not pool.patches:
        raise RuntimeError(f"{n_scenes} rendered scenes gave no object to train on")
    return pool


# ---------------------------------------------------------------------------------------------- sampling
def _article_list(names: Sequence[str]) -> str:
    items = [f"a {n}" for n in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class Sampler:
    """Draws augmented ``(images uint8 [B,S,S,3], captions, keys)`` batches from a :class:`Pool`.

    ``keys`` name the class set each caption describes (pairs with equal keys are positives of
    each other in the loss). Deterministic for a given seed.
    """

    def __init__(self, pool: Pool, size: int = 224, scene_fraction: float = 0.25, tight_fraction: float = 0.35,
                 seed: int = 0, whole_scene: float = WHOLE_SCENE_P, scene_region: Tuple[float, float] = SCENE_REGION,
                 region_law: str = "uniform", tile_fraction: float = 0.0, tile_region: Tuple[float, float] = TILE_REGION):
        lo, hi = (float(v) for v in scene_region)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"scene_region must be 0 < lo <= hi <= 1 (side fractions of the frame), got {scene_region}")
        if region_law not in REGION_LAWS:
            raise ValueError(f"region_law must be one of {REGION_LAWS}, got {region_law!r}")
        if not 0.0 <= float(whole_scene) <= 1.0:
            raise ValueError(f"whole_scene must be in [0, 1], got {whole_scene}")
        self.pool, self.size = pool, int(size)
        self.scene_fraction, self.tight_fraction = float(scene_fraction), float(tight_fraction)
        self.whole_scene, self.scene_region, self.region_law = float(whole_scene), (lo, hi), region_law
        tlo, thi = (float(v) for v in tile_region)
        if not 0.0 < tlo <= thi <= 1.0:
            raise ValueError(f"tile_region must be 0 < lo <= hi <= 1 (side fractions of the frame), got {tile_region}")
        if not (0.0 <= float(tile_fraction) and float(tile_fraction) + float(scene_fraction) <= 1.0):
            raise ValueError(f"tile_fraction + scene_fraction must be in [0, 1], got {tile_fraction} + {scene_fraction}")
        self.tile_fraction, self.tile_region = float(tile_fraction), (tlo, thi)
        # the scenes' nameable objects by class: (scene, object) pairs, for class-balanced object tiles
        objs: List[List[Tuple[int, int]]] = [[] for _ in pool.class_names]
        for i, (cls_i, occ_i) in enumerate(zip(pool.scene_classes, pool.scene_occlusion)):
            for j, (c, o) in enumerate(zip(cls_i, occ_i)):
                if o <= 0.6:
                    objs[int(c)].append((i, j))
        self.scene_objects = objs
        self.tile_classes = [k for k, v in enumerate(objs) if v]
        self.rng = np.random.default_rng(seed)
        cls = np.asarray(pool.patch_class, np.int64)
        self.by_class = [np.flatnonzero(cls == k) for k in range(len(pool.class_names))]
        self.present = [k for k, idx in enumerate(self.by_class) if idx.size]

    # -------------------------------------------------------------- one sample
    def _resize(self, img: np.ndarray) -> np.ndarray:
        from ..core.views import _resize

        return _resize(img, self.size, self.size)

    def crop_sample(self) -> Tuple[np.ndarray, str, Tuple[int, ...]]:
        rng, p = self.rng, self.pool
        k = self.present[int(rng.integers(len(self.present)))]
        j = int(self.by_class[k][int(rng.integers(self.by_class[k].size))])
        patch = p.patches[j]
        x1, y1, x2, y2 = p.patch_boxes[j]
        w, h = x2 - x1, y2 - y1
        if rng.random() < self.tight_fraction:
            m = np.zeros(4)
            jit = np.zeros(2)
        else:
            m = rng.uniform(0.0, 0.4) * rng.uniform(0.5, 1.0, size=4)  # left, top, right, bottom
            jit = rng.uniform(-0.08, 0.08, size=2)
        cx1 = x1 - m[0] * w + jit[0] * w
        cy1 = y1 - m[1] * h + jit[1] * h
        cx2 = x2 + m[2] * w + jit[0] * w
        cy2 = y2 + m[3] * h + jit[1] * h
        H, W = patch.shape[:2]
        ix1, iy1 = int(np.clip(math.floor(cx1), 0, W - 1)), int(np.clip(math.floor(cy1), 0, H - 1))
        ix2, iy2 = int(np.clip(math.ceil(cx2), ix1 + 1, W)), int(np.clip(math.ceil(cy2), iy1 + 1, H))
        img = self._resize(patch[iy1:iy2, ix1:ix2])
        name = p.class_names[k]
        templates = CROP_TEMPLATES + (OCCLUDED_TEMPLATES if p.patch_occlusion[j] > 0.25 else ())
        caption = templates[int(rng.integers(len(templates)))].format(name)
        return img, caption, (k,)

    def scene_sample(self) -> Tuple[np.ndarray, str, Tuple[int, ...]]:
        rng, p = self.rng, self.pool
        i = int(rng.integers(len(p.scenes)))
        img = p.scenes[i]
        H, W = img.shape[:2]
        if rng.random() < self.whole_scene:
            rx1, ry1, rx2, ry2 = 0.0, 0.0, float(W), float(H)
        else:
            lo, hi = self.scene_region
            if self.region_law == "log":   # tiles as often as large regions
                fw, fh = (float(np.exp(v)) for v in rng.uniform(np.log(lo), np.log(hi), size=2))
            else:
                fw, fh = rng.uniform(lo, hi), rng.uniform(lo, hi)
            rw, rh = fw * W, fh * H
            rx1, ry1 = rng.uniform(0, W - rw), rng.uniform(0, H - rh)
            rx2, ry2 = rx1 + rw, ry1 + rh
        return self._region_pair(i, rx1, ry1, rx2, ry2)

    def tile_sample(self) -> Tuple[np.ndarray, str, Tuple[int, ...]]:
        """An object in its scene: a region of side fraction ``tile_region`` (log-uniform, the frame's aspect)
        around an object drawn class-balanced, at least 1.5x the object and small enough that it is named
        (>= 8 px at 224), captioned like a crop when it is the only object named, like a scene otherwise."""
        rng, p = self.rng, self.pool
        k = self.tile_classes[int(rng.integers(len(self.tile_classes)))]
        i, j = self.scene_objects[k][int(rng.integers(len(self.scene_objects[k])))]
        H, W = p.scenes[i].shape[:2]
        x1, y1, x2, y2 = (float(v) for v in p.scene_boxes[i][j])
        bw, bh = max(1.0, x2 - x1), max(1.0, y2 - y1)
        lo, hi = self.tile_region
        f = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        f = min(f, math.sqrt(bw * bh) * self.size / 8.0 / math.sqrt(W * H))   # the object >= 8 px at 224
        f = min(1.0, max(f, 1.5 * bw / W, 1.5 * bh / H))                       # ... and inside with context
        rw, rh = f * W, f * H
        rx1 = float(np.clip(rng.uniform(x2 - rw, x1), 0.0, W - rw))
        ry1 = float(np.clip(rng.uniform(y2 - rh, y1), 0.0, H - rh))
        img, caption, key = self._region_pair(i, rx1, ry1, rx1 + rw, ry1 + rh)
        if len(key) == 1 and key[0] >= 0:
            name = p.class_names[key[0]]
            caption = CROP_TEMPLATES[int(rng.integers(len(CROP_TEMPLATES)))].format(name)
        return img, caption, key

    def _region_pair(self, i: int, rx1: float, ry1: float, rx2: float, ry2: float):
        """Region ``(rx1, ry1, rx2, ry2)`` of stored scene ``i`` at ``size`` px with the scene caption naming
        what is visible in it (>= 60 % inside, occlusion <= 0.6, >= SCENE_MIN_PX at ``size``)."""
        rng, p = self.rng, self.pool
        img = p.scenes[i]
        ix1, iy1, ix2, iy2 = int(rx1), int(ry1), int(math.ceil(rx2)), int(math.ceil(ry2))
        region = img[iy1:iy2, ix1:ix2]
        sx, sy = self.size / region.shape[1], self.size / region.shape[0]
        boxes, cls, occ = p.scene_boxes[i], p.scene_classes[i], p.scene_occlusion[i]
        names: List[int] = []
        for (x1, y1, x2, y2), c, o in zip(boxes, cls, occ):
            area = max(1e-6, (x2 - x1) * (y2 - y1))
            iw = max(0.0, min(x2, ix2) - max(x1, ix1))
            ih = max(0.0, min(y2, iy2) - max(y1, iy1))
            if iw * ih / area < 0.6 or o > 0.6:
                continue
            if math.sqrt(iw * sx * ih * sy) < SCENE_MIN_PX:
                continue
            if int(c) not in names:
                names.append(int(c))
        order = list(rng.permutation(len(names)))
        chosen = [names[o] for o in order][:SCENE_MAX_NAMES]
        out = self._resize(region)
        if not chosen:
            return out, EMPTY_SCENE_CAPTIONS[int(rng.integers(len(EMPTY_SCENE_CAPTIONS)))], ()
        text = _article_list([p.class_names[c] for c in chosen])
        caption = SCENE_TEMPLATES[int(rng.integers(len(SCENE_TEMPLATES)))].format(text)
        if len(names) > SCENE_MAX_NAMES:  # a caption naming only some objects names a set of its own
            return out, caption, tuple(sorted(chosen)) + (-1,)
        return out, caption, tuple(sorted(chosen))

    # -------------------------------------------------------------- augmentation (hue kept)
    def augment(self, img: np.ndarray) -> np.ndarray:
        import cv2

        rng = self.rng
        x = img.astype(np.float32)
        b, c, s = rng.uniform(0.7, 1.3), rng.uniform(0.75, 1.25), rng.uniform(0.75, 1.25)
        grey = x @ np.float32([0.299, 0.587, 0.114])
        x = grey[..., None] + (x - grey[..., None]) * np.float32(s)  # saturation: towards grey, hue kept
        mean = np.float32(grey.mean())
        x = (x - mean) * np.float32(c) + mean * np.float32(b)  # contrast and brightness, same on every channel
        if rng.random() < 0.25:
            sigma = rng.uniform(0.5, 2.0)
            k = 2 * int(math.ceil(3 * sigma)) + 1
            x = cv2.GaussianBlur(x, (k, k), sigmaX=sigma, sigmaY=sigma)
        if rng.random() < 0.3:
            x = x + rng.standard_normal(size=x.shape, dtype=np.float32) * np.float32(rng.uniform(2.0, 10.0))
        return np.clip(x, 0, 255).astype(np.uint8)

    def batch(self, batch_size: int, augment: bool = True):
        imgs, caps, keys = [], [], []
        n_scene = int(round(batch_size * self.scene_fraction)) if self.pool.scenes else 0
        n_tile = int(round(batch_size * self.tile_fraction)) if self.tile_classes else 0
        for i in range(batch_size):
            if i < n_scene:
                img, cap, key = self.scene_sample()
            elif i < n_scene + n_tile:
                img, cap, key = self.tile_sample()
            else:
                img, cap, key = self.crop_sample()
            imgs.append(self.augment(img) if augment else img)
            caps.append(cap)
            keys.append(key)
        return np.stack(imgs), caps, keys


# ---------------------------------------------------------------------------------------------- model / loss
def normalise(images_uint8: np.ndarray, mean: Sequence[float], std: Sequence[float]):
    """``[B,S,S,3]`` uint8 -> float32 ``[B,3,S,S]`` normalised (the pipeline's ``(x/255 - mean)/std``)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (t - m) / s


def model_mean_std(model) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    import open_clip

    v = model.visual
    pp = getattr(v, "preprocess_cfg", None) or {}
    mean = pp.get("mean") or getattr(v, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = pp.get("std") or getattr(v, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return tuple(float(x) for x in mean), tuple(float(x) for x in std)


def build_model(model_name: str = MODEL_NAME, seed: int = 0):
    """A freshly initialised open_clip model of ``model_name`` (seeded, fp32, CPU, train mode)."""
    import open_clip
    import torch

    from ..core.encoder import register_model_configs

    register_model_configs()
    torch.manual_seed(int(seed))
    model = open_clip.create_model(model_name, pretrained=None, device="cpu", precision="fp32")
    return model.train(), open_clip.get_tokenizer(model_name)


def contrastive_loss(img_emb, txt_emb, logit_scale, keys: Sequence[Tuple[int, ...]]):
    """Symmetric InfoNCE over a batch; pairs whose captions name the same class set are positives
    of each other (each row's target spread evenly over them)."""
    import torch
    import torch.nn.functional as F

    logits = logit_scale * img_emb @ txt_emb.t()
    uniq: Dict[Tuple[int, ...], int] = {}
    ids = torch.tensor([uniq.setdefault(k, len(uniq)) for k in keys])
    same = (ids[:, None] == ids[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    li = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    lt = -(target * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return 0.5 * (li + lt)


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "ln" in name or "bn" in name or "logit_scale" in name or "embedding" in name \
                or name.endswith("class_embedding"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Tokens:
    """Tokenised captions, cached by text (a templated world repeats them)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, captions: Sequence[str]):
        import torch

        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            for c, t in zip(missing, self.tokenizer(missing)):
                self.cache[c] = t
        return torch.stack([self.cache[c] for c in captions])


def train(model, tokenizer, sampler: Sampler, steps: int, batch_size: int, lr: float = 5e-4, warmup: int = 50,
          weight_decay: float = 0.1, progress: bool = True, fixed_batch: bool = False) -> Dict[str, list]:
    """Contrastive training for ``steps`` steps (AdamW, linear warm-up then cosine decay, gradient
    clipping at 1, logit scale clamped at 100). ``fixed_batch`` re-uses one batch (tests).

    Returns ``{"loss": [per step], "logit_scale": [per step], "data_s": float, "step_s": float}``.
    """
    import torch
    from tqdm import tqdm

    mean, std = model_mean_std(model)
    tok = Tokens(tokenizer)
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, min(int(warmup), max(1, steps // 5)))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * 0.5 * (1.0 + math.cos(math.pi * t))

    hist: Dict[str, list] = {"loss": [], "logit_scale": []}
    data_s = step_s = 0.0
    fixed = None
    model.train()
    bar = tqdm(range(steps), desc="train CLIP", unit="step", disable=not progress)
    for step in bar:
        t0 = time.perf_counter()
        if fixed is None or not fixed_batch:
            imgs, caps, keys = sampler.batch(batch_size)
            x, t = normalise(imgs, mean, std), tok(caps)
            fixed = (x, t, keys)
        x, t, keys = fixed
        t1 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        img = model.encode_image(x, normalize=True)
        txt = model.encode_text(t, normalize=True)
        loss = contrastive_loss(img, txt, model.logit_scale.exp(), keys)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        t2 = time.perf_counter()
        data_s += t1 - t0
        step_s += t2 - t1
        hist["loss"].append(float(loss.detach()))
        hist["logit_scale"].append(float(model.logit_scale.detach().exp()))
        bar.set_postfix(loss=f"{hist['loss'][-1]:.3f}", scale=f"{hist['logit_scale'][-1]:.1f}",
                        img_s=f"{batch_size * (step + 1) / max(1e-9, data_s + step_s):.0f}")
    hist["data_s"], hist["step_s"] = data_s, step_s
    return hist


# ---------------------------------------------------------------------------------------------- evaluation
def zero_shot(model, tokenizer, n_scenes: int = 40, split: str = "calibration", frame_scale: float = 1.0,
              size_range: Optional[Tuple[int, int]] = None, progress: bool = True, batch: int = 64) -> dict:
    """Zero-shot figures on ``n_scenes`` held-out scenes of ``split``: the pipeline's regional view of
    every box (``core.views.ViewMaker``), its class by the nearest prompt ``"a photo of a {name}"``
    (accuracy over all classes; ID boxes over the ID classes), and its OOD score = max cosine to the
    ID prompts (MCM without temperature): AUROC ID vs near-OOD, ID vs far-OOD, ID vs all OOD, and near-OOD
    for boxes < 32 px (ID positive; :func:`core.metrics.auroc`)."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from ..core import metrics
    from ..core.views import ViewMaker
    from . import world

    mean, std = model_mean_std(model)
    vm = ViewMaker(int(model.visual.image_size[0] if isinstance(model.visual.image_size, (tuple, list))
                       else model.visual.image_size), mean, std)
    names = [c.name for c in world.CLASSES]
    group = {c.name: c.group for c in world.CLASSES}
    id_names = [c.name for c in world.ID_CLASSES]
    kw = {} if size_range is None else {"size_range": tuple(size_range)}
    model.eval()
    with torch.no_grad():
        txt = F.normalize(model.encode_text(tokenizer([f"a photo of a {n}" for n in names])).float(), dim=-1)
    feats, cls, sizes, occl = [], [], [], []
    for i in tqdm(range(n_scenes), desc=f"zero-shot on {split}", unit="scene", disable=not progress):
        seed, (w, h) = _frame(split, i, frame_scale)
        sc = world.render_scene(seed, w, h, **kw)
        if len(sc.classes) == 0:
            continue
        b = np.asarray(sc.boxes, np.float32).reshape(-1, 4).copy()
        sizes.extend(np.sqrt(b[:, 2] * b[:, 3]).tolist())
        b[:, 2:] += b[:, :2]
        views = vm.make_views(sc.image, b, ["regional"])["regional"]
        with torch.no_grad():
            for s in range(0, views.shape[0], batch):
                feats.append(F.normalize(model.encode_image(views[s:s + batch]).float(), dim=-1))
        cls.extend(sc.classes)
        occl.extend(np.asarray(sc.occlusion, np.float32).tolist())
    f = torch.cat(feats) if feats else torch.zeros((0, txt.shape[1]))
    sim = (f @ txt.t()).numpy()
    y = np.asarray([names.index(c) for c in cls], np.int64)
    g = np.asarray([group[c] for c in cls])
    sizes_a = np.asarray(sizes, np.float64)
    id_idx = [names.index(n) for n in id_names]
    is_id = g == "id"
    acc_all = float(np.mean(sim.argmax(1) == y)) if y.size else float("nan")
    acc_id = float(np.mean(np.asarray(id_idx)[sim[is_id][:, id_idx].argmax(1)] == y[is_id])) if is_id.any() else float("nan")
    u = -sim[:, id_idx].max(1)  # uncertainty: higher = more OOD

    def au(mask):
        return metrics.auroc(u[is_id & mask], u[~is_id & mask & (g != "id")]) if mask.any() else float("nan")

    def au_group(grp, mask=None):
        mask = np.ones(len(u), bool) if mask is None else mask
        return metrics.auroc(u[is_id & mask], u[(g == grp) & mask])

    small = sizes_a < 32
    return {
        "split": split, "scenes": int(n_scenes), "boxes": int(y.size),
        "boxes_by_group": {k: int(np.sum(g == k)) for k in ("id", "near", "far")},
        "boxes_below_32px": int(small.sum()),
        "accuracy_all_classes": acc_all, "accuracy_id_boxes_over_id_classes": acc_id,
        "auroc_near": au_group("near"), "auroc_far": au_group("far"), "auroc_all_ood": au(np.ones(len(u), bool)),
        "auroc_near_below_32px": au_group("near", small), "auroc_far_below_32px": au_group("far", small),
        "fpr95_near": metrics.fpr_at_tpr(u[is_id], u[g == "near"]),
    }


# ---------------------------------------------------------------------------------------------- checkpoint
def save_checkpoint(model, path) -> str:
    """Write the state dict in fp16 (floating tensors) and ``<path>.sha256``; return the sha256."""
    import torch

    from ..core.encoder import file_sha256

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous().clone()
          for k, v in model.state_dict().items()}
    torch.save(sd, path)
    digest = file_sha256(path)
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")
    return digest
