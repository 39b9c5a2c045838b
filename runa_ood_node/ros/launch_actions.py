"""Launch-file building blocks shared by ``launch/runa_ood.launch.py`` and ``runa_ood_replay.launch.py``.

Imported only by launch files (it needs ``launch`` / ``launch_ros``, which the node itself does not).

**Failure policy.** ``launch`` 3.x ends ``ros2 launch`` with status 0 whatever its processes did,
and its ``Shutdown`` action does too; a supervisor, a systemd unit or CI could not see that the OOD
monitor never came up. :func:`fail_launch_on_error` makes a process of these launch files
*required*: when it exits with a non-zero status while the launch is not already shutting down
(e.g. the node's start-up failed: no weights), the launch logs
``[ERROR] [launch]: ... runa_ood_node exited with status 1 ...``, stops everything else and
``ros2 launch`` exits with status 1. A clean exit (status 0) shuts the launch down normally.
Launch argument ``required:=false`` turns this off (the node's failure is then only logged), for
including these launch files in a larger stack that must keep running.

**Camera rigs.** :func:`read_rig` reads a camera rig file (``config/camera_rig.example.yaml``): per
camera its name, image and detections topics, and optionally the per-camera input overrides
(``image_transport``, ``image_qos``, ``detections_qos``, ``image_queue_size``,
``detections_queue_size``); :func:`camera_setup` turns it (or a plain ``cameras:=front,left`` list)
into the node's ``cameras`` / ``camera.<C>.*`` parameters and the remaps of ``<C>/image``,
``<C>/image/compressed`` and ``<C>/detections``.

**Transport.** :func:`fastdds_profile_env` turns the ``fastdds_profile`` launch argument into the
environment of the node's process: by default the shipped ``config/fastdds_one_host.xml`` (images
through shared memory in one piece, UDP on loopback only), so that the node does not lose images
in Fast DDS's default 512 KiB fragments (``runa_ood_node.ros.transport``); ``none`` or empty
applies nothing (the process inherits the environment: on a vehicle whose pipeline spans several
computers, where loopback-only UDP would cut the node off).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["LaunchFailure", "monitor_node", "fail_launch_on_error", "lifecycle_failure_ends_launch",
           "read_rig", "parse_camera_list", "camera_setup", "RIG_KEYS", "fastdds_profile_env"]


class LaunchFailure(RuntimeError):
    """Raised inside the launch loop: ``ros2 launch`` logs it and exits with status 1."""


def monitor_node(image_topic, detections_topic, parameters: List, camera_remaps: Sequence[Tuple[str, str]] = (),
                 additional_env: Optional[Dict[str, str]] = None):
    """The ``runa_ood`` LifecycleNode both launch files start: namespace and log level from the
    ``namespace`` / ``log_level`` launch arguments, ``parameters`` as given, and the inputs remapped
    (``image`` and ``image/compressed`` follow ``image_topic``, ``detections`` ``detections_topic``;
    ``camera_remaps`` (:func:`camera_setup`) the cameras' inputs); ``additional_env`` (e.g.
    :func:`fastdds_profile_env`) added to the process's environment."""
    from launch.substitutions import LaunchConfiguration, PythonExpression
    from launch_ros.actions import LifecycleNode

    return LifecycleNode(
        package="runa_ood_node",
        executable="runa_ood_node",
        name="runa_ood",
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        emulate_tty=True,
        parameters=parameters,
        remappings=[
            ("image", image_topic),
            ("image/compressed", PythonExpression(["'", image_topic, "' + '/compressed'"])),
            ("detections", detections_topic),
            *camera_remaps,
        ],
        ros_arguments=["--log-level", LaunchConfiguration("log_level")],  # launch_ros (>= Humble) adds --ros-args
        **({"additional_env": dict(additional_env)} if additional_env else {}),
    )


def fastdds_profile_env(choice: str) -> Dict[str, str]:
    """The environment that makes a process use the Fast DDS profile ``choice`` (the
    ``fastdds_profile`` launch argument): a profile file (``one-host`` = the shipped
    config/fastdds_one_host.xml) in FASTDDS_DEFAULT_PROFILES_FILE (Fast DDS 3) and
    FASTRTPS_DEFAULT_PROFILES_FILE (Fast DDS 2); ``none``, empty or ``env``: ``{}`` (nothing applied,
    the environment's own setting stays). Raises :class:`LaunchFailure` naming a missing file."""
    from .transport import PROFILE_ENV_VARS, fastdds_profile

    choice = (choice or "").strip()
    if choice.lower() in ("", "none", "env"):
        return {}
    try:
        path = fastdds_profile(choice)
    except FileNotFoundError as exc:
        raise LaunchFailure(f"launch argument fastdds_profile: {exc} (none = apply no profile)") from None
    return {var: path for var in PROFILE_ENV_VARS} if path else {}


#: keys of a camera in a rig file: name, its topics, and the per-camera input overrides
RIG_KEYS = ("name", "image_topic", "detections_topic", "image_transport", "image_qos", "detections_qos",
            "image_queue_size", "detections_queue_size")


def parse_camera_list(text: str) -> List[str]:
    """``front,left right`` or ``['front', 'left']`` (the ``cameras`` launch argument) -> names."""
    text = (text or "").strip().strip("[]")
    return [t.strip().strip("'\"") for t in text.replace(",", " ").split() if t.strip().strip("'\"")]


def read_rig(path: str) -> List[Dict[str, Any]]:
    """The cameras of a rig file: ``cameras:`` a list of ``{name, image_topic, detections_topic,
    image_transport, ...}`` (only ``name`` required). Raises :class:`LaunchFailure` naming the file and
    the problem (unknown key, with the closest known one; missing / duplicate name)."""
    import difflib
    import os

    import yaml

    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise LaunchFailure(f"camera rig file {path!r}: {exc}") from None
    cams = data.get("cameras") if isinstance(data, dict) else None
    if not isinstance(cams, list) or not cams:
        raise LaunchFailure(f"camera rig file {path!r}: needs a non-empty list 'cameras:' of "
                            f"{{name, image_topic, detections_topic, ...}}")
    out, seen = [], set()
    for i, cam in enumerate(cams):
        if not isinstance(cam, dict) or not isinstance(cam.get("name"), str) or not cam["name"].strip():
            raise LaunchFailure(f"camera rig file {path!r}: camera #{i + 1} needs a 'name'")
        for key in cam:
            if key not in RIG_KEYS:
                near = difflib.get_close_matches(str(key), RIG_KEYS, n=1, cutoff=0.5)
                raise LaunchFailure(f"camera rig file {path!r}: camera {cam['name']!r}: unknown key {key!r}"
                                    + (f" (did you mean {near[0]!r}?)" if near else "")
                                    + f"; known keys: {', '.join(RIG_KEYS)}")
        if cam["name"] in seen:
            raise LaunchFailure(f"camera rig file {path!r}: camera {cam['name']!r} appears twice")
        seen.add(cam["name"])
        out.append(dict(cam))
    return out


def camera_setup(cameras: str = "", rig_file: str = "") -> Tuple[Dict[str, Any], List[Tuple[str, str]]]:
    """The node parameters (``cameras``, ``camera.<C>.<override>``) and remaps for the ``cameras``
    and ``rig_file`` launch arguments: a rig file gives every camera's topics and overrides (with
    ``cameras`` too: only those of its cameras); ``cameras`` alone gives names whose inputs keep
    their default names ``<C>/image``, ``<C>/detections``. Neither: ``({}, [])`` (one stream)."""
    names = parse_camera_list(cameras)
    rig = read_rig(rig_file) if rig_file.strip() else []
    if rig:
        by_name = {c["name"]: c for c in rig}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise LaunchFailure(f"cameras {missing} are not in the rig file {rig_file!r} ({', '.join(by_name)})")
        rig = [by_name[n] for n in names] if names else rig
        names = [c["name"] for c in rig]
    if not names:
        return {}, []
    params: Dict[str, Any] = {"cameras": names}
    remaps: List[Tuple[str, str]] = []
    for cam in rig:
        c = cam["name"]
        for key, value in cam.items():
            if key not in ("name", "image_topic", "detections_topic"):
                params[f"camera.{c}.{key}"] = value
        if cam.get("image_topic"):
            remaps += [(f"{c}/image", str(cam["image_topic"])), (f"{c}/image/compressed", f"{cam['image_topic']}/compressed")]
        if cam.get("detections_topic"):
            remaps.append((f"{c}/detections", str(cam["detections_topic"])))
    return params, remaps


def _is_required(context, required) -> bool:
    """The ``required`` launch substitution's value (None = true)."""
    from launch.utilities import perform_substitutions

    return required is None or perform_substitutions(context, [required]).strip().lower() in ("true", "1", "yes")


def fail_launch_on_error(target_action, what: str, required=None, shutdown_on_success: bool = True):
    """``RegisterEventHandler(OnProcessExit(target_action, ...))`` implementing the failure policy
    above. ``required``: a launch substitution (``LaunchConfiguration('required')``) or None (= true).
    ``shutdown_on_success``: a status-0 exit also ends the launch (else it changes nothing)."""
    from launch.actions import EmitEvent, RegisterEventHandler
    from launch.event_handlers import OnProcessExit
    from launch.events import Shutdown

    def on_exit(event, context) -> Optional[List]:
        if context.is_shutdown or not _is_required(context, required):
            return None
        if event.returncode != 0:
            raise LaunchFailure(f"{what} ({event.action.name}) exited with status {event.returncode}; see its "
                                "error above. Ending the launch with an error.")
        return [EmitEvent(event=Shutdown(reason=f"{what} exited"))] if shutdown_on_success else None

    return RegisterEventHandler(OnProcessExit(target_action=target_action, on_exit=on_exit))


def lifecycle_failure_ends_launch(lifecycle_node, required=None):
    """End the launch with an error when a launch-driven transition of ``lifecycle_node`` fails
    (configure / activate returning FAILURE, or an error in a transition): the node stays alive
    but unusable, which must not look like success. Returns a ``RegisterEventHandler``."""
    from launch.actions import OpaqueFunction, RegisterEventHandler
    from launch_ros.event_handlers import OnStateTransition

    failures = {("configuring", "unconfigured"), ("activating", "inactive")}

    def matcher(event) -> bool:
        from launch_ros.events.lifecycle import StateTransition

        return (isinstance(event, StateTransition) and event.action is lifecycle_node
                and ((event.start_state, event.goal_state) in failures or event.goal_state == "errorprocessing"))

    def fail(context):
        if not _is_required(context, required):
            return None
        ev = context.locals.event
        raise LaunchFailure(f"lifecycle transition {ev.transition!r} of {lifecycle_node.node_name} failed "
                            f"({ev.start_state} -> {ev.goal_state}); see its error above. Ending the launch "
                            "with an error.")

    return RegisterEventHandler(OnStateTransition(matcher=matcher, entities=[OpaqueFunction(function=fail)]))
