"""runa_ood_node.ros.draw: annotated image colours, watermark, markers."""
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from runa_ood_node.core.boxes import BoxStatus
from runa_ood_node.ros import draw

H, W = 240, 320
GREY_BG = 90


def _fr():
    """Boxes: 0 ID (green), 1 OOD (red), 2 TOO_SMALL (grey), 3 NaN coordinates (not drawn)."""
    nan = float("nan")
    return types.SimpleNamespace(
        boxes_xyxy=np.array([[20, 60, 120, 200], [170, 50, 300, 180], [140, 150, 150, 160], [nan, 0, 5, 5]],
                            np.float32),
        status=np.array([0, 0, BoxStatus.TOO_SMALL, BoxStatus.NAN], np.uint8),
        uncertainty=np.array([-0.31, -0.12, nan, nan], np.float32),
        label=["car", "person", "", ""], is_ood=np.array([False, True, False, False]),
        similarity=np.array([0.31, 0.12, nan, nan], np.float32),
        threshold=np.array([-0.2, -0.2, nan, nan], np.float32), timings={}, error=None)


@pytest.fixture()
def image():
    return np.full((H, W, 3), GREY_BG, np.uint8)


def test_box_edges_have_status_colours(image):
    before = image.copy()
    out = draw.annotate(image, _fr())
    np.testing.assert_array_equal(image, before)  # input untouched
    assert out.shape == image.shape and out.dtype == np.uint8
    # left edge, mid-height (away from the label at the top)
    assert tuple(out[130, 20]) == draw.ID_RGB
    assert tuple(out[115, 170]) == draw.OOD_RGB
    assert tuple(out[115, 299]) == draw.OOD_RGB  # right edge = last pixel column of the box
    assert tuple(out[179, 235]) == draw.OOD_RGB  # bottom edge = last pixel row of the box
    assert tuple(out[155, 140]) == draw.NOT_SCORED_RGB
    # just outside the boxes and deep inside them: untouched
    assert tuple(out[130, 19]) == (GREY_BG,) * 3 and tuple(out[115, 300]) == (GREY_BG,) * 3
    assert tuple(out[130, 70]) == (GREY_BG,) * 3 and tuple(out[115, 235]) == (GREY_BG,) * 3


def test_labels_are_drawn_above_boxes(image):
    out = draw.annotate(image, _fr())
    above_ood = out[30:50, 170:300]
    assert (np.all(above_ood == draw.OOD_RGB, axis=2)).sum() > 100  # label background
    assert (above_ood.min(axis=2) > 180).sum() > 5  # white (anti-aliased) text on it


def test_box_at_top_border_gets_label_inside(image):
    fr = _fr()
    fr.boxes_xyxy[1] = [170, 0, 300, 180]
    out = draw.annotate(image, fr)
    assert (np.all(out[0:30, 170:300] == draw.OOD_RGB, axis=2)).sum() > 100


def test_watermark_only_with_random_weights(image):
    plain = draw.annotate(image, _fr(), random_weights=False)
    marked = draw.annotate(image, _fr(), random_weights=True)
    np.testing.assert_array_equal(plain[-30:], image[-30:])  # nothing at the bottom without it
    strip = marked[-30:].astype(int)
    yellow = (strip[..., 0] > 200) & (strip[..., 1] > 170) & (strip[..., 2] < 80)
    assert yellow.sum() > 200  # the banner text
    assert (strip.max(axis=2) < GREY_BG).sum() > 1000  # darkened band behind it
    np.testing.assert_array_equal(marked[:100], plain[:100])  # the rest is unchanged


def test_watermark_on_empty_result_and_tiny_image():
    out = draw.annotate(np.zeros((12, 16, 3), np.uint8), None, random_weights=True)
    assert out.shape == (12, 16, 3)


def test_annotate_real_photo(real_photo):
    rgb, boxes_xywh = real_photo
    xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in boxes_xywh], np.float32)
    n = len(xyxy)
    fr = types.SimpleNamespace(boxes_xyxy=xyxy, status=np.zeros(n, np.uint8),
                               uncertainty=np.linspace(-0.3, -0.1, n).astype(np.float32),
                               label=["thing"] * n, is_ood=np.arange(n) == 0)
    out = draw.annotate(rgb, fr, random_weights=True)
    x1, y1, x2, y2 = (int(v) for v in xyxy[0])
    ym = (y1 + y2) // 2
    assert tuple(out[ym, x1]) == draw.OOD_RGB or tuple(out[ym, x1]) in (draw.ID_RGB,)  # overlap possible
    assert not np.array_equal(out, rgb)


def test_bad_image_is_rejected():
    with pytest.raises(ValueError):
        draw.annotate(np.zeros((10, 10), np.uint8), _fr())


def test_module_import_does_not_import_rclpy():
    code = "import sys, runa_ood_node.ros.draw; sys.exit('rclpy' in sys.modules)"
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------- markers


def test_markers():
    vm = pytest.importorskip("visualization_msgs.msg")
    from std_msgs.msg import Header

    hdr = Header(frame_id="camera_optical")
    hdr.stamp.sec, hdr.stamp.nanosec = 42, 7
    arr = draw.make_markers(hdr, _fr(), W, H, ns="ood", scale=0.002, depth=2.0)
    ms = arr.markers
    assert len(ms) == 1 + 2 * 3  # DELETEALL + (rectangle, text) per finite box; NaN box skipped
    assert ms[0].action == vm.Marker.DELETEALL and ms[0].ns == "ood"
    for m in ms:
        assert (m.header.stamp.sec, m.header.stamp.nanosec, m.header.frame_id) == (42, 7, "camera_optical")
    assert len({m.id for m in ms}) == len(ms)
    rects = [m for m in ms if m.type == vm.Marker.LINE_STRIP]
    texts = [m for m in ms if m.type == vm.Marker.TEXT_VIEW_FACING]
    assert len(rects) == 3 and len(texts) == 3
    r1 = rects[1]  # OOD box [170, 50, 300, 180]
    pts = [(p.x, p.y, p.z) for p in r1.points]
    assert len(pts) == 5 and pts[0] == pts[-1]
    assert pts[0] == pytest.approx(((170 - W / 2) * 0.002, (50 - H / 2) * 0.002, 2.0))
    assert pts[2] == pytest.approx(((300 - W / 2) * 0.002, (180 - H / 2) * 0.002, 2.0))
    assert (r1.color.r, r1.color.g) == (pytest.approx(draw.OOD_RGB[0] / 255), 0.0) and r1.color.a == 1.0
    assert r1.scale.x > 0 and texts[1].scale.z > 0
    assert texts[1].text.startswith("OOD") and "person" in texts[1].text
    assert texts[0].text.startswith("car") and texts[2].text == "TOO_SMALL"
    from rclpy.serialization import serialize_message

    assert len(serialize_message(arr)) > 0


def test_markers_without_result_only_clear():
    vm = pytest.importorskip("visualization_msgs.msg")
    from std_msgs.msg import Header

    arr = draw.make_markers(Header(frame_id="cam"), None, W, H)
    assert len(arr.markers) == 1 and arr.markers[0].action == vm.Marker.DELETEALL


def _heavy(n=1000, scored=50, ood=(0, 7, 30)):
    """n boxes: the first ``scored`` scored (some OOD), the rest NOT_SCORED (over the max_boxes cap)."""
    rng = np.random.default_rng(0)
    xy = rng.uniform((0, 0), (W - 30, H - 30), (n, 2))
    status = np.full(n, BoxStatus.NOT_SCORED, np.uint8)
    status[:scored] = BoxStatus.OK
    is_ood = np.zeros(n, bool)
    is_ood[list(ood)] = True
    unc = np.where(status == 0, -0.2, np.nan).astype(np.float32)
    return types.SimpleNamespace(boxes_xyxy=np.concatenate([xy, xy + 20], 1).astype(np.float32), status=status,
                                 uncertainty=unc, label=["car"] * n, is_ood=is_ood)


def test_heavy_frame_draws_and_marks_a_bounded_meaningful_subset():
    """1,000 boxes of which 50 were scored once gave 2,001 markers; now every OOD and ID box is
    marked, at most MAX_DRAWN_NOT_SCORED not-scored ones, and the rest is counted."""
    vm = pytest.importorskip("visualization_msgs.msg")
    from std_msgs.msg import Header

    fr = _heavy()
    idx, omitted = draw.select_boxes(fr)
    assert set(idx[-3:].tolist()) == {0, 7, 30}  # OOD drawn last (on top)
    assert {i for i in idx.tolist() if fr.status[i] == 0} == set(range(50))
    assert sum(fr.status[i] != 0 for i in idx) == draw.MAX_DRAWN_NOT_SCORED
    assert omitted == 1000 - 50 - draw.MAX_DRAWN_NOT_SCORED
    ms = draw.make_markers(Header(frame_id="cam"), fr, W, H).markers
    assert len(ms) == 1 + 2 * (50 + draw.MAX_DRAWN_NOT_SCORED)
    assert sum(m.type == vm.Marker.LINE_STRIP and m.color.r > 0.8 for m in ms) == 3  # the OOD boxes
    # a flood of scored boxes is capped too, OOD ones first
    many = _heavy(n=5000, scored=5000, ood=(4999,))
    idx, omitted = draw.select_boxes(many)
    assert idx.size == draw.MAX_DRAWN_BOXES and idx[-1] == 4999 and omitted == 5000 - draw.MAX_DRAWN_BOXES


def test_annotated_image_says_how_many_boxes_were_not_drawn():
    img = np.full((H, W, 3), GREY_BG, np.uint8)
    out = draw.annotate(img, _heavy())
    corner = out[:12, :60]
    assert (np.all(corner == draw.NOT_SCORED_RGB, axis=2)).sum() > 50  # the "+930 boxes not drawn" tag
    assert not np.any(np.all(draw.annotate(img, _fr())[:3, :3] == draw.NOT_SCORED_RGB, axis=2))
