"""Bag-replay evaluation: runa_ood_node on simulated time + `ros2 bag play --clock`.

    ros2 launch runa_ood_node runa_ood_replay.launch.py bag:=/data/ood_eval_bag rate:=0.5

The bag (written by `runa-ood make-bag`, or recorded on a vehicle) holds `image` (or
`image/compressed`), `detections` and optionally `ood/ground_truth`. Record the outputs with e.g.
`ros2 bag record /ood/detections /ood/driver_alert /ood/ground_truth` and score them with
`runa-ood evaluate --bag <recording>`. Without ROS 2 bag tooling (e.g. the PyPI wheels), `runa-ood replay`
plays a bag with rosbags instead.

Arguments:
    bag               bag folder to play (required)
    rate              playback rate; lower it when scoring is slower than real time    [1.0]
    params_file       parameter YAML                 [share/runa_ood_node/config/runa_ood.yaml]
    image_topic       image topic in the bag                                          [image]
    detections_topic  detections topic in the bag                                     [detections]
    namespace         node namespace                                                  [""]
    log_level                                                                         [info]

Stamps drive everything the node computes (pairing, alerts), so the results do not depend on the
playback rate as long as nothing is dropped: check `drops.processing_overload` in /diagnostics.
Images are played reliable here (`image_qos:=reliable`) so that no frame is lost in transport.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, TimerAction
from launch.substitutions import LaunchConfiguration, PythonExpression
from launch_ros.actions import LifecycleNode


def generate_launch_description():
    share = get_package_share_directory("runa_ood_node")
    bag = LaunchConfiguration("bag")
    rate = LaunchConfiguration("rate")
    image_topic = LaunchConfiguration("image_topic")
    detections_topic = LaunchConfiguration("detections_topic")

    node = LifecycleNode(
        package="runa_ood_node",
        executable="runa_ood_node",
        name="runa_ood",
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        emulate_tty=True,
        parameters=[LaunchConfiguration("params_file"),
                    {"use_sim_time": True, "image_qos": "reliable", "image_queue_size": 30,
                     "processing_queue_size": 30}],
        remappings=[
            ("image", image_topic),
            ("image/compressed", PythonExpression(["'", image_topic, "' + '/compressed'"])),
            ("detections", detections_topic),
        ],
        ros_arguments=["--log-level", LaunchConfiguration("log_level")],  # launch_ros (>= Humble) adds the --ros-args
    )
    # give the node time to load the model and subscribe before the bag starts
    play = TimerAction(period=5.0, actions=[ExecuteProcess(
        cmd=["ros2", "bag", "play", bag, "--clock", "--rate", rate],
        output="screen",
    )])
    return LaunchDescription([
        DeclareLaunchArgument("bag", description="bag folder to play"),
        DeclareLaunchArgument("rate", default_value="1.0", description="playback rate"),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "runa_ood.yaml")),
        DeclareLaunchArgument("image_topic", default_value="image"),
        DeclareLaunchArgument("detections_topic", default_value="detections"),
        DeclareLaunchArgument("namespace", default_value=""),
        DeclareLaunchArgument("log_level", default_value="info"),
        node,
        play,
    ])
