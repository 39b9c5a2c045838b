"""Launch runa_ood_node on a vehicle (or any live camera + detector).

    ros2 launch runa_ood_node runa_ood.launch.py \
        image_topic:=/camera/image_raw detections_topic:=/yolo/detections namespace:=perception

Arguments:
    namespace         node namespace; the node's relative topics (ood/...) follow it   [""]
    params_file       parameter YAML                 [share/runa_ood_node/config/runa_ood.yaml]
    image_topic       remap of the node's `image` input (and `image/compressed`)      [image]
    detections_topic  remap of the node's `detections` input                          [detections]
    use_sim_time      use /clock (bag replay)                                         [false]
    log_level         debug | info | warn | error                                     [info]

The node configures and activates itself (parameter ``autostart``, default true): if the model
cannot be loaded it logs the error and exits with status 1, so the launch shows the failure.
Set ``autostart:=false`` in the YAML to drive the lifecycle from a lifecycle manager instead.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PythonExpression
from launch_ros.actions import LifecycleNode
from launch_ros.parameter_descriptions import ParameterValue


def generate_launch_description():
    share = get_package_share_directory("runa_ood_node")
    namespace = LaunchConfiguration("namespace")
    params_file = LaunchConfiguration("params_file")
    image_topic = LaunchConfiguration("image_topic")
    detections_topic = LaunchConfiguration("detections_topic")
    use_sim_time = LaunchConfiguration("use_sim_time")
    log_level = LaunchConfiguration("log_level")

    return LaunchDescription([
        DeclareLaunchArgument("namespace", default_value="", description="node namespace"),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "runa_ood.yaml"),
                              description="parameter YAML file"),
        DeclareLaunchArgument("image_topic", default_value="image", description="input image topic"),
        DeclareLaunchArgument("detections_topic", default_value="detections",
                              description="input vision_msgs/Detection2DArray topic"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="use /clock"),
        DeclareLaunchArgument("log_level", default_value="info", description="logging level"),
        LifecycleNode(
            package="runa_ood_node",
            executable="runa_ood_node",
            name="runa_ood",
            namespace=namespace,
            output="screen",
            emulate_tty=True,
            parameters=[params_file, {"use_sim_time": ParameterValue(use_sim_time, value_type=bool)}],
            remappings=[
                ("image", image_topic),
                ("image/compressed", PythonExpression(["'", image_topic, "' + '/compressed'"])),
                ("detections", detections_topic),
            ],
            ros_arguments=["--log-level", log_level],  # launch_ros (>= Humble) adds the --ros-args
        ),
    ])
