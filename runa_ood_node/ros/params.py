"""The node's parameters on ROS: declarations (descriptors from the one table), reading them back.

The table itself, its defaults, the validation of values and the settings they produce are ROS-free
and live in :mod:`runa_ood_node.core.parameters` (read its docstring for when parameters take effect
and their units); every name of it is re-exported here, so ``ros.params.validate`` /
``ros.params.PARAMETERS`` keep working. This module holds only what needs rclpy:
:func:`declare_parameters`, :func:`declare_camera_parameters`, :func:`read_parameters` and the
``ParameterDescriptor`` of a row.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List

from ..core.config import validate  # noqa: F401 (validation: values, rules, files once)
from ..core.parameters import *  # noqa: F401,F403 (the table and its checks, re-exported)
from ..core.parameters import __all__ as _core_all
from ..core.parameters import (_BY_NAME, _CAMERA_PREFIX, _NAME_CHARS, CAMERA_OVERRIDES, PARAMETERS, ParamSpec,
                               camera_parameter)

__all__ = list(_core_all) + ["validate", "declare_parameters", "read_parameters", "declare_camera_parameters"]


# ------------------------------------------------------------------------------------ rclpy glue
def _descriptor(spec: ParamSpec):
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType

    d = ParameterDescriptor(name=spec.name, description=spec.describe(), read_only=spec.read_only)
    if spec.choices:
        d.additional_constraints = f"one of: {', '.join(spec.choices)}"
    kind = spec.kind
    d.type = {"bool": ParameterType.PARAMETER_BOOL, "int": ParameterType.PARAMETER_INTEGER,
              "float": ParameterType.PARAMETER_DOUBLE, "str": ParameterType.PARAMETER_STRING,
              "double_array": ParameterType.PARAMETER_DOUBLE_ARRAY,
              "string_array": ParameterType.PARAMETER_STRING_ARRAY}[kind]
    if kind == "int" and spec.lo is not None:
        d.integer_range = [IntegerRange(from_value=int(spec.lo), to_value=int(spec.hi), step=0)]
    elif kind == "float" and spec.lo is not None:
        d.floating_point_range = [FloatingPointRange(from_value=float(spec.lo), to_value=float(spec.hi), step=0.0)]
    return d


def declare_parameters(node) -> None:
    """Declare every parameter of :data:`PARAMETERS` on ``node`` (an rclpy Node), each with a value.

    An array parameter is declared typed (DOUBLE_ARRAY) and, when no override gave it a value, set
    to its default (``[]``): rclpy infers BYTE_ARRAY from a plain empty list, and a parameter left
    without a value makes rclpy answer every get/list/describe request that includes it with an
    empty list (``ros2 param dump`` then shows no parameter at all)."""
    from rclpy.parameter import Parameter

    for spec in PARAMETERS:
        if node.has_parameter(spec.name):
            continue
        if spec.kind.endswith("_array"):
            typ = Parameter.Type.STRING_ARRAY if spec.kind == "string_array" else Parameter.Type.DOUBLE_ARRAY
            desc = _descriptor(spec)
            writable = dataclasses.replace(spec, read_only=False)  # a read-only one cannot be given its value
            p = node.declare_parameter(spec.name, typ, _descriptor(writable))
            if p.value is None:
                node.set_parameters([Parameter(spec.name, typ, [float(x) for x in spec.default]
                                               if typ == Parameter.Type.DOUBLE_ARRAY else list(spec.default))])
            if spec.read_only:
                node.set_descriptor(spec.name, desc)
        else:
            node.declare_parameter(spec.name, spec.default, _descriptor(spec))


def declare_camera_parameters(node) -> List[str]:
    """Declare ``camera.<C>.<name>`` for each camera C of the node's ``cameras`` parameter and each
    of :data:`CAMERA_OVERRIDES`, defaulting to the node-wide value (after :func:`declare_parameters`;
    malformed camera names are left to :func:`validate`). Returns the names declared."""
    cams = node.get_parameter("cameras").value or []
    declared = []
    for cam in cams:
        if not isinstance(cam, str) or not cam or set(cam) - _NAME_CHARS:
            continue
        for name in CAMERA_OVERRIDES:
            spec = _BY_NAME[name]
            key = camera_parameter(cam, name)
            if not node.has_parameter(key):
                desc = dataclasses.replace(spec, name=key, description=f"Camera {cam}: {spec.description}")
                node.declare_parameter(key, node.get_parameter(name).value, _descriptor(desc))
            declared.append(key)
    return declared


def read_parameters(node) -> Dict[str, Any]:
    """Current values of every declared parameter (arrays as lists)."""
    out = {}
    for spec in PARAMETERS:
        v = node.get_parameter(spec.name).value
        out[spec.name] = list(v) if spec.kind.endswith("_array") and v is not None else v
    for suffix, prm in node.get_parameters_by_prefix(_CAMERA_PREFIX[:-1]).items():  # camera.<C>.<name>
        out[_CAMERA_PREFIX + suffix] = prm.value
    return out
