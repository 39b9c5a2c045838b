# Source this file (bash) to get runa_ood_node's environment:  source scripts/env.sh
_RUNA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VIRTUAL_ENV="$_RUNA_ROOT/.venv"
export PATH="$VIRTUAL_ENV/bin:$PATH"
# ament index must see the venv's wheels; colcon's setup replaces the variable, so venv first.
export AMENT_PREFIX_PATH="$VIRTUAL_ENV"
if [ -f "$_RUNA_ROOT/ros2_ws/install/setup.bash" ]; then
  # colcon's setup scripts read unset variables: allow that even under `set -u`
  case $- in *u*) _RUNA_NOUNSET=1; set +u ;; *) _RUNA_NOUNSET=0 ;; esac
  # shellcheck disable=SC1091
  source "$_RUNA_ROOT/ros2_ws/install/setup.bash"
  [ "$_RUNA_NOUNSET" = 1 ] && set -u
  unset _RUNA_NOUNSET
  export AMENT_PREFIX_PATH="$_RUNA_ROOT/ros2_ws/install:$VIRTUAL_ENV"
fi
# Discovery stays on this machine (Fast DDS multicasts out of every interface by default).
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
export RUNA_OOD_ROOT="$_RUNA_ROOT"
unset _RUNA_ROOT
