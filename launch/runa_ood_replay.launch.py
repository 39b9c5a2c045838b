"""Bag-replay evaluation: runa_ood_node + a bag player, playback starting when the node is active.

    ros2 launch runa_ood_node runa_ood_replay.launch.py bag:=out/bag rate:=0.5

The defaults match what `runa-ood make-bag` records (`/camera/image_raw`, `/detections`,
`/ood/ground_truth`). The launch drives the node's lifecycle (configure, then activate) and starts
the player only when the node reports the `active` state, however long the model takes to load.
Record the outputs with e.g. `ros2 bag record /ood/detections /ood/driver_alert /ood/ground_truth`
and score them with `runa-ood evaluate --bag <recording>`. The node keeps running after the bag
ends (so the last frames are scored and a recorder can finish): Ctrl-C ends the launch (status 0).
A failed configure/activate, or a player or node exiting with an error, ends the launch with
status 1 (see runa_ood_node/ros/launch_actions.py).

Arguments (`--show-args`):
    bag               bag folder to play (required)
    rate              playback rate; lower it when scoring is slower than real time       [1.0]
    params_file       parameter YAML                    [share/runa_ood_node/config/runa_ood.yaml]
    image_topic       image topic in the bag                                  [/camera/image_raw]
    detections_topic  detections topic in the bag                                   [/detections]
    namespace         node namespace                                                          [""]
    log_level         debug | info | warn | error                                           [info]
    player            auto | ros2_bag | runa_ood                                            [auto]
                      auto: `ros2 bag play --clock` when rosbag2 is installed (the node then uses
                      simulated time), else `runa-ood replay` (rclpy, no rosbag2; wall time)
    required          end the launch with an error when the node or the player fails        [true]

Stamps drive everything the node computes (pairing, alerts), so the results do not depend on the
playback rate as long as nothing is dropped: check `drops.processing_overload` in /diagnostics.
Images are subscribed reliable here (`image_qos: reliable`) so that no frame is lost in transport.
"""
import importlib.util
import os
import shutil

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, ExecuteProcess, OpaqueFunction, RegisterEventHandler
from launch.substitutions import LaunchConfiguration
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition

from runa_ood_node.ros.launch_actions import fail_launch_on_error, lifecycle_failure_ends_launch, monitor_node

PLAYERS = ("auto", "ros2_bag", "runa_ood")


def _resolve_player(context) -> str:
    player = LaunchConfiguration("player").perform(context).strip().lower()
    if player not in PLAYERS:
        raise ValueError(f"player must be one of {PLAYERS}, got {player!r}")
    if player == "auto":
        has_rosbag2 = shutil.which("ros2") is not None and importlib.util.find_spec("ros2bag") is not None
        player = "ros2_bag" if has_rosbag2 else "runa_ood"
    return player


def _setup(context):
    player = _resolve_player(context)
    sim_time = player == "ros2_bag"  # ros2 bag play --clock publishes /clock; runa-ood replay does not
    image_topic = LaunchConfiguration("image_topic")
    detections_topic = LaunchConfiguration("detections_topic")
    required = LaunchConfiguration("required")
    node = monitor_node(image_topic, detections_topic,
                        [LaunchConfiguration("params_file"),
                         {"use_sim_time": sim_time, "autostart": False, "image_qos": "reliable",
                          "detections_qos": "reliable", "image_queue_size": 100, "detections_queue_size": 100,
                          "processing_queue_size": 100}])
    bag, rate = LaunchConfiguration("bag"), LaunchConfiguration("rate")
    if player == "ros2_bag":
        cmd = ["ros2", "bag", "play", bag, "--clock", "--rate", rate, "--delay", "1.0"]
    else:
        img = image_topic.perform(context)
        cmd = ["runa-ood", "replay", bag, "--rate", rate, "--wait-subscribers", "1", "--wait-topics", img,
               img.rstrip("/") + "/compressed", detections_topic, "--node-name", "runa_ood_bag_player"]
    play = ExecuteProcess(cmd=cmd, name="bag_player", output="screen")

    def transition(tid):
        return EmitEvent(event=ChangeState(lifecycle_node_matcher=lambda action: action is node, transition_id=tid))

    return [
        node,
        fail_launch_on_error(node, "the OOD monitor runa_ood_node", required),
        lifecycle_failure_ends_launch(node, required),
        # the launch is the lifecycle manager: configure, activate, then play (never on a timer)
        RegisterEventHandler(OnStateTransition(target_lifecycle_node=node, start_state="configuring",
                                               goal_state="inactive", handle_once=True,
                                               entities=[transition(Transition.TRANSITION_ACTIVATE)])),
        RegisterEventHandler(OnStateTransition(target_lifecycle_node=node, goal_state="active", handle_once=True,
                                               entities=[play, fail_launch_on_error(play, "the bag player", required,
                                                                                   shutdown_on_success=False)])),
        transition(Transition.TRANSITION_CONFIGURE),
    ]


def generate_launch_description():
    share = get_package_share_directory("runa_ood_node")
    return LaunchDescription([
        DeclareLaunchArgument("bag", description="bag folder to play (e.g. written by `runa-ood make-bag`)"),
        DeclareLaunchArgument("rate", default_value="1.0",
                              description="playback rate; lower it when scoring is slower than real time"),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "runa_ood.yaml"),
                              description="parameter YAML file (the launch sets autostart false, reliable "
                                          "input QoS and long queues on top of it)"),
        DeclareLaunchArgument("image_topic", default_value="/camera/image_raw",
                              description="image topic in the bag (runa-ood make-bag: /camera/image_raw; "
                                          "image_transport compressed: <image_topic>/compressed)"),
        DeclareLaunchArgument("detections_topic", default_value="/detections",
                              description="vision_msgs/Detection2DArray topic in the bag"),
        DeclareLaunchArgument("namespace", default_value="", description="node namespace"),
        DeclareLaunchArgument("log_level", default_value="info", description="debug | info | warn | error"),
        DeclareLaunchArgument("player", default_value="auto",
                              description="auto | ros2_bag | runa_ood: auto = `ros2 bag play --clock` when "
                                          "rosbag2 is installed (node on simulated time), else `runa-ood replay`"),
        DeclareLaunchArgument("required", default_value="true",
                              description="true: a failing node (or player, or lifecycle transition) ends the "
                                          "launch with status 1; false: only logged"),
        OpaqueFunction(function=_setup),
    ])
