#!/usr/bin/env bash
# The ROS 2 launch / command-line stack (ros2 launch, ros2 run/pkg/node/topic/param/lifecycle/service,
# launch_testing) for a machine without a ROS installation, built from the source archives in
# ../shared/ros2-src (see its README: PyPI has no wheels for them). Called by scripts/setup.sh.
#
# Installs into the git-ignored folder .ros2_tools/ of the checkout (never into the venv):
#   .ros2_tools/site/            the Python packages (pip --target) and their `ros2` script (site/bin)
#   .ros2_tools/ws/install/      composition_interfaces (launch_ros needs it), built with colcon
# scripts/env.sh puts both on the path. Skipped when the archives are absent, or when a ROS
# installation already provides `ros2` and launch_ros (then the tests use the system's tools).
# Idempotent: rebuilt only when the archives or the pins change.
#   RUNA_ROS2_SRC=/path/to/ros2-src   archives elsewhere
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
VPY="$VENV/bin/python"
SRC="${RUNA_ROS2_SRC:-$ROOT/../shared/ros2-src}"
TOOLS="$ROOT/.ros2_tools"
log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if command -v ros2 >/dev/null 2>&1 && [ "$(command -v ros2)" != "$TOOLS/site/bin/ros2" ] \
   && python3 -c 'import launch_ros' >/dev/null 2>&1; then
  log "ROS 2 command-line tools: using the system's ($(command -v ros2))"
  exit 0
fi
if [ ! -f "$SRC/launch.tar.gz" ]; then
  log "ROS 2 command-line tools: no archives at $SRC (tests of ros2 launch / the ros2 CLI will skip)"
  exit 0
fi
SRC="$(cd "$SRC" && pwd)"
ARCHIVES=(launch launch_ros ros2cli rosidl_runtime_py composition_interfaces)
HASH=$( { for a in "${ARCHIVES[@]}"; do sha256sum "$SRC/$a.tar.gz"; done
          grep -i -E '^(osrf-pycommon|psutil)==' "$ROOT/requirements/constraints.txt"
          sha256sum "${BASH_SOURCE[0]}"; } | sha256sum | cut -c1-16)
if [ "$(cat "$TOOLS/.built" 2>/dev/null)" = "$HASH" ] && [ -x "$TOOLS/site/bin/ros2" ] \
   && [ -f "$TOOLS/ws/install/local_setup.bash" ]; then
  log "ROS 2 command-line tools up to date ($TOOLS)"
  exit 0
fi

log "building the ROS 2 launch / command-line tools from $SRC into $TOOLS"
rm -rf "$TOOLS"
mkdir -p "$TOOLS/src" "$TOOLS/ws/src"
for a in "${ARCHIVES[@]}"; do
  mkdir -p "$TOOLS/src/$a"
  tar -xzf "$SRC/$a.tar.gz" -C "$TOOLS/src/$a"
done
S="$TOOLS/src"
# the ./-paths are local folders (a bare name would be looked up on the registry); the two
# registry packages are pinned in requirements/constraints.txt
"$VPY" -m pip install -q --no-deps --no-build-isolation --target "$TOOLS/site" \
  "$S/launch/launch" "$S/launch/launch_xml" "$S/launch/launch_yaml" "$S/launch/launch_testing" \
  "$S/launch_ros/launch_ros" "$S/launch_ros/ros2launch" "$S/launch_ros/launch_testing_ros" \
  "$S/ros2cli/ros2cli" "$S/ros2cli/ros2pkg" "$S/ros2cli/ros2node" "$S/ros2cli/ros2topic" \
  "$S/ros2cli/ros2param" "$S/ros2cli/ros2lifecycle" "$S/ros2cli/ros2service" "$S/ros2cli/ros2run" \
  "$S/rosidl_runtime_py" \
  -c "$ROOT/requirements/constraints.txt" osrf-pycommon psutil 2>&1 \
  | { grep -v -E "is ignored: it is neither a file nor a directory|WARNING: Target directory" || true; }
[ -x "$TOOLS/site/bin/ros2" ] || { echo "[setup] pip did not install the ros2 script into $TOOLS/site/bin" >&2; exit 1; }
# launch_testing's pytest plugins (pytest11 entry points) are written for pytest < 8 (a `path`
# hook argument) and stop pytest 9 from starting at all: drop those entry points (launch_testing
# stays importable, and `launch_test` runs launch tests with its own runner).
"$VPY" - "$TOOLS/site" <<'PYEOF'
import configparser, pathlib, sys
for ep in pathlib.Path(sys.argv[1]).glob("*.dist-info/entry_points.txt"):
    cp = configparser.ConfigParser(delimiters=("=",))
    cp.optionxform = str
    cp.read(ep)
    if cp.remove_section("pytest11"):
        with open(ep, "w") as f:
            cp.write(f)
        print(f"[setup] removed the pytest11 entry point of {ep.parent.name} (incompatible with pytest 9)")
PYEOF

# composition_interfaces: an interface package, built like ros2_ws (same CMake fixes, no tests)
ln -s "$S/composition_interfaces/composition_interfaces" "$TOOLS/ws/src/composition_interfaces"
(
  cd "$TOOLS/ws"
  export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" AMENT_PREFIX_PATH="$VENV"
  export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
  "$VENV/bin/colcon" --log-base log build --merge-install \
     --cmake-args -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$VPY" >"$TOOLS/build.log" 2>&1 \
     || { tail -40 "$TOOLS/build.log"; echo "[setup] colcon build of composition_interfaces failed, log: $TOOLS/build.log" >&2; exit 1; }
)
echo "$HASH" > "$TOOLS/.built"
log "ROS 2 command-line tools ready: ros2 launch, ros2 pkg/node/topic/param/lifecycle/service/run"
