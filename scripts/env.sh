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
# The ROS 2 launch / command-line tools built by scripts/ros2_tools.sh (no ROS installation here);
# a system installation's `ros2` (sourced before this file) takes precedence.
if [ -x "$_RUNA_ROOT/.ros2_tools/site/bin/ros2" ] && ! command -v ros2 >/dev/null 2>&1; then
  export PYTHONPATH="$_RUNA_ROOT/.ros2_tools/site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$_RUNA_ROOT/.ros2_tools/site/bin:$PATH"
  case $- in *u*) _RUNA_NOUNSET=1; set +u ;; *) _RUNA_NOUNSET=0 ;; esac
  # shellcheck disable=SC1091
  source "$_RUNA_ROOT/.ros2_tools/ws/install/local_setup.bash"
  [ "$_RUNA_NOUNSET" = 1 ] && set -u
  unset _RUNA_NOUNSET
fi
# Discovery stays on this machine (Fast DDS multicasts out of every interface by default).
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
export RUNA_OOD_ROOT="$_RUNA_ROOT"
# A development checkout with the shared data pack beside it: the tools' default --annotations.
if [ -z "${RUNA_OOD_DATA_PACK:-}" ] && [ -f "$_RUNA_ROOT/../shared/data/ood_pack/annotations.json" ]; then
  RUNA_OOD_DATA_PACK="$(cd "$_RUNA_ROOT/../shared/data/ood_pack" && pwd)/annotations.json"
  export RUNA_OOD_DATA_PACK
fi
unset _RUNA_ROOT
