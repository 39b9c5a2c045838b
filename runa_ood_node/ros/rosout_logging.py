"""Python ``logging`` -> the ROS logger (console, log file and ``/rosout``), at the node's level.

The package's own modules (``runa_ood_node.core`` / ``.backends`` / ``.tools``) and its libraries
(open_clip, torch, onnxruntime, ...) report through Python's :mod:`logging`, which by default prints
to stderr past ``/rosout``, past ``--log-level`` and past the node's name. :func:`install` (called by
the node's ``main``) puts one :class:`RosoutHandler` on the root Python logger:

* a record of Python logger ``a.b`` is logged by the ROS logger ``<node logger>.a.b`` (a child of
  the node's logger: it appears on ``/rosout`` with that name and inherits the node's level, so
  ``--log-level warn`` or ``--log-level <ns>.runa_ood:=debug`` filter it like the node's own lines);
* levels map DEBUG -> DEBUG, INFO -> INFO, WARNING -> WARN, ERROR -> ERROR, CRITICAL -> FATAL;
* levels are set once, from the node logger's effective level when installed: the package's own
  loggers (``runa_ood_node.*``) log at that level; other libraries at that level but not below
  WARNING (their INFO chatter, e.g. open_clip's model-building steps, shows with ``--log-level debug``
  only). Records below the level are not even formatted;
* ``warnings.warn`` from libraries goes through logging too (``logging.captureWarnings``), logger
  ``py.warnings``.

:func:`uninstall` restores the previous root handlers, level and warning capture.
"""
from __future__ import annotations

import logging
import sys
import threading
from typing import Dict, List, Optional

__all__ = ["RosoutHandler", "install", "uninstall", "python_level"]

#: ROS (rcutils) severity -> Python logging level
_ROS_TO_PY = {10: logging.DEBUG, 20: logging.INFO, 30: logging.WARNING, 40: logging.ERROR, 50: logging.CRITICAL}


def python_level(ros_severity: int) -> int:
    """The Python logging level of a ROS severity (UNSET/0 -> DEBUG)."""
    for sev in sorted(_ROS_TO_PY, reverse=True):
        if int(ros_severity) >= sev:
            return _ROS_TO_PY[sev]
    return logging.DEBUG


class RosoutHandler(logging.Handler):
    """Forward Python log records to children of a ROS logger (see the module docstring)."""

    def __init__(self, ros_logger, level: int = logging.NOTSET):
        super().__init__(level)
        self.ros_logger = ros_logger
        self._children: Dict[str, object] = {}
        self._children_lock = threading.Lock()
        self.setFormatter(logging.Formatter("%(message)s"))

    def _child(self, name: str):
        with self._children_lock:
            child = self._children.get(name)
            if child is None:
                child = self.ros_logger.get_child(name if name and name != "root" else "python")
                self._children[name] = child
            return child

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            log = self._child(record.name)
            # rclpy keeps one severity per call site (file, line): one call per severity
            if record.levelno >= logging.CRITICAL:
                log.fatal(msg)
            elif record.levelno >= logging.ERROR:
                log.error(msg)
            elif record.levelno >= logging.WARNING:
                log.warning(msg)
            elif record.levelno >= logging.INFO:
                log.info(msg)
            else:
                log.debug(msg)
        except Exception:  # never let logging break the caller
            self.handleError(record)


_STATE: Dict[str, object] = {}
PACKAGE_LOGGER = "runa_ood_node"


def install(ros_logger, level: Optional[int] = None) -> RosoutHandler:
    """Route every Python log record (and ``warnings``) to children of ``ros_logger``.

    Args:
        ros_logger: an rclpy logger, normally ``node.get_logger()``.
        level: Python level of the package's loggers; default: ``ros_logger``'s effective level
            (libraries: the same, but at least WARNING unless it is DEBUG).
    Returns the handler (installed on the root logger, replacing its handlers until :func:`uninstall`).
    """
    uninstall()
    root = logging.getLogger()
    if level is None:
        try:
            level = python_level(int(ros_logger.get_effective_level()))
        except Exception:
            level = logging.INFO
    handler = RosoutHandler(ros_logger)
    pkg = logging.getLogger(PACKAGE_LOGGER)
    _STATE.update(handlers=list(root.handlers), level=root.level, pkg_level=pkg.level, handler=handler)
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level if level <= logging.DEBUG else max(level, logging.WARNING))
    pkg.setLevel(level)
    logging.captureWarnings(True)
    return handler


def uninstall() -> None:
    """Undo :func:`install` (no-op when not installed)."""
    handler = _STATE.pop("handler", None)
    if handler is None:
        return
    root = logging.getLogger()
    root.removeHandler(handler)
    previous: List[logging.Handler] = _STATE.pop("handlers", [])  # type: ignore[assignment]
    for h in previous:
        root.addHandler(h)
    root.setLevel(_STATE.pop("level", logging.WARNING))  # type: ignore[arg-type]
    logging.getLogger(PACKAGE_LOGGER).setLevel(_STATE.pop("pkg_level", logging.NOTSET))  # type: ignore[arg-type]
    logging.captureWarnings(False)
    try:
        handler.close()
    except Exception:  # pragma: no cover
        print("runa_ood_node: could not close the rosout logging handler", file=sys.stderr)
