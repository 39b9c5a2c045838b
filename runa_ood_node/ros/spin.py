"""A helper rclpy node spun in the background, in a context of its own (tools and tests)."""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator


@contextlib.contextmanager
def spinning_node(name: str) -> Iterator["rclpy.node.Node"]:  # noqa: F821
    """Yield a node named ``name`` whose own context and single-threaded executor spin in a
    daemon thread; on exit stop the executor, join the thread (never leave one inside rclpy when
    the context goes away), destroy the node and shut the context down."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node(name, context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, name=f"{name}_spin", daemon=True)
    spinner.start()
    try:
        yield node
    finally:
        executor.shutdown(timeout_sec=2.0)
        spinner.join(timeout=5.0)
        node.destroy_node()
        rclpy.try_shutdown(context=context)
