"""`runa-ood foxglove-layout`: a Foxglove (or Lichtblick) layout for the node's outputs.

One Image panel per camera (the camera's image with the node's ``foxglove_msgs/ImageAnnotations``
drawn over it on the client), then the vehicle-level ``ood/driver_alert`` and ``ood/monitor_health``
as Raw Messages panels. The file is the JSON that Foxglove's "Import layout" reads (``configById``:
panel id -> panel config, ``layout``: the tree of splits); panels get Foxglove's defaults for every
setting the file leaves out.

``config/runa_ood.foxglove_layout.json`` is this layout for the example rig (cameras front, left,
right; ``tests/test_foxglove.py`` keeps it equal to the generator's output); ``runa-ood demo``
writes the one for its own output bag next to it. Per camera ``C`` (relative to the node's
namespace): image ``C/image`` (or the topic given as ``C=/its/image/topic``), annotations
``C/ood/image_annotations``; a single stream (no cameras): ``image`` and ``ood/image_annotations``.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

#: what the node publishes, relative to its namespace (per camera below ``C/``)
ANNOTATIONS_TOPIC = "ood/image_annotations"
ALERT_TOPIC = "ood/driver_alert"
HEALTH_TOPIC = "ood/monitor_health"
IMAGE_TOPIC = "image"
#: the example rig's cameras (config/camera_rig.example.yaml)
EXAMPLE_CAMERAS = ("front", "left", "right")
SHIPPED = pathlib.Path(__file__).resolve().parents[2] / "config" / "runa_ood.foxglove_layout.json"


def _resolve(namespace: str, *parts: str) -> str:
    """Absolute topic name of ``parts`` under ``namespace`` (an absolute part stays as it is)."""
    if parts and parts[-1].startswith("/"):
        return parts[-1]
    names = [p.strip("/") for p in (namespace, *parts) if p.strip("/")]
    return "/" + "/".join(names)


def camera_topics(camera: Optional[str], namespace: str = "/", image_topic: Optional[str] = None) -> Tuple[str, str]:
    """(image topic, annotations topic) of ``camera`` (None: the single stream) as absolute names."""
    prefix = [camera] if camera else []
    image = _resolve(namespace, *prefix, image_topic or IMAGE_TOPIC)
    return image, _resolve(namespace, *prefix, ANNOTATIONS_TOPIC)


def _split(items: List, direction: str):
    """Foxglove's layout tree: nested binary splits giving each item an equal share."""
    if len(items) == 1:
        return items[0]
    return {"first": items[0], "second": _split(items[1:], direction), "direction": direction,
            "splitPercentage": round(100.0 / len(items), 3)}


def _panel_id(kind: str, name: str) -> str:
    return f"{kind}!{re.sub(r'[^A-Za-z0-9_]+', '_', name) or 'x'}"


def layout(cameras: Sequence[Tuple[Optional[str], Optional[str]]] = tuple((c, None) for c in EXAMPLE_CAMERAS),
           namespace: str = "/") -> Dict:
    """The layout (a JSON-ready dict) for ``cameras``: ``(name, image topic or None)`` pairs; a
    name of None is the single-stream node."""
    config: Dict[str, Dict] = {}
    images = []
    for name, image_topic in cameras:
        image, annotations = camera_topics(name, namespace, image_topic)
        pid = _panel_id("Image", name or "camera")
        config[pid] = {"imageMode": {"imageTopic": image, "annotations": {annotations: {"visible": True}},
                                     "synchronize": False}}
        images.append(pid)
    texts = []
    for topic in (ALERT_TOPIC, HEALTH_TOPIC):
        pid = _panel_id("RawMessages", topic.rsplit("/", 1)[-1])
        config[pid] = {"topicPath": _resolve(namespace, topic), "diffEnabled": False, "diffMethod": "custom",
                       "diffTopicPath": "", "showFullMessageForDiff": False}
        texts.append(pid)
    tree = {"first": _split(images, "row"), "second": _split(texts, "row"), "direction": "column",
            "splitPercentage": 75.0}
    return {"configById": config, "globalVariables": {}, "userNodes": {}, "playbackConfig": {"speed": 1.0},
            "layout": tree}


def topics(doc: Dict) -> List[str]:
    """Every topic a layout names (image, annotation and message-path topics), in panel order."""
    out: List[str] = []
    for cfg in doc["configById"].values():
        mode = cfg.get("imageMode")
        if mode:
            out += [mode["imageTopic"], *mode.get("annotations", {})]
        if "topicPath" in cfg:
            out.append(re.split(r"[.{\[]", cfg["topicPath"], maxsplit=1)[0])
    return out


def dumps(doc: Dict) -> str:
    return json.dumps(doc, indent=2) + "\n"


def parse_cameras(specs: Sequence[str]) -> List[Tuple[Optional[str], Optional[str]]]:
    """``["front", "left=/cams/left/image_raw"]`` -> ``[("front", None), ("left", "/cams/left/image_raw")]``."""
    out = []
    for spec in specs:
        for item in filter(None, (s.strip() for s in spec.split(","))):
            name, _, topic = item.partition("=")
            out.append((name, topic or None))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cameras", nargs="*", default=list(EXAMPLE_CAMERAS), metavar="C[=IMAGE_TOPIC]",
                   help="camera names (the node's `cameras`), optionally with the image topic Foxglove should "
                        "show (default C/image); none: the single-stream node (default: %(default)s)")
    p.add_argument("--namespace", default="/", help="the node's namespace (default: %(default)s)")
    p.add_argument("-o", "--output", default="-", help="file to write, - for stdout (default: %(default)s)")


def run(args) -> int:
    cams = parse_cameras(args.cameras) or [(None, None)]
    text = dumps(layout(cams, args.namespace))
    if args.output == "-":
        sys.stdout.write(text)
    else:
        pathlib.Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    return 0
