"""`runa-ood foxglove-layout`: a Foxglove (or Lichtblick) layout for the node's outputs.

One Image panel per camera (the camera's image with the node's ``foxglove_msgs/ImageAnnotations``
drawn over it on the client), then the vehicle-level ``ood/driver_alert`` and ``ood/monitor_health``
as Raw Messages panels. The file is the JSON that Foxglove's "Import layout" reads (``configById``:
panel id -> panel config, ``layout``: the tree of splits); panels get Foxglove's defaults for every
setting the file leaves out.

``config/runa_ood.foxglove_layout.json`` is this layout for the example rig
(``config/camera_rig.example.yaml``: front, left, right; ``tests/test_foxglove.py`` keeps it equal to
the generator's output); ``runa-ood demo`` writes the one for its own output bag next to it. Per
camera ``C`` (relative to the node's namespace): the image the node subscribes to (``C/image``, or the
rig's ``image_topic``, ``/compressed`` appended for the compressed transport; on the command line
``C=/its/image/topic``), annotations ``C/ood/image_annotations``; a single stream (no cameras):
``image`` and ``ood/image_annotations``.
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
_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "config"
SHIPPED = _CONFIG / "runa_ood.foxglove_layout.json"
EXAMPLE_RIG = _CONFIG / "camera_rig.example.yaml"


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


def rig_cameras(path, image_transport: str = "raw") -> List[Tuple[str, Optional[str]]]:
    """``(name, image topic)`` of every camera of a rig file (read by the launch file's reader,
    ``ros.launch_actions.read_rig``): the camera's ``image_topic`` (None: ``C/image``), with
    ``/compressed`` when its ``image_transport`` (default ``image_transport``) is compressed."""
    from ..ros import launch_actions

    out = []
    for cam in launch_actions.read_rig(str(path)):
        topic = cam.get("image_topic") or None
        if cam.get("image_transport", image_transport) == "compressed":
            topic = f"{topic}/compressed" if topic else "image/compressed"
        out.append((cam["name"], topic))
    return out


def layout(cameras: Sequence[Tuple[Optional[str], Optional[str]]], namespace: str = "/",
           synchronize: bool = False) -> Dict:
    """The layout (a JSON-ready dict) for ``cameras``: ``(name, image topic or None)`` pairs; a
    name of None is the single-stream node.

    ``synchronize``: the Image panels show an image only together with the annotations of the same
    stamp (exact pairing, as a recording of every frame allows; a frame without an answer, or
    without any box, is then not shown). Off (live rigs): the latest annotations are drawn over
    the latest image, which can be one frame behind while the node scores."""
    config: Dict[str, Dict] = {}
    images = []
    for name, image_topic in cameras:
        image, annotations = camera_topics(name, namespace, image_topic)
        pid = _panel_id("Image", name or "camera")
        config[pid] = {"imageMode": {"imageTopic": image, "annotations": {annotations: {"visible": True}},
                                     "synchronize": bool(synchronize)}}
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
    src = p.add_mutually_exclusive_group()
    src.add_argument("--rig", default=str(EXAMPLE_RIG), metavar="FILE",
                     help="camera rig file, as for the launch file's rig_file (default: the example rig %(default)s)")
    src.add_argument("--cameras", nargs="*", metavar="C[=IMAGE_TOPIC]",
                     help="camera names (the node's `cameras`), optionally with the image topic Foxglove should "
                          "show (default C/image); none at all: the single-stream node")
    p.add_argument("--image-transport", default="raw", choices=("raw", "compressed"),
                   help="the node's image_transport, for rig cameras that do not set theirs (default: %(default)s)")
    p.add_argument("--namespace", default="/", help="the node's namespace (default: %(default)s)")
    p.add_argument("-o", "--output", default="-", help="file to write, - for stdout (default: %(default)s)")


def run(args) -> int:
    if args.cameras is not None:
        cams = parse_cameras(args.cameras) or [(None, None)]
    else:
        from ..ros import launch_actions

        if not hasattr(launch_actions, "read_rig"):
            print("this installation has no camera rig support; give --cameras", file=sys.stderr)
            return 2
        try:
            cams = rig_cameras(args.rig, args.image_transport)
        except launch_actions.LaunchFailure as exc:  # names the file and the problem
            print(f"foxglove-layout: {exc}", file=sys.stderr)
            return 2
    text = dumps(layout(cams, args.namespace))
    if args.output == "-":
        sys.stdout.write(text)
    else:
        pathlib.Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    return 0
