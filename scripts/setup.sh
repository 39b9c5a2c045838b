#!/usr/bin/env bash
# One-command set-up of runa_ood_node on a fresh Debian 12 / Python 3.11 machine.
# Creates .venv, installs the pinned Python + ROS 2 kilted wheels, fixes the wheels' CMake
# paths, builds the interface packages in ros2_ws/ with colcon, installs this package in editable
# mode plus its ament layout (share/, lib/) in the venv prefix, and builds the ROS 2 launch /
# command-line tools from ../shared/ros2-src into .ros2_tools/ when no ROS installation provides them.
# Idempotent: every step is skipped when its inputs have not changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="${RUNA_PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "ROS 2 kilted wheels are cp311: need Python 3.11, got %s" % sys.version' \
  || { echo "[setup] Python 3.11 is required (set RUNA_PYTHON=/path/to/python3.11)" >&2; exit 2; }

if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  # missing, or half-created by an earlier failed run (e.g. without python3.11-venv): start over
  log "creating virtual environment $VENV"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV" || { echo "[setup] cannot create a venv: on Debian, apt-get install python3.11-venv" >&2; exit 2; }
fi
VPY="$VENV/bin/python"

hash_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

# 1. Python packages (pinned by requirements/constraints.txt)
REQ_HASH=$(hash_of requirements/*.txt)
if [ "$(cat "$VENV/.runa_requirements" 2>/dev/null)" != "$REQ_HASH" ]; then
  log "installing Python and ROS 2 wheels (first run: a few minutes)"
    "$VPY" -m pip install -q -c requirements/constraints.txt \
      -r requirements/base.txt -r requirements/test.txt 2>&1 \
      | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  rm -f "$VENV/.runa_cmake_fixed" "$ROOT/ros2_ws/.runa_built"  # new ROS wheels: rebuild interfaces
  echo "$REQ_HASH" > "$VENV/.runa_requirements"
else
  log "Python packages up to date"
fi

# 2. The wheels' exported CMake files hard-code the wheel build machine's include folders.
if [ ! -f "$VENV/.runa_cmake_fixed" ]; then
  log "rewriting the ROS wheels' CMake include paths for this interpreter"
  "$VPY" - "$VENV" <<'PYEOF'
import pathlib, sys, sysconfig, numpy
venv = pathlib.Path(sys.argv[1])
py_inc = sysconfig.get_paths()["include"]
np_inc = numpy.get_include()
bad_py = "/opt/python/cp311-cp311/include/python3.11"
n = 0
for f in (venv / "share").rglob("*.cmake"):
    try:
        text = f.read_text()
    except UnicodeDecodeError:
        continue
    new = text.replace(bad_py, py_inc)
    # numpy include folder of the wheel build machine
    import re
    new = re.sub(r"/opt/python/cp311-cp311/lib/python3\.11/site-packages/numpy/[^;\"\s)]*include", np_inc, new)
    if new != text:
        f.write_text(new); n += 1
print(f"[setup] fixed {n} cmake files")
PYEOF
  touch "$VENV/.runa_cmake_fixed"
fi

# 3. Interface packages (runa_ood_msgs, vision_msgs, foxglove_msgs) with colcon
WS="$ROOT/ros2_ws"
if [ -d "$WS/src" ] && [ -n "$(ls -A "$WS/src" 2>/dev/null)" ]; then
  WS_HASH=$( { find "$WS/src" -type f | sort | xargs cat; echo "system_vision_msgs=${RUNA_SYSTEM_VISION_MSGS:-}"
              [ -z "${RUNA_SYSTEM_FOXGLOVE_MSGS:-}" ] || echo "system_foxglove_msgs=$RUNA_SYSTEM_FOXGLOVE_MSGS"; } \
            | sha256sum | cut -c1-16)
  if [ "$(cat "$WS/.runa_built" 2>/dev/null)" != "$WS_HASH" ] || [ ! -f "$WS/install/setup.bash" ]; then
    log "building interface packages in ros2_ws (colcon)"
    (
      cd "$WS"
      export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" AMENT_PREFIX_PATH="$VENV"
      export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
      # On a ROS installation that already has vision_msgs / foxglove_msgs, use those (same type hashes):
      # RUNA_SYSTEM_VISION_MSGS=1 RUNA_SYSTEM_FOXGLOVE_MSGS=1 [RUNA_SYSTEM_PREFIX=/opt/ros/<distro>] bash scripts/setup.sh
      SKIP=()
      [ -n "${RUNA_SYSTEM_VISION_MSGS:-}" ] && SKIP+=(vision_msgs)
      [ -n "${RUNA_SYSTEM_FOXGLOVE_MSGS:-}" ] && SKIP+=(foxglove_msgs)
      if [ ${#SKIP[@]} -gt 0 ]; then
        SKIP=(--packages-skip "${SKIP[@]}")
        AMENT_PREFIX_PATH="$VENV:${RUNA_SYSTEM_PREFIX:-/opt/ros/${ROS_DISTRO:-kilted}}"
      fi
      "$VENV/bin/colcon" --log-base log build --merge-install "${SKIP[@]}" \
         --cmake-args -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$VPY" >"$WS/build.log" 2>&1 \
         || { tail -40 "$WS/build.log"; echo "[setup] colcon build failed, full log: $WS/build.log" >&2; exit 1; }
    )
    echo "$WS_HASH" > "$WS/.runa_built"
  else
    log "interface packages up to date"
  fi
fi

# 4. This package, editable, so `runa-ood` and `runa_ood_node` are on PATH
if [ ! -f "$VENV/.runa_editable" ] || [ setup.py -nt "$VENV/.runa_editable" ]; then
  log "installing runa_ood_node (editable)"
  "$VPY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
  touch "$VENV/.runa_editable"
fi
# 5. The ament layout an editable install lacks (scripts/ament_register.py, from setup.py):
#    real share/runa_ood_node/ folders with one link per file into this checkout (ros2 launch walks
#    them with os.walk, which skips links to folders), the package marker in the ament index, and
#    lib/runa_ood_node/<console scripts> (launch_ros, ros2 run and ros2 pkg executables look there).
"$VPY" "$ROOT/scripts/ament_register.py" --prefix "$VENV"

# 6. The ROS 2 launch / command-line tools from ../shared/ros2-src when there is no ROS installation
VENV="$VENV" bash "$ROOT/scripts/ros2_tools.sh"
log "ready: source scripts/env.sh (or use scripts/demo.sh / scripts/test.sh)"
