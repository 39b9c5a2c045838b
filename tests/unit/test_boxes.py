"""Box conversion and sanitising: every kind of bad box gets its own status, never an exception."""
import numpy as np
import pytest
import torch

from runa_ood_node.core.boxes import BoxStatus, pixel_bounds, sanitize_boxes, status_text, to_xyxy

W, H = 640, 480


def test_formats_convert_to_the_same_box():
    xyxy = np.array([[10, 20, 110, 70]], float)
    assert np.allclose(to_xyxy(xyxy, "xyxy"), xyxy)
    assert np.allclose(to_xyxy([[10, 20, 100, 50]], "xywh"), xyxy)
    assert np.allclose(to_xyxy([[60, 45, 100, 50]], "cxcywh"), xyxy)
    with pytest.raises(ValueError, match="format"):
        to_xyxy(xyxy, "yxyx")


def test_status_codes_and_texts():
    assert [int(s) for s in BoxStatus] == list(range(8))
    assert BoxStatus.TOO_SMALL.text == status_text(4)
    assert "unknown" in status_text(99)


def test_each_problem_gets_its_status():
    boxes = [
        [10, 10, 100, 100],        # OK
        [np.nan, 10, 100, 100],    # NAN
        [10, 10, np.inf, 100],     # INFINITE
        [50, 50, 50, 90],          # zero width
        [100, 10, 10, 100],        # reversed corners -> ZERO_AREA (not swapped)
        [700, 10, 800, 100],       # right of the image
        [-100, -100, -1, -1],      # above-left of the image
        [10, 10, 11.5, 100],       # 1.5 px wide
        [-50, -50, 30, 40],        # partly outside -> clipped, OK
        [638.5, 10, 700, 100],     # clipped to 1.5 px wide -> TOO_SMALL
        [np.nan, np.inf, 1, 2],    # NaN wins over inf
    ]
    xyxy, st = sanitize_boxes(boxes, W, H)
    S = BoxStatus
    assert st.tolist() == [S.OK, S.NAN, S.INFINITE, S.ZERO_AREA, S.ZERO_AREA, S.OUTSIDE_IMAGE, S.OUTSIDE_IMAGE,
                           S.TOO_SMALL, S.OK, S.TOO_SMALL, S.NAN]
    assert xyxy.dtype == np.float32 and st.dtype == np.uint8 and xyxy.shape == (11, 4)
    assert np.isfinite(xyxy).all()
    assert (xyxy[:, [0, 2]] >= 0).all() and (xyxy[:, [0, 2]] <= W).all()
    assert (xyxy[:, [1, 3]] >= 0).all() and (xyxy[:, [1, 3]] <= H).all()
    assert xyxy[8].tolist() == [0, 0, 30, 40]
    assert xyxy[1].tolist() == [0, 0, 0, 0]


def test_min_size_is_configurable():
    _, st = sanitize_boxes([[10, 10, 11.5, 100]], W, H, min_size=1.0)
    assert st.tolist() == [BoxStatus.OK]
    _, st = sanitize_boxes([[10, 10, 30, 100]], W, H, min_size=32)
    assert st.tolist() == [BoxStatus.TOO_SMALL]


def test_box_touching_edge_from_outside_is_outside():
    _, st = sanitize_boxes([[640, 0, 700, 100], [0, -20, 50, 0]], W, H)
    assert st.tolist() == [BoxStatus.OUTSIDE_IMAGE] * 2


@pytest.mark.parametrize("empty", [[], None, np.zeros((0, 4)), np.zeros((0,)), torch.zeros(0, 4)])
def test_empty_inputs(empty):
    xyxy, st = sanitize_boxes(empty, W, H)
    assert xyxy.shape == (0, 4) and st.shape == (0,)


def test_accepts_lists_tensors_single_box_and_formats():
    xyxy, st = sanitize_boxes(torch.tensor([[10.0, 10, 20, 20]]), W, H, fmt="xywh")
    assert st.tolist() == [0] and xyxy.tolist() == [[10, 10, 30, 30]]
    xyxy, st = sanitize_boxes([1, 2, 30, 40], W, H)
    assert xyxy.shape == (1, 4)


@pytest.mark.parametrize("bad", [[[1, 2, 3]], np.zeros((2, 5)), np.zeros((2, 2, 4)), [["a", "b", "c", "d"]]])
def test_wrong_shapes_raise_value_error(bad):
    with pytest.raises(ValueError, match=r"\[N,4\]"):
        sanitize_boxes(bad, W, H)


def test_bad_image_size_raises():
    with pytest.raises(ValueError, match="image size"):
        sanitize_boxes([[0, 0, 1, 1]], 0, 480)


def test_pixel_bounds_cover_box_and_are_at_least_one_pixel():
    assert pixel_bounds([10.2, 20.7, 30.1, 40.0], W, H) == (10, 20, 31, 40)
    assert pixel_bounds([639.5, 479.5, 640, 480], W, H) == (639, 479, 640, 480)
    x0, y0, x1, y1 = pixel_bounds([5.0, 5.0, 5.0, 5.0], W, H)
    assert x1 - x0 == 1 and y1 - y0 == 1
