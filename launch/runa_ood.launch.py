"""Launch runa_ood_node on a vehicle (or any live camera + detector).

    ros2 launch runa_ood_node runa_ood.launch.py \
        image_topic:=/camera/image_raw detections_topic:=/yolo/detections namespace:=perception

Arguments (`ros2 launch runa_ood_node runa_ood.launch.py --show-args`):
    namespace         node namespace; the node's relative topics (ood/...) follow it   [""]
    params_file       parameter YAML                 [share/runa_ood_node/config/runa_ood.yaml]
    image_topic       remap of the node's `image` input (and `image/compressed`)      [image]
    detections_topic  remap of the node's `detections` input                          [detections]
    cameras           one node, one model, every camera: `front,left,right` (or `['front','left']`);
                      inputs <C>/image, <C>/detections, outputs <C>/ood/...; with rig_file: a subset  [""]
    rig_file          camera rig YAML (config/camera_rig.example.yaml): per camera its name, image and
                      detections topics (remapped), transport / QoS / queue overrides             [""]
    use_sim_time      use /clock (bag replay)                                         [false]
    log_level         debug | info | warn | error (also filters Python logging)       [info]
    required          end the launch with an error when the node fails                [true]
    fastdds_profile   Fast DDS profile for the node's process: a file, `none` (or '') = apply none
                      (the environment's own FASTDDS_DEFAULT_PROFILES_FILE stays)
                      [share/runa_ood_node/config/fastdds_one_host.xml]

Transport: by default the node's process uses the shipped Fast DDS profile (images through shared
memory in one piece; UDP on loopback only): with Fast DDS's default transports a 640x480 image is
cut into 512 KiB fragments that are lost in bursts (a three-camera rig answered 1 of 150 frames).
The publishers decide how a message is cut: point the camera drivers and the detector at the same
file (export FASTDDS_DEFAULT_PROFILES_FILE=...). On a vehicle whose pipeline spans several
computers use `fastdds_profile:=none` (or a profile allowing their interfaces). The node counts
what is lost in transport and warns naming the cause (parameters transport.*).

The node configures and activates itself (parameter ``autostart``, default true). If the model
cannot be loaded it logs the error and exits with status 1; with ``required:=true`` the launch then
logs ``[ERROR] [launch]: ... exited with status 1 ...`` and ``ros2 launch`` exits with status 1
(runa_ood_node/ros/launch_actions.py). Set ``autostart: false`` in the YAML to drive the lifecycle
from a lifecycle manager instead. Ctrl-C ends everything with status 0.

A camera rig (one node, one model, three cameras):

    ros2 launch runa_ood_node runa_ood.launch.py rig_file:=$(ros2 pkg prefix runa_ood_node)/share/runa_ood_node/config/camera_rig.example.yaml

A malformed rig file (unknown key, missing name) ends the launch with an error naming it.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.parameter_descriptions import ParameterValue

from runa_ood_node.ros.launch_actions import camera_setup, fail_launch_on_error, fastdds_profile_env, monitor_node


def _node(context):
    """The node, with the cameras of the ``cameras`` / ``rig_file`` arguments (after the params file)."""
    cam_params, remaps = camera_setup(LaunchConfiguration("cameras").perform(context),
                                      LaunchConfiguration("rig_file").perform(context))
    params = [LaunchConfiguration("params_file"),
              {"use_sim_time": ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool)}]
    if cam_params:
        params.append(cam_params)
    env = fastdds_profile_env(LaunchConfiguration("fastdds_profile").perform(context))
    node = monitor_node(LaunchConfiguration("image_topic"), LaunchConfiguration("detections_topic"), params, remaps,
                        additional_env=env)
    said = (f"runa_ood_node: Fast DDS profile {next(iter(env.values()))} (fastdds_profile:=none to apply none)"
            if env else "runa_ood_node: no Fast DDS profile applied (fastdds_profile:=none); the environment's stays")
    return [LogInfo(msg=said), node,
            fail_launch_on_error(node, "the OOD monitor runa_ood_node", LaunchConfiguration("required"))]


def generate_launch_description():
    share = get_package_share_directory("runa_ood_node")
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
        DeclareLaunchArgument("cameras", default_value="",
                              description="camera names (front,left,right): one node and one model for every "
                                          "camera; inputs <C>/image + <C>/detections, outputs <C>/ood/...; empty = "
                                          "one stream (or every camera of rig_file)"),
        DeclareLaunchArgument("rig_file", default_value="",
                              description="camera rig YAML (see config/camera_rig.example.yaml): per camera name, "
                                          "image_topic, detections_topic, image_transport, image_qos, ..."),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="use /clock (bag replay)"),
        DeclareLaunchArgument("log_level", default_value="info",
                              description="debug | info | warn | error; also filters Python logging"),
        DeclareLaunchArgument("required", default_value="true",
                              description="true: when the node exits with an error (e.g. start-up failed), end "
                                          "the launch and exit with status 1; false: only log it"),
        DeclareLaunchArgument("fastdds_profile", default_value=os.path.join(share, "config", "fastdds_one_host.xml"),
                              description="Fast DDS profile file for the node's process (FASTDDS_DEFAULT_PROFILES_FILE): "
                                          "default the shipped one (images through shared memory in one piece, UDP on "
                                          "loopback only); none or '' = apply none (pipelines spanning computers)"),
        OpaqueFunction(function=_node),
    ])
