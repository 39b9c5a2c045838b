"""`runa-ood replay`: play a bag into live ROS 2 topics with rclpy (no rosbag2 needed).

Messages are published as the **serialized CDR bytes stored in the bag** (rclpy publishers accept
``bytes``), so nothing is deserialized and any type whose Python message package is importable
can be replayed (the publisher needs the type for its type support). Timing follows the bag's log
times divided by ``--rate`` (``--rate 0``: as fast as possible); ``--start-offset`` skips the first
seconds, ``--loop`` repeats.

QoS: publishers are **reliable**, volatile, keep-last ``--depth``. A reliable publisher matches
both reliable subscribers and sensor-data (best-effort) subscribers, so it never silently
delivers nothing; ``--qos best_effort`` mimics a camera driver exactly (no delivery guarantee,
and the end-of-replay acknowledgement wait is then meaningless). Before exiting, the player waits
for subscribers to acknowledge everything (``wait_for_all_acked``) so the tail of the bag is not
lost when the process ends.

Every process that starts DDS must run with ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` here.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from . import bagio

LOG = logging.getLogger(__name__)


def message_class(msgtype: str):
    """rclpy message class of ``pkg/msg/Type`` (imports ``pkg.msg``). Raises ImportError with
    a hint when the package is not importable (interface packages: ``bash scripts/setup.sh``)."""
    parts = msgtype.split("/")
    if len(parts) != 3:
        raise ValueError(f"message type must look like pkg/msg/Type, got {msgtype!r}")
    pkg, kind, name = parts
    try:
        return getattr(importlib.import_module(f"{pkg}.{kind}"), name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"cannot import ROS message type {msgtype} ({exc}); build the interface packages "
                          "(bash scripts/setup.sh) and source scripts/env.sh") from exc


def make_qos(kind: str = "reliable", depth: int = 100):
    """Publisher QoS: ``reliable`` (default, matches reliable and best-effort subscribers) or
    ``best_effort`` (sensor-data profile with the given depth)."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    if kind not in ("reliable", "best_effort"):
        raise ValueError(f"qos must be 'reliable' or 'best_effort', got {kind!r}")
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=int(depth),
                      reliability=ReliabilityPolicy.RELIABLE if kind == "reliable" else ReliabilityPolicy.BEST_EFFORT,
                      durability=DurabilityPolicy.VOLATILE)


def parse_remaps(remaps: Optional[Sequence[str]]) -> Dict[str, str]:
    out = {}
    for r in remaps or ():
        if ":=" not in r:
            raise ValueError(f"remap must be old:=new, got {r!r}")
        a, b = r.split(":=", 1)
        out[a] = b
    return out


class BagPlayer:
    """Publish a bag's messages on an existing rclpy node.

    Args:
        node: the rclpy node that owns the publishers.
        bag: bag folder.
        topics: only these bag topics (None: all).
        remap: bag topic -> published topic.
        qos: ``reliable`` / ``best_effort`` (see module docstring); ``depth``: keep-last depth.

    Attributes after :meth:`play`: ``published`` topic -> messages published, ``publish_log``
    list of ``(topic, log_time_ns, wall_time_ns)`` for every message (wall clock ``time.time_ns``),
    ``errors`` publish failures (counted, never raised).
    """

    def __init__(self, node, bag, topics: Optional[Iterable[str]] = None, remap: Optional[Dict[str, str]] = None,
                 qos: str = "reliable", depth: int = 100):
        self.node = node
        self.bag = str(bag)
        self.info = bagio.bag_info(bag)
        wanted = set(topics) if topics else set(self.info.topics)
        unknown = wanted - set(self.info.topics)
        if unknown:
            raise ValueError(f"bag {bag} has no topic(s) {sorted(unknown)}; it has {sorted(self.info.topics)}")
        self.topics = sorted(wanted)
        self.remap = dict(remap or {})
        self.qos_kind = qos
        self.publishers = {}
        for t in self.topics:
            cls = message_class(self.info.topics[t])
            self.publishers[t] = node.create_publisher(cls, self.remap.get(t, t), make_qos(qos, depth))
        self.published: Dict[str, int] = {t: 0 for t in self.topics}
        self.publish_log: List[Tuple[str, int, int]] = []
        self.errors = 0

    def out_topic(self, topic: str) -> str:
        return self.publishers[topic].topic_name

    def wait_for_subscribers(self, count: int = 1, timeout_s: float = 20.0, topics: Optional[Iterable[str]] = None,
                             spin: Optional[Callable[[float], None]] = None) -> bool:
        """Block until the publisher of **every** topic in ``topics`` (default: every topic this
        player publishes, ground truth included) has at least ``count`` matched subscriptions.

        ``timeout_s`` (seconds) bounds the whole wait. On timeout one warning per topic still short
        of ``count`` is logged (published name, subscriptions matched so far) and False is
        returned; the caller decides whether to play anyway. ``spin(seconds)`` replaces
        ``time.sleep`` between checks (to spin a node's executor from the same thread).

        Raises:
            ValueError: a topic of ``topics`` is not published by this player.
        """
        if count <= 0:
            return True
        names = list(self.topics if topics is None else topics)
        unknown = [t for t in names if t not in self.publishers]
        if unknown:
            raise ValueError(f"not published by this player: {unknown}; it publishes {self.topics}")
        deadline = time.monotonic() + float(timeout_s)
        while True:
            missing = {t: n for t in names if (n := self.publishers[t].get_subscription_count()) < count}
            if not missing:
                return True
            if time.monotonic() > deadline:
                for t, n in sorted(missing.items()):
                    LOG.warning("after %.1f s, %s has %d of the %d subscriber(s) waited for", timeout_s,
                                self.out_topic(t), n, count)
                return False
            (spin or time.sleep)(0.05)

    def subscription_counts(self) -> Dict[str, int]:
        """Published topic name -> matched subscriptions now."""
        return {self.out_topic(t): self.publishers[t].get_subscription_count() for t in self.topics}

    def play(self, rate: float = 1.0, start_offset_s: float = 0.0, loop: int = 1, progress: bool = True,
             should_stop: Optional[Callable[[], bool]] = None) -> Dict[str, int]:
        """Publish the bag ``loop`` times (0 = forever, until ``should_stop``); returns counts.
        Pass k > 1 is restamped by ``(k - 1) * loop_offset_ns()`` (see :meth:`loop_offset_ns`).

        Timing: message k is published at ``(t_k - t_first) / rate`` after the start of the pass
        (``rate <= 0``: no waiting)."""
        from tqdm import tqdm

        start_ns = self.info.start_ns + int(start_offset_s * 1e9)
        total = sum(self.info.counts.get(t, 0) for t in self.topics)
        n_pass = 0
        while loop == 0 or n_pass < loop:
            n_pass += 1
            offset_ns = (n_pass - 1) * self.loop_offset_ns()
            t0_wall = time.monotonic()
            first = None
            bar = tqdm(total=total, desc=f"replay pass {n_pass}", unit="msg", disable=not progress, leave=False)
            for m in bagio.read_bag(self.bag, self.topics):
                bar.update(1)
                if m.stamp_ns < start_ns:
                    continue
                if should_stop is not None and should_stop():
                    bar.close()
                    return dict(self.published)
                first = m.stamp_ns if first is None else first
                if rate > 0:
                    delay = (m.stamp_ns - first) / 1e9 / rate - (time.monotonic() - t0_wall)
                    if delay > 0:
                        time.sleep(delay)
                try:
                    self.publishers[m.topic].publish(bagio.restamp(m.rawdata, self.info.topics[m.topic], offset_ns))
                except Exception as exc:  # a failing publish must not end the replay
                    self.errors += 1
                    LOG.warning("publish on %s failed: %s", m.topic, exc)
                    continue
                self.published[m.topic] += 1
                self.publish_log.append((m.topic, m.stamp_ns, time.time_ns()))
            bar.close()
        return dict(self.published)

    def loop_offset_ns(self) -> int:
        """Stamp shift of each further pass of a loop: the bag's span plus one mean message period,
        so the stamps of pass k+1 continue those of pass k. The node answers a stamp only once (a
        looped bag with repeated stamps would be answered in its first pass only), so later passes
        are restamped (every ``header.stamp``, nested ones too); the first pass is published as recorded."""
        span = max(0, self.info.end_ns - self.info.start_ns)
        n = max(self.info.counts.get(t, 0) for t in self.topics)
        return span + (span // (n - 1) if n > 1 and span else 1_000_000_000)

    def wait_acked(self, timeout_s: float = 10.0) -> bool:
        """Wait until subscribers acknowledged every message (reliable QoS); True when all did."""
        from rclpy.duration import Duration

        ok = True
        for t, pub in self.publishers.items():
            if self.published.get(t) and not pub.wait_for_all_acked(Duration(seconds=float(timeout_s))):
                LOG.warning("not every message on %s was acknowledged within %.1f s", pub.topic_name, timeout_s)
                ok = False
        return ok


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bag", help="bag folder (MCAP or sqlite3)")
    p.add_argument("--rate", type=float, default=1.0, help="playback speed factor (0 = as fast as possible)")
    p.add_argument("--loop", action="store_true",
                   help="repeat until interrupted; each further pass shifts every header stamp by the bag's span "
                        "plus one message period, so the node (which answers a stamp only once) keeps scoring")
    p.add_argument("--start-offset", type=float, default=0.0, help="skip the first seconds of the bag")
    p.add_argument("--topics", nargs="*", default=None, help="only these bag topics")
    p.add_argument("--remap", nargs="*", default=None, help="bag_topic:=published_topic")
    p.add_argument("--qos", choices=("reliable", "best_effort"), default="reliable",
                   help="publisher reliability (reliable also matches sensor-data subscribers)")
    p.add_argument("--depth", type=int, default=100, help="publisher keep-last depth")
    p.add_argument("--wait-subscribers", type=int, default=0, metavar="N",
                   help="before playing, wait until every published topic has N subscribers "
                        "(up to --wait-timeout; then a warning per topic short of N, and the replay starts anyway)")
    p.add_argument("--wait-topics", nargs="*", default=None, metavar="TOPIC",
                   help="with --wait-subscribers: wait only for these bag topics (names the bag lacks are ignored)")
    p.add_argument("--wait-timeout", type=float, default=20.0, help="seconds to wait for subscribers")
    p.add_argument("--ack-timeout", type=float, default=10.0, help="seconds to wait for the tail to be acknowledged")
    p.add_argument("--node-name", default="runa_ood_replay")


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE", "") != "LOCALHOST":
        LOG.warning("ROS_AUTOMATIC_DISCOVERY_RANGE is not LOCALHOST: discovery may leave this machine")
    import rclpy

    rclpy.init(args=None)
    node = rclpy.create_node(args.node_name)
    rc = 0
    try:
        player = BagPlayer(node, args.bag, args.topics, parse_remaps(args.remap), args.qos, args.depth)
        if player.info.recovered:
            print(f"warning: {args.bag} is cut short (no MCAP footer, recovered): "
                  f"{player.info.recovery.describe()}", file=sys.stderr)
        print(f"replaying {args.bag}{' (recovered)' if player.info.recovered else ''}: {player.info.counts} over "
              f"{player.info.duration_s:.2f} s at rate {args.rate}")
        wait_topics = None if args.wait_topics is None else [t for t in args.wait_topics if t in player.publishers]
        if args.wait_subscribers and not player.wait_for_subscribers(args.wait_subscribers, args.wait_timeout,
                                                                     wait_topics):
            short = {t: n for t, n in player.subscription_counts().items() if n < args.wait_subscribers
                     and (wait_topics is None or t in wait_topics)}
            for t, n in sorted(short.items()):
                print(f"warning: {t} has {n} of {args.wait_subscribers} subscriber(s) after {args.wait_timeout:g} s; "
                      "its messages may reach nobody", file=sys.stderr)
            print("warning: playing anyway", file=sys.stderr)
        counts = player.play(args.rate, args.start_offset, 0 if args.loop else 1)
        acked = player.wait_acked(args.ack_timeout) if args.qos == "reliable" else None
        print(f"published {sum(counts.values())} messages {counts}; errors {player.errors}; "
              f"all acknowledged: {acked}")
        rc = 0 if player.errors == 0 else 1
    except KeyboardInterrupt:
        rc = 130
    except (ImportError, ValueError, bagio.BagError) as exc:
        print(f"replay failed: {exc}", file=sys.stderr)
        rc = 1
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return rc
