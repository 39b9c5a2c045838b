"""Launch runa_ood_node on a vehicle (or any live camera + detector).

    ros2 launch runa_ood_node runa_ood.launch.py \
        image_topic:=/camera/image_raw detections_topic:=/yolo/detections namespace:=perception

Arguments (`ros2 launch runa_ood_node runa_ood.launch.py --show-args`):
    namespace         node namespace; the node's relative topics (ood/...) follow it   [""]
    params_file       parameter YAML                 [share/runa_ood_node/config/runa_ood.yaml]
    image_topic       remap of the node's `image` input (and `image/compressed`)      [image]
    detections_topic  remap of the node's `detections` input                          [detections]
    use_sim_time      use /clock (bag replay)                                         [false]
    log_level         debug | info | warn | error (also filters Python logging)       [info]
    required          end the launch with an error when the node fails                [true]

The node configures and activates itself (parameter ``autostart``, default true). If the model
cannot be loaded it logs the error and exits with status 1; with ``required:=true`` the launch then
logs ``[ERROR] [launch]: ... exited with status 1 ...`` and ``ros2 launch`` exits with status 1
(runa_ood_node/ros/launch_actions.py). Set ``autostart: false`` in the YAML to drive the lifecycle
from a lifecycle manager instead. Ctrl-C ends everything with status 0.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.parameter_descriptions import ParameterValue

from runa_ood_node.ros.launch_actions import fail_launch_on_error, monitor_node


def generate_launch_description():
    share = get_package_share_directory("runa_ood_node")
    node = monitor_node(LaunchConfiguration("image_topic"), LaunchConfiguration("detections_topic"),
                        [LaunchConfiguration("params_file"),
                         {"use_sim_time": ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool)}])
    return LaunchDescription([
        DeclareLaunchArgument("namespace", default_value="",
                              description="node namespace; the node's relative topics (ood/...) follow it"),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "runa_ood.yaml"),
                              description="parameter YAML file (see config/runa_ood.yaml)"),
        DeclareLaunchArgument("image_topic", default_value="image",
                              description="input sensor_msgs/Image topic (image_transport compressed: "
                                          "<image_topic>/compressed)"),
        DeclareLaunchArgument("detections_topic", default_value="detections",
                              description="input vision_msgs/Detection2DArray topic"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="use /clock (bag replay)"),
        DeclareLaunchArgument("log_level", default_value="info",
                              description="debug | info | warn | error; also filters Python logging"),
        DeclareLaunchArgument("required", default_value="true",
                              description="true: when the node exits with an error (e.g. start-up failed), end "
                                          "the launch and exit with status 1; false: only log it"),
        node,
        fail_launch_on_error(node, "the OOD monitor runa_ood_node", LaunchConfiguration("required")),
    ])
