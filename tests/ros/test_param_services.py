"""The node's parameters over the real parameter services (DDS, loopback), as `ros2 param dump`,
rqt and every parameter GUI read them: list, get, describe and set from a separate client node.

Regression (issue 8): ``alert.roi`` was declared typed without a value, and rclpy then answered
every ``get_parameters`` request that included it with an empty list, so ``ros2 param dump`` printed
``ros__parameters: {}``.
"""
import threading

import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("runa_ood_msgs.msg", reason="build ros2_ws (scripts/setup.sh) and source scripts/env.sh")

from rcl_interfaces.msg import Parameter as ParameterMsg, ParameterType, ParameterValue  # noqa: E402
from rcl_interfaces.srv import DescribeParameters, GetParameters, ListParameters, SetParameters  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402

from runa_ood_node.ros import params as P  # noqa: E402
from runa_ood_node.ros.node import RunaOodNode  # noqa: E402

NAME = "runa_ood_param_probe"
_VALUE_FIELD = {ParameterType.PARAMETER_BOOL: "bool_value", ParameterType.PARAMETER_INTEGER: "integer_value",
                ParameterType.PARAMETER_DOUBLE: "double_value", ParameterType.PARAMETER_STRING: "string_value",
                ParameterType.PARAMETER_DOUBLE_ARRAY: "double_array_value",
                ParameterType.PARAMETER_STRING_ARRAY: "string_array_value"}


@pytest.fixture
def served():
    """A RunaOodNode (unconfigured: no model needed) spinning in its own context, and a client node in
    another context: every request crosses DDS."""
    node_ctx, client_ctx = rclpy.Context(), rclpy.Context()
    rclpy.init(context=node_ctx)
    rclpy.init(context=client_ctx)
    node = RunaOodNode(NAME, context=node_ctx,
                       parameter_overrides=[Parameter("alert.k", value=2), Parameter("autostart", value=False)])
    ex = SingleThreadedExecutor(context=node_ctx)
    ex.add_node(node)
    th = threading.Thread(target=ex.spin, daemon=True)
    th.start()
    client = rclpy.create_node("param_probe_client", context=client_ctx)
    client.executor_ = SingleThreadedExecutor(context=client_ctx)
    client.executor_.add_node(client)
    try:
        yield client
    finally:
        client.executor_.shutdown()
        client.destroy_node()
        ex.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=node_ctx)
        rclpy.shutdown(context=client_ctx)
        th.join(timeout=10)


def _call(client, srv_type, service, request):
    cli = client.create_client(srv_type, f"/{NAME}/{service}")
    assert cli.wait_for_service(timeout_sec=20.0), f"/{NAME}/{service} never appeared"
    fut = cli.call_async(request)
    client.executor_.spin_until_future_complete(fut, timeout_sec=20.0)
    assert fut.done(), f"no answer from /{NAME}/{service}"
    client.destroy_client(cli)
    return fut.result()


def _value(v: ParameterValue):
    field = _VALUE_FIELD[v.type]
    out = getattr(v, field)
    return list(out) if v.type in (ParameterType.PARAMETER_DOUBLE_ARRAY, ParameterType.PARAMETER_STRING_ARRAY) else out


def test_list_get_and_describe_every_parameter_over_dds(served):
    ours = [p.name for p in P.PARAMETERS]
    listed = _call(served, ListParameters, "list_parameters", ListParameters.Request()).result.names
    assert set(ours) <= set(listed)

    # what `ros2 param dump` does: get every listed parameter in one request
    got = _call(served, GetParameters, "get_parameters", GetParameters.Request(names=list(listed))).values
    assert len(got) == len(listed), "a parameter without a value empties the whole answer"
    values = dict(zip(listed, got))
    want = P.defaults()
    want["alert.k"], want["autostart"] = 2, False  # the overrides
    for name in ours:
        v = values[name]
        assert v.type != ParameterType.PARAMETER_NOT_SET, name
        assert _value(v) == pytest.approx(want[name]) if isinstance(want[name], float) else _value(v) == want[name], name
    assert values["alert.roi"].type == ParameterType.PARAMETER_DOUBLE_ARRAY

    desc = _call(served, DescribeParameters, "describe_parameters",
                 DescribeParameters.Request(names=list(listed))).descriptors
    assert len(desc) == len(listed)
    by_name = {d.name: d for d in desc}
    assert by_name["alert.roi"].type == ParameterType.PARAMETER_DOUBLE_ARRAY and by_name["alert.roi"].description
    assert by_name["model"].read_only and by_name["lam"].floating_point_range[0].to_value == 1.0


def test_set_roi_over_dds_is_validated(served):
    def set_roi(values):
        msg = ParameterMsg(name="alert.roi", value=ParameterValue(type=ParameterType.PARAMETER_DOUBLE_ARRAY,
                                                                  double_array_value=values))
        return _call(served, SetParameters, "set_parameters", SetParameters.Request(parameters=[msg])).results[0]

    assert set_roi([0.25, 0.5, 0.75, 1.0]).successful
    r = set_roi([0.5, 0.5, 0.2, 0.9])  # x2 < x1: refused by the node's validation
    assert not r.successful and "alert.roi" in r.reason
    got = _call(served, GetParameters, "get_parameters", GetParameters.Request(names=["alert.roi"])).values
    assert list(got[0].double_array_value) == [0.25, 0.5, 0.75, 1.0]
    assert set_roi([]).successful  # back to "no ROI"
