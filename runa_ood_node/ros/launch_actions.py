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
"""
from __future__ import annotations

from typing import List, Optional

__all__ = ["LaunchFailure", "monitor_node", "fail_launch_on_error", "lifecycle_failure_ends_launch"]


class LaunchFailure(RuntimeError):
    """Raised inside the launch loop: ``ros2 launch`` logs it and exits with status 1."""


def monitor_node(image_topic, detections_topic, parameters: List):
    """The ``runa_ood`` LifecycleNode both launch files start: namespace and log level from the
    ``namespace`` / ``log_level`` launch arguments, ``parameters`` as given, and the inputs remapped
    (``image`` and ``image/compressed`` follow ``image_topic``, ``detections`` ``detections_topic``)."""
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
        ],
        ros_arguments=["--log-level", LaunchConfiguration("log_level")],  # launch_ros (>= Humble) adds --ros-args
    )


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
