"""Regional and global views: crop content, blur outside / sharp inside, batched == one by one."""
import cv2
import numpy as np
import pytest
import torch

from runa_ood_node.core.boxes import sanitize_boxes
from runa_ood_node.core.views import ViewMaker, gaussian_kernel_size

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
S = 64


def _denorm(t: torch.Tensor) -> np.ndarray:
    """[3,S,S] normalised -> HxWx3 float in [0,255]."""
    m = torch.tensor(MEAN).view(3, 1, 1)
    s = torch.tensor(STD).view(3, 1, 1)
    return ((t * s + m) * 255.0).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def photo(real_photo):
    image, boxes_xywh = real_photo
    xyxy, st = sanitize_boxes(boxes_xywh, image.shape[1], image.shape[0], fmt="xywh")
    return image, xyxy[st == 0]


def test_kernel_size():
    assert gaussian_kernel_size(1.0) == 7
    assert gaussian_kernel_size(0.4) == 5
    assert gaussian_kernel_size(0) == 1


def test_shapes_dtype_and_normalisation(photo):
    image, boxes = photo
    vm = ViewMaker(S, MEAN, STD)
    r, g = vm.make(image, boxes)
    assert r.shape == g.shape == (len(boxes), 3, S, S)
    assert r.dtype == g.dtype == torch.float32
    # a constant grey image maps to (v/255 - mean)/std exactly
    grey = np.full((100, 80, 3), 128, np.uint8)
    r, g = vm.make(grey, [[10, 10, 50, 60]])
    want = torch.tensor([(128 / 255 - m) / s for m, s in zip(MEAN, STD)]).view(3, 1, 1)
    assert torch.allclose(r[0], want.expand(3, S, S), atol=1e-5)
    assert torch.allclose(g[0], want.expand(3, S, S), atol=1e-5)


def test_zero_boxes():
    vm = ViewMaker(S, MEAN, STD)
    r, g = vm.make(np.zeros((48, 64, 3), np.uint8), np.zeros((0, 4)))
    assert r.shape == g.shape == (0, 3, S, S)


def test_regional_view_is_the_resized_box_region(photo):
    image, boxes = photo
    vm = ViewMaker(S, MEAN, STD)
    r, _ = vm.make(image, boxes)
    for i, b in enumerate(boxes):
        x0, y0 = int(np.floor(b[0])), int(np.floor(b[1]))
        x1, y1 = int(np.ceil(b[2])), int(np.ceil(b[3]))
        region = image[y0:y1, x0:x1]
        interp = cv2.INTER_AREA if (x1 - x0 >= S and y1 - y0 >= S) else cv2.INTER_LINEAR
        want = cv2.resize(region, (S, S), interpolation=interp).astype(np.float32)
        assert np.allclose(_denorm(r[i]), want, atol=1e-3)


def test_regional_view_sees_only_the_box():
    # Left half red, right half blue: a box inside the left half must produce an all-red crop.
    img = np.zeros((120, 160, 3), np.uint8)
    img[:, :80] = (255, 0, 0)
    img[:, 80:] = (0, 0, 255)
    vm = ViewMaker(S, MEAN, STD)
    r, g = vm.make(img, [[10, 10, 70, 110]])
    crop = _denorm(r[0])
    assert np.allclose(crop[..., 0], 255, atol=1e-3) and np.allclose(crop[..., 2], 0, atol=1e-3)
    # the global view still contains the blue half
    assert _denorm(g[0])[..., 2].max() > 250


def test_global_view_sharp_inside_blurred_outside(photo):
    image, boxes = photo
    vm = ViewMaker(S, MEAN, STD, blur_radius=1.0)
    _, g = vm.make(image, boxes)
    sharp = cv2.resize(image, (S, S), interpolation=cv2.INTER_AREA).astype(np.float32)
    H, W = image.shape[:2]
    for i, b in enumerate(boxes):
        x0, y0, x1, y1 = vm.scaled_bounds(b, W, H)
        view = _denorm(g[i])
        inside = np.zeros((S, S), bool)
        inside[y0:y1, x0:x1] = True
        assert np.allclose(view[inside], sharp[inside], atol=1e-3), "box region must be unblurred"
        if (~inside).sum() > 50:
            diff = np.abs(view[~inside] - sharp[~inside]).mean()
            assert diff > 1.0, "outside the box must be blurred"
            blurred = cv2.GaussianBlur(sharp, (7, 7), 1.0)
            assert np.allclose(view[~inside], blurred[~inside], atol=1e-3)


def test_zero_blur_radius_gives_the_plain_resized_frame(photo):
    image, boxes = photo
    vm = ViewMaker(S, MEAN, STD, blur_radius=0.0)
    _, g = vm.make(image, boxes[:2])
    sharp = cv2.resize(image, (S, S), interpolation=cv2.INTER_AREA).astype(np.float32)
    assert np.allclose(_denorm(g[0]), sharp, atol=1e-3)
    assert torch.equal(g[0], g[1])


def test_batched_equals_one_by_one_and_naive_exactly(photo):
    image, boxes = photo
    vm = ViewMaker(S, MEAN, STD, blur_radius=1.5)
    r, g = vm.make(image, boxes)
    for i, b in enumerate(boxes):
        r1, g1 = vm.make(image, b[None])
        rn, gn = vm.make_naive(image, b)
        assert torch.equal(r[i], r1[0]) and torch.equal(g[i], g1[0])
        assert torch.equal(r[i], rn[0]) and torch.equal(g[i], gn[0])


def test_tiny_box_at_the_corner_is_at_least_one_pixel():
    img = np.random.RandomState(0).randint(0, 255, (50, 70, 3), np.uint8)
    vm = ViewMaker(S, MEAN, STD)
    r, g = vm.make(img, [[69.6, 49.6, 70.0, 50.0]])
    crop = _denorm(r[0])
    assert np.allclose(crop, img[49, 69].astype(np.float32), atol=1e-3)  # the single corner pixel, upscaled


@pytest.mark.parametrize("bad", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8),
                                 np.zeros((10, 10, 3), np.float32), [[1, 2, 3]]])
def test_bad_images_raise(bad):
    with pytest.raises(ValueError, match="image"):
        ViewMaker(S, MEAN, STD).make(bad, [[0, 0, 5, 5]])


def test_bad_parameters_raise():
    with pytest.raises(ValueError):
        ViewMaker(S, MEAN, STD, blur_radius=-1)
    with pytest.raises(ValueError):
        ViewMaker(S, MEAN[:2], STD)
    with pytest.raises(ValueError, match="square"):
        ViewMaker((64, 32), MEAN, STD)


def test_non_contiguous_image_views_equal_contiguous(photo):
    """The ROS layer may hand over a channel-flipped view of a bgr8 buffer (negative strides)."""
    image, boxes = photo
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    flipped_view = bgr[:, :, ::-1]
    assert not flipped_view.flags["C_CONTIGUOUS"]
    vm = ViewMaker(S, MEAN, STD)
    r1, g1 = vm.make(flipped_view, boxes)
    r2, g2 = vm.make(image, boxes)
    assert torch.equal(r1, r2) and torch.equal(g1, g2)
