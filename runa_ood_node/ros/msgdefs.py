"""Message definitions of ``vision_msgs``, ``runa_ood_msgs`` and ``foxglove_msgs`` for offline (rosbags) tools.

The bag tools (make-bag, replay, evaluate) read and write ROS 2 bags with ``rosbags``, which needs
the ``.msg`` text of every non-standard type. This module finds those files and registers them in
a rosbags type store, so bags written offline carry exactly the definitions (and RIHS01 type
hashes) that rosidl gives the running node.

No rclpy import here: these functions work without a sourced ROS environment.

:func:`shared_typestore` (one per process), :func:`decode` and :func:`encode` serve the bag tools
for every other message. The node's inputs and its outputs that embed detections are read and
written by ``ros.wire`` straight from and to the bytes (the bag tools read those inputs with it too).

Where the .msg files come from (:func:`msg_dir`), first match wins:

1. ``$RUNA_OOD_MSG_PATH`` (``os.pathsep``-separated roots); each root may hold ``<pkg>/msg/*.msg``
   or ``share/<pkg>/msg/*.msg``;
2. the installed package (``share/<pkg>/msg``) found through ``ament_index_python``, i.e. what
   rclpy uses at run time (a system ``vision_msgs`` wins over ours there, as it should);
3. the repository's sources ``ros2_ws/src/<pkg>/msg`` (a source checkout without a build).
"""
from __future__ import annotations

import functools
import os
import pathlib
import re
from typing import Dict, Iterable, List, Optional, Sequence

#: Packages registered by :func:`register_types`, in dependency order (foxglove_msgs: the image
#: annotations the node publishes for Foxglove, ``ros2_ws/src/foxglove_msgs``).
PACKAGES = ("vision_msgs", "runa_ood_msgs", "foxglove_msgs")

#: Upstream type hashes, as rosidl computes them (ros-perception/vision_msgs, ros2 branch;
#: foxglove_msgs 3.x as released, see ros2_ws/src/foxglove_msgs). Used by tests and by tools that
#: warn when a local package is not wire-compatible.
UPSTREAM_TYPE_HASHES = {
    "vision_msgs/msg/Detection2DArray":
        "RIHS01_214274120007f4a683866481336b70310268cfa107aebe9d594a6acf75bda968",
    "vision_msgs/msg/LabelInfo":
        "RIHS01_3d37df4015cdf660cc851c51897f2acd957e1ca6205ba0a99aebffb9406b0783",
    "vision_msgs/msg/VisionClass":
        "RIHS01_1e4a11f0fed50b5623cb8ff26ca0e37952a48a9c074d16f804b44e9164c2037a",
    "foxglove_msgs/msg/ImageAnnotations":
        "RIHS01_47c6c0891ba263ec1b20d9b785c4261d4bc41051cbcc01668130e36aa2dcaee3",
}

MSG_PATH_ENV = "RUNA_OOD_MSG_PATH"
_REPO_SRC = pathlib.Path(__file__).resolve().parents[2] / "ros2_ws" / "src"


class MsgDefinitionError(RuntimeError):
    """The .msg files of a package cannot be found or do not parse."""


def _has_msgs(path: pathlib.Path) -> bool:
    return path.is_dir() and any(path.glob("*.msg"))


def _candidates(package: str) -> List[pathlib.Path]:
    out: List[pathlib.Path] = []
    for root in filter(None, os.environ.get(MSG_PATH_ENV, "").split(os.pathsep)):
        r = pathlib.Path(root).expanduser()
        out += [r / package / "msg", r / "share" / package / "msg"]
    try:  # installed (colcon install/ or a system ROS); pure Python, no rclpy
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

        try:
            out.append(pathlib.Path(get_package_share_directory(package)) / "msg")
        except (PackageNotFoundError, ValueError, LookupError):
            pass
    except ImportError:
        pass
    out.append(_REPO_SRC / package / "msg")
    return out


def msg_dir(package: str) -> pathlib.Path:
    """Directory holding ``package``'s ``*.msg`` files (see the module docstring for the order).

    Raises:
        MsgDefinitionError: no candidate directory holds .msg files.
    """
    cands = _candidates(package)
    for c in cands:
        if _has_msgs(c):
            return c
    raise MsgDefinitionError(
        f"no .msg files for {package!r}; looked in: " + ", ".join(str(c) for c in cands))


_FIELD_TYPE = re.compile(r"^\s*([A-Za-z][\w/]*)")


def _strip_comment(line: str) -> str:
    """Drop a ``#`` comment (``#`` inside a string constant's value is kept)."""
    if "#" not in line:
        return line
    # string constants: `string NAME=value # not a comment`; keep everything after '='
    m = re.match(r"^\s*string\s+\w+\s*=", line)
    return line if m else line.split("#", 1)[0]


def _dependencies(text: str, package: str) -> List[str]:
    """Full names (``pkg/msg/Type``) of the message types a .msg text refers to."""
    deps = []
    for line in text.splitlines():
        line = _strip_comment(line).strip()
        if not line:
            continue
        m = _FIELD_TYPE.match(line)
        if not m:
            continue
        typ = re.sub(r"\[.*$", "", m.group(1))  # drop array suffix
        typ = typ.split("<=")[0]
        if "/" in typ:
            parts = typ.split("/")
            deps.append(f"{parts[0]}/msg/{parts[-1]}")
        elif typ[:1].isupper():
            deps.append("std_msgs/msg/Header" if typ == "Header" else f"{package}/msg/{typ}")
    return deps


def message_texts(package: str, directory: Optional[pathlib.Path] = None) -> Dict[str, str]:
    """``{"pkg/msg/Type": msg_text}`` for every .msg file of ``package``, in dependency order.

    Dependencies inside the package come before their users (a stable topological order; ties
    sorted by name), so registering them one by one never refers to an unknown type.
    """
    directory = directory or msg_dir(package)
    texts = {f"{package}/msg/{p.stem}": p.read_text() for p in sorted(directory.glob("*.msg"))}
    order: List[str] = []
    state: Dict[str, int] = {}

    def visit(name: str, chain: Sequence[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise MsgDefinitionError("circular message dependency: " + " -> ".join([*chain, name]))
        state[name] = 1
        for dep in _dependencies(texts[name], package):
            if dep in texts:
                visit(dep, [*chain, name])
        state[name] = 2
        order.append(name)

    for name in sorted(texts):
        visit(name, [])
    return {n: texts[n] for n in order}


def register_types(typestore, packages: Iterable[str] = PACKAGES) -> List[str]:
    """Register the messages of ``packages`` (default: vision_msgs, then runa_ood_msgs).

    Args:
        typestore: a rosbags type store, e.g. ``get_typestore(Stores.ROS2_KILTED)``; it must already
            hold the standard types the packages use (std_msgs, geometry_msgs, ...).
        packages: package names, dependencies first.

    Returns:
        The registered type names (``pkg/msg/Type``), in registration order.

    Raises:
        MsgDefinitionError: a package's .msg files are missing or do not parse.
        rosbags.typesys.TypesysError: a type is already present with a different definition.
    """
    from rosbags.typesys import get_types_from_msg

    names: List[str] = []
    for package in packages:
        for name, text in message_texts(package).items():
            try:
                typs = get_types_from_msg(text, name)
            except Exception as exc:  # rosbags raises its own parse errors
                raise MsgDefinitionError(f"cannot parse {name}: {exc}") from exc
            typestore.register(typs)
            names.append(name)
    return names


def typestore(packages: Iterable[str] = PACKAGES):
    """A fresh ``Stores.ROS2_KILTED`` rosbags type store with ``packages`` registered."""
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    register_types(store, packages)
    return store


class CdrError(ValueError):
    """Bytes that are not a valid serialized message of the expected type."""


@functools.lru_cache(maxsize=1)
def shared_typestore():
    """One type store per process (:func:`typestore` with the default packages), shared by the bag
    tools."""
    return typestore()


def decode(raw, msgtype: str):
    """The ``rosbags`` message (``pkg/msg/Type``) in the CDR bytes ``raw``; raises :class:`CdrError`
    on truncated or garbage data (rosbags raises assorted errors there)."""
    try:
        return shared_typestore().deserialize_cdr(raw, msgtype)
    except Exception as exc:
        raise CdrError(f"cannot deserialize {len(raw)} bytes as {msgtype}: {type(exc).__name__}: {exc}") from exc


def encode(msg, msgtype: str) -> bytes:
    """CDR bytes of a ``rosbags`` message (what rclpy's ``serialize_message`` gives for the same
    message, up to padding bytes)."""
    return bytes(shared_typestore().serialize_cdr(msg, msgtype))
