"""config/fastdds_one_host.xml: the shipped Fast DDS profile for a pipeline on one computer.

It must never widen discovery beyond this machine (every UDP transport allowed on loopback only,
no builtin transports), carry a 640x480 rgb8 image in one shared-memory message, and load in Fast
DDS without a parser error (a profile Fast DDS cannot parse is ignored with an error on stderr, and
the process runs on the defaults: only the log tells).
"""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

from runa_ood_node.tools.bench_node import ONE_HOST_PROFILE, fastdds_profile

NS = "{http://www.eprosima.com}"


def _transports():
    root = ET.parse(ONE_HOST_PROFILE).getroot()
    return root, {d.findtext(f"{NS}transport_id"): d for d in root.iter(f"{NS}transport_descriptor")}


def test_profile_keeps_udp_on_loopback_and_has_no_builtin_transports():
    root, transports = _transports()
    participants = list(root.iter(f"{NS}participant"))
    assert len(participants) == 1 and participants[0].get("is_default_profile") == "true"
    rtps = participants[0].find(f"{NS}rtps")
    assert rtps.findtext(f"{NS}useBuiltinTransports").strip() == "false"
    used = [t.text.strip() for t in rtps.iter(f"{NS}transport_id")]
    assert used and set(used) <= set(transports), (used, list(transports))
    kinds = {t: transports[t].findtext(f"{NS}type").strip() for t in used}
    assert set(kinds.values()) <= {"SHM", "UDPv4"}, kinds  # no TCP, no UDPv6
    for t, kind in kinds.items():
        if kind == "UDPv4":
            allowed = [a.text.strip() for a in transports[t].iter(f"{NS}address")]
            assert allowed == ["127.0.0.1"], (t, allowed)


def test_profile_carries_a_640x480_rgb8_image_in_one_shared_memory_message():
    _, transports = _transports()
    shm = [d for d in transports.values() if d.findtext(f"{NS}type").strip() == "SHM"]
    assert len(shm) == 1
    seg, msg = int(shm[0].findtext(f"{NS}segment_size")), int(shm[0].findtext(f"{NS}maxMessageSize"))
    image = 640 * 480 * 3 + 1024  # the pixels plus header, encoding and CDR framing
    assert msg >= image and seg >= 2 * msg, (seg, msg)


def test_fastdds_loads_the_profile_without_a_parser_error(tmp_path):
    probe = ("import rclpy\nrclpy.init()\nn = rclpy.create_node('runa_ood_profile_probe')\n"
             "p = n.create_publisher(__import__('std_msgs.msg', fromlist=['String']).String, 'probe', 1)\n"
             "n.destroy_node()\nrclpy.shutdown()\nprint('probe ok')\n")
    env = dict(os.environ, FASTDDS_DEFAULT_PROFILES_FILE=str(ONE_HOST_PROFILE), ROS_LOG_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "probe ok" in log, log
    assert "XMLPARSER" not in log and "Error" not in log, log
    # the check above can fail: a broken copy of the profile is reported by Fast DDS
    bad = tmp_path / "bad.xml"
    bad.write_text(ONE_HOST_PROFILE.read_text().replace("segment_size>", "segment_sizeX>"))
    out = subprocess.run([sys.executable, "-c", probe], env=dict(env, FASTDDS_DEFAULT_PROFILES_FILE=str(bad)),
                         capture_output=True, text=True, timeout=120)
    assert "XMLPARSER" in out.stdout + out.stderr


def test_bench_profile_choice(tmp_path, monkeypatch):
    assert fastdds_profile("one-host") == str(ONE_HOST_PROFILE)
    monkeypatch.delenv("FASTDDS_DEFAULT_PROFILES_FILE", raising=False)
    assert fastdds_profile("env") is None
    f = tmp_path / "p.xml"
    f.write_text("<dds/>")
    monkeypatch.setenv("FASTDDS_DEFAULT_PROFILES_FILE", str(f))
    assert fastdds_profile("env") == str(f)
    assert fastdds_profile(str(f)) == str(f)
    try:
        fastdds_profile(str(tmp_path / "missing.xml"))
    except FileNotFoundError as exc:
        assert "missing.xml" in str(exc)
    else:
        raise AssertionError("a missing profile was accepted")
