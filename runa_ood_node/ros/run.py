"""Run a lifecycle node as a process: the console script ``runa_ood_node`` (``ros.node.main``)."""
from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Callable, List, Optional

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

from . import rosout_logging


def run_node(make_node: Callable, args: Optional[List[str]] = None, exit_process: bool = True) -> int:
    """Run the node ``make_node()`` builds until Ctrl-C; the exit status.

    With ``autostart:=true`` (default) the node configures and activates itself; if that fails (e.g.
    the model weights are missing) the error is logged and the process exits with status 1 (under
    ``ros2 launch`` the package's launch files then end the launch with an error and a non-zero
    exit). With ``autostart:=false`` it waits, unconfigured, for a lifecycle manager.

    Python ``logging`` (this package, open_clip, the backends, ...) goes to the node's ROS logger
    and ``/rosout`` at the node's log level (:mod:`.rosout_logging`). Ctrl-C / SIGINT or SIGTERM end
    it with status 0; a second SIGINT during the clean-up (a terminal signals the whole process
    group and ``ros2 launch`` forwards SIGINT again) is ignored instead of killing the process.

    With ``exit_process`` (the console script) the process ends with ``os._exit(status)`` once the
    node, its threads and the ROS context are shut down: the interpreter's own teardown of torch and
    open_clip takes 2-7 s on a busy CPU, longer than ``ros2 launch`` waits after SIGINT before it
    escalates to SIGTERM (5 s) and logs an error.
    """
    try:
        rclpy.init(args=args)
    except Exception as exc:  # e.g. a malformed --ros-args rule: say so without a traceback
        print(f"runa_ood_node: cannot initialise ROS 2: {exc}", file=sys.stderr)
        return 2
    node = None
    code = 0
    try:
        node = make_node()
        rosout_logging.install(node.get_logger())
        if node.get_parameter("autostart").value and not node.autostart():
            node.get_logger().fatal("start-up failed (see the error above); exiting")
            code = 1
        else:
            executor = SingleThreadedExecutor()
            executor.add_node(node)
            executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the clean-up runs to its end
        if node is not None:
            _shut_down(node)
        rclpy.try_shutdown()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # rclpy restored the handler it had replaced
    if exit_process:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _shut_down(node) -> None:
    if rclpy.ok():  # after Ctrl-C the context is already shut down: no lifecycle transition then
        try:
            node.trigger_shutdown()
        except Exception:
            pass
    rosout_logging.uninstall()
    node.destroy_node()  # stops the scoring threads, releases the model; the node leaves the graph now


__all__ = ["run_node"]
